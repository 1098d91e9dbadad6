"""The floor/ceiling table of `python -m diffusion_lab.metric_check`: the digits classifier's FID puts every
known-bad image set far above its noise floor. Margins come from the table in docs/evaluation.md (n=500):
Gaussian fit 23x the floor, blur 174x, one class 190x, mean image 279x, uniform noise 150x; bootstrap 1.5x."""
import pytest

from diffusion_lab.evaluation import metric_check


@pytest.fixture(scope="module")
def table():
    return {row["images"]: row for row in metric_check.metric_table(500, ["digits"])}


def test_floor_far_below_ceilings(table):
    floor = table["real train images (the floor)"]
    assert floor["FID/floor digits"] == 1.0 and floor["FID digits"] > 0
    assert table["bootstrap of train images"]["FID/floor digits"] < 3  # re-drawn real images stay near the floor
    margins = {"Gaussian fitted to train pixels": 15, "blurred train images (sigma 1 px)": 100,
               "one class only (digit 0)": 100, "mean train image": 100, "uniform noise": 100}
    for name, margin in margins.items():
        assert table[name]["FID/floor digits"] > margin, name


def test_classifier_score_sees_diversity(table):
    assert table["real train images (the floor)"]["IS-like"] > 9.5  # of at most 10
    assert table["one class only (digit 0)"]["IS-like"] < 1.1  # one class: no diversity, whatever the FID
    assert table["uniform noise"]["label entropy"] > 10 * table["real train images (the floor)"]["label entropy"]


def test_cli_writes_the_table(tmp_path, capsys):
    metric_check.main(["--n", "200", "--extractors", "digits", "--out", str(tmp_path)])
    text = (tmp_path / "metric_check.md").read_text()
    assert "| real train images (the floor) | 200 |" in text and "digits test (359 images)" in text
    assert (tmp_path / "metric_check.csv").read_text().startswith("images,n,FID digits")
    with pytest.raises(SystemExit) as info:
        metric_check.main(["--extractors", "inceptoin"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown extractor 'inceptoin'") and err.count("\n") == 1
