"""compare over `evaluate` dirs: FID against NFE over seeds (evaluation/cost.py) on hand-written results."""
import csv
import json

import pytest
from scipy import stats

from diffusion_lab.evaluation import compare as cmp
from diffusion_lab.evaluation import cost
from diffusion_lab.evaluation.seeds import interval

from test_compare import write_run

LABEL = "FID[native size, digits classifier, 1000 samples vs digits test (359 images)]"
# (schedule, seed) -> {(sampler, grid, nfe): fid}: linear clearly lower at 5 NFE, the two within noise at 10
FIDS = {("linear", s): {("ddim", "linspace", 5): 40.0 + s, ("ddim", "logsnr", 5): 45.0 + s,
                        ("dpm_solver", "logsnr", 10): 12.0 + 3 * s} for s in range(3)}
FIDS.update({("cosine", s): {("ddim", "linspace", 5): 60.0 + s, ("ddim", "logsnr", 5): 50.0 + 2 * s,
                             ("dpm_solver", "logsnr", 10): 14.0 + 2 * s} for s in range(3)})


def write_evaluation(path, checkpoint, fids, label=LABEL, floor=6.5):
    """An evaluate dir as evaluate.py leaves it: fid_vs_cost.json naming the checkpoint it scored."""
    path.mkdir(parents=True)
    rows = [{"sampler": name, "steps": nfe, "nfe": nfe, "guidance_scale": None, "fid": fid, "fid_floor": floor,
             "setting": f"{name}, {nfe} steps, {nfe} NFE", "settings": json.dumps({"steps": nfe, "grid": grid})}
            for (name, grid, nfe), fid in fids.items()]
    (path / "fid_vs_cost.json").write_text(json.dumps({"label": label, "floor": floor, "floor_n": 1000,
                                                       "checkpoint": str(checkpoint), "step": 6, "rows": rows}))


@pytest.fixture
def study(tmp_path, monkeypatch):
    """Training runs and their evaluate dirs under root; checkpoints written relative to tmp_path (where the
    commands ran), and compare run from elsewhere."""
    root = tmp_path / "outputs" / "study"
    for (schedule, seed), fids in FIDS.items():
        write_run(root / f"{schedule}_s{seed}", schedule, 0.0, [0.5, 0.4, 0.3], [20.0], seed=seed)
        write_evaluation(root / f"eval_{schedule}_s{seed}", f"outputs/study/{schedule}_s{seed}", fids)
    monkeypatch.chdir(tmp_path / "outputs")  # `outputs/study/...` does not exist from here: found from a dir above
    return root


def test_points_hold_one_fid_per_seed_named_by_what_varies(study):
    evaluations, skipped = cost.find_evaluations([study], cmp.find_runs([study]))
    assert len(evaluations) == 6 and not skipped
    by_label = cost.points(evaluations, lambda run: run.config["schedule"])
    assert list(by_label) == [LABEL]
    found = {(p.setting, p.sampler, p.nfe): p.fids for p in by_label[LABEL]}
    assert set(found) == {(s, n, nfe) for s in ("linear", "cosine") for n, nfe in
                          [("ddim (grid=linspace)", 5), ("ddim (grid=logsnr)", 5), ("dpm_solver", 10)]}
    assert found[("cosine", "ddim (grid=logsnr)", 5)] == {0: 50.0, 1: 52.0, 2: 54.0}


def test_statements_test_each_point_against_the_lowest_at_its_nfe(study):
    evaluations, _ = cost.find_evaluations([study], [])
    found = cost.points(evaluations, lambda run: run.config["schedule"])[LABEL]
    lines = cost.statements(found)
    five = lines.index(next(line for line in lines if line.startswith("5 NFE")))
    assert "lowest linear: ddim (grid=linspace) 41.00" in lines[five]
    p_far = stats.ttest_ind([40, 41, 42], [60, 61, 62], equal_var=False).pvalue
    assert any(line.strip().startswith("cosine: ddim (grid=linspace)") and "beyond seed noise" in line
               and f"p={p_far:.2g}" in line for line in lines[five + 1:five + 4])
    ten = next(line for line in lines if line.startswith("10 NFE"))
    assert "lowest linear: dpm_solver" in ten
    assert "within noise" in lines[lines.index(ten) + 1]
    mean, half = interval([12.0, 15.0, 18.0])
    assert mean == 15.0 and half == pytest.approx(stats.t.ppf(0.975, 2) * 3.0 / 3 ** 0.5)
    assert f"{mean:.2f} ± {half:.2f}" in ten


def test_compare_of_evaluate_dirs_writes_the_nfe_plot_and_csv(study, tmp_path, capsys):
    out = tmp_path / "report"
    result = cmp.compare([study], out=out)
    printed = capsys.readouterr().out
    assert "FID against model evaluations" in printed and "| 5 | schedule=linear | ddim (grid=linspace) | 3 |" in printed
    assert {p.name for p in result["plots"]} >= {"compare_loss.png", "compare_fid.png", "compare_fid_vs_nfe.png"}
    rows = list(csv.DictReader((out / "compare_nfe.csv").open()))
    assert len(rows) == 18 and {r["fid_label"] for r in rows} == {LABEL}
    assert (out / "compare_fid_vs_nfe.png").stat().st_size > 10_000


def test_evaluate_dirs_alone_are_enough_and_unreadable_ones_are_skipped(study, tmp_path, capsys):
    evals = tmp_path / "evals"
    evals.mkdir()
    for d in study.glob("eval_*"):
        d.rename(evals / d.name)
    write_evaluation(evals / "eval_lost", "outputs/study/nowhere", {("ddim", "linspace", 5): 1.0})
    (evals / "eval_torn").mkdir()
    (evals / "eval_torn" / "fid_vs_cost.json").write_text('{"label": "x", "rows": [')
    result = cmp.compare([evals], out=tmp_path / "report")
    printed = capsys.readouterr().out
    assert "eval_lost: its checkpoint outputs/study/nowhere is not found" in printed
    assert "eval_torn: fid_vs_cost.json is not an evaluate result" in printed
    assert len(result["skipped"]) == 2 and len(result["cost"]["points"][LABEL]) == 6


def test_different_fid_labels_are_never_side_by_side(study, tmp_path, capsys):
    other = study / "eval_small_n"
    write_evaluation(other, "outputs/study/linear_s0", {("ddim", "linspace", 5): 3.0},
                     label=LABEL.replace("1000 samples", "100 samples"))
    result = cmp.compare([study], out=tmp_path / "report")
    assert len(result["cost"]["points"]) == 2
    assert {p.name for p in result["cost"]["plots"]} == {"compare_fid_vs_nfe_1.png", "compare_fid_vs_nfe_2.png"}
    assert capsys.readouterr().out.count("== FID against model evaluations") == 2


def test_no_runs_and_no_evaluations_is_one_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no training runs .* or evaluate results"):
        cmp.compare([tmp_path / "empty"])
