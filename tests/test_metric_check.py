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


def test_precision_and_recall_see_fidelity_and_diversity(table):
    """Real images: both high. One class: every image real (precision stays high), most of the data uncovered
    (recall 0.04 against 0.90 in the n=500 table). Blur and uniform noise leave the real manifold: precision ~0."""
    real = table["real train images (the floor)"]
    assert real["precision digits"] > 0.8 and real["recall digits"] > 0.8
    one_class = table["one class only (digit 0)"]
    assert one_class["precision digits"] > 0.7 and one_class["recall digits"] < 0.2 * real["recall digits"]
    for name in ("blurred train images (sigma 1 px)", "uniform noise", "mean train image"):
        assert table[name]["precision digits"] < 0.1 * real["precision digits"], name
    assert table["mean train image"]["recall digits"] == 0.0  # one point, radius 0: it covers nothing


def test_kid_puts_every_wrong_set_far_above_the_floor(table):
    """KID is unbiased, so real images score about 0 (within a few subset stds); every wrong set lies more than
    30 floor stds above it (the Gaussian fit, the nearest, by about 100 in the n=500 table)."""
    real = table["real train images (the floor)"]
    assert abs(real["KID digits"]) < 4 * real["KID std digits"]
    assert table["bootstrap of train images"]["KID digits"] < real["KID digits"] + 4 * real["KID std digits"]
    for name in ("Gaussian fitted to train pixels", "blurred train images (sigma 1 px)", "one class only (digit 0)",
                 "mean train image", "uniform noise"):
        assert table[name]["KID digits"] > real["KID digits"] + 30 * real["KID std digits"], name


def test_classifier_score_sees_diversity(table):
    assert table["real train images (the floor)"]["IS-like"] > 9.5  # of at most 10
    assert table["one class only (digit 0)"]["IS-like"] < 1.1  # one class: no diversity, whatever the FID
    assert table["uniform noise"]["label entropy"] > 10 * table["real train images (the floor)"]["label entropy"]


def test_cli_writes_the_table(tmp_path, capsys):
    metric_check.main(["--n", "200", "--extractors", "digits", "--out", str(tmp_path)])
    text = (tmp_path / "metric_check.md").read_text()
    assert "| real train images (the floor) | 200 |" in text and "digits test (359 images)" in text
    assert (tmp_path / "metric_check.csv").read_text().startswith(
        "images,n,FID digits,FID/floor digits,KID digits,KID std digits,precision digits,recall digits")
    with pytest.raises(SystemExit) as info:
        metric_check.main(["--extractors", "inceptoin"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown extractor 'inceptoin'") and err.count("\n") == 1
