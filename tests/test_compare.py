"""compare.py on a hand-written fake sweep: table, sorting, plots, csv, CLI exit codes. No training."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf

from diffusion_lab.evaluation import compare as cmp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULES = {"linear": {"name": "linear", "noise_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
             "cosine": {"name": "cosine", "noise_steps": 1000, "s": 0.008, "max_beta": 0.999}}


def write_run(path, schedule, dropout, losses, fids, summary=True, device="cpu", seed=0):
    """A run dir as train.py leaves it: config.yaml, metrics.jsonl, optionally summary.json."""
    path.mkdir(parents=True)
    config = {"seed": seed, "device": device, "run_name": f"run-{schedule}",
              "data": {"name": "digits", "image_size": 8},
              "model": {"name": "base", "hidden_dims": [16, 32], "dropout": dropout},
              "schedule": SCHEDULES[schedule], "train": {"steps": 10, "lr": 1e-3, "resume": None},
              "logger": {"name": "wandb", "mode": "offline" if summary else "disabled"}}
    OmegaConf.save(OmegaConf.create(config), path / "config.yaml")
    rows = [{"step": 2 * (i + 1), "loss": loss, "lr": 1e-3, "grad_norm": 1.0, "images_per_s": 100.0, "epoch": 0.1}
            for i, loss in enumerate(losses)]
    rows += [{"step": 2 * (i + 1), "fid": fid} for i, fid in enumerate(fids)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "name": path.name, "overrides": [f"schedule={schedule}", f"model.dropout={dropout}"],
            "run_dir": str(path), "steps": 2 * len(losses), "final_loss": losses[-1], "wall_time_s": 83.4,
            "train_images_per_s": 1234.5, "fid_history": [[2 * (i + 1), f] for i, f in enumerate(fids)],
            "best_fid": min(fids), "final_fid": fids[-1], "fid_floor": 1.5, "fid_floor_n": 64, "fid_label": "FID[clean, small, 64 samples vs digits custom stats (1797 images)]",
            "interrupted": False}))


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    # linear: higher loss, better FID; cosine: lower loss, worse FID -> the two metrics sort differently
    write_run(root / "0_schedule=linear,model.dropout=0.0", "linear", 0.0, [0.9, 0.5, 0.25], [40.0, 20.0])
    write_run(root / "1_schedule=cosine,model.dropout=0.1", "cosine", 0.1, [0.8, 0.4, 0.125], [50.0, 30.0],
              device="cuda")
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def data_lines(text):
    return text.splitlines()[2:]  # header, dashes, then one line per run


def test_table_shows_differing_keys_sorted_by_metric(sweep):
    runs = cmp.find_runs([sweep])
    keys = cmp.differing_keys(runs)
    assert keys == ["model.dropout", "schedule"]  # not seed/data/hidden_dims, nor device/run_name/logger/train.resume
    assert not any(k.startswith("schedule.") for k in keys)  # schedule.s etc. come with the schedule choice

    text = cmp.table(runs, keys, "final_loss")
    header = text.splitlines()[0].split()
    assert header[:3] == ["run", "model.dropout", "schedule"] and "device" not in header
    first, second = (line.split() for line in data_lines(text))
    assert first[:4] == ["1", "0.1", "cosine", "0.1250"]
    assert second[:4] == ["0", "0.0", "linear", "0.2500"]
    assert first[4:] == ["30", "30", "1.5", "6", "1m23s", "1234"]  # best/final FID, floor, steps, wall time, images/s

    by_fid = [line.split()[2] for line in data_lines(cmp.table(runs, keys, "best_fid"))]
    assert by_fid == ["linear", "cosine"]


def test_compare_writes_plots_and_csv(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    result = cmp.compare([sweep], out=out)
    printed = capsys.readouterr().out
    assert result["table"] in printed
    assert printed.count("FID = FID[clean, small, 64 samples") == 1
    assert {p.name for p in result["plots"]} == {"compare_loss.png", "compare_fid.png"}
    for name in ("compare_loss.png", "compare_fid.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["schedule"], r["model.dropout"], float(r["final_loss"])) for r in rows] == [
        ("linear", "0.0", 0.25), ("cosine", "0.1", 0.125)]  # sorted by best FID by default
    assert float(rows[0]["wall_time_s"]) == 83.4 and rows[1]["run_dir"].endswith("1_schedule=cosine,model.dropout=0.1")


def test_run_without_summary_is_listed_and_marked(sweep, capsys):
    write_run(sweep / "2_schedule=linear,model.dropout=0.1", "linear", 0.1, [0.3, 0.2, 0.1, 0.06, 0.04],
              [25.0, 15.0], summary=False)
    result = cmp.compare([sweep])
    lines = data_lines(result["table"])
    assert len(lines) == 3 and "note" in result["table"].splitlines()[0]
    crashed = lines[0].split()  # the last logged loss, as train.py's final_loss
    assert crashed[:9] == ["2", "0.1", "linear", "0.0400", "15", "15", "-", "10", "-"]
    assert lines[0].endswith("no summary.json") and not lines[1].endswith("summary.json")
    assert (sweep / "compare_loss.png").stat().st_size > 0 and (sweep / "compare.csv").is_file()
    assert sorted(len(g.runs) for g in result["settings"]) == [1, 1]  # the unfinished run is not averaged in
    assert "1 unfinished or interrupted run(s) left out" in capsys.readouterr().out


def test_no_fid_skips_fid_plot(tmp_path, capsys):
    write_run(tmp_path / "a", "linear", 0.0, [0.5, 0.2], [], summary=False)
    write_run(tmp_path / "b", "cosine", 0.0, [0.5, 0.3], [], summary=False)
    result = cmp.compare([tmp_path])
    assert [p.name for p in result["plots"]] == ["compare_loss.png"]
    assert not (tmp_path / "compare_fid.png").exists() and "compare_fid.png skipped" in capsys.readouterr().out


def test_cli(sweep, tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-m", "diffusion_lab.compare", str(sweep)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cosine" in done.stdout and "linear" in done.stdout and "0.1250" in done.stdout
    assert "cannot tell: needs at least 2 seeds" in done.stdout  # one seed per setting
    assert (sweep / "compare.csv").is_file()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        cmp.main([str(empty)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training runs") and err.count("\n") == 1


# ------------------------------------------------------------------------------------- seeds and noise

BEST_FIDS = {("linear", 0.0): [10.0, 10.2, 9.8],  # mean 10.0, s.e. 0.2 / sqrt(3)
             ("cosine", 0.0): [12.0, 12.1, 11.9],  # mean 12.0: 2.0 above linear, ~15 s.e.
             ("linear", 0.1): [10.1, 9.7, 10.3]}  # mean 10.033: inside linear's noise


@pytest.fixture
def seeded(tmp_path):
    """Three settings x three seeds with the best FIDs above (last FID = best FID)."""
    root = tmp_path / "multirun"
    job = 0
    for (schedule, dropout), values in BEST_FIDS.items():
        for seed, value in enumerate(values):
            write_run(root / f"{job}_x", schedule, dropout, [0.5, 0.4, 0.3 + seed / 100], [value + 5, value],
                      seed=seed)
            job += 1
    return root


def welch_p(a, b):
    """Welch's t-test from its formulas: t with the Welch-Satterthwaite degrees of freedom."""
    from scipy.stats import t as student_t

    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return 2 * student_t.sf(abs(t), df)


def test_seeds_make_one_setting_with_mean_and_standard_error(seeded):
    runs = cmp.find_runs([seeded])
    keys = cmp.differing_keys(runs)
    assert "seed" in keys
    groups = cmp.settings(runs, keys)
    assert [len(g.runs) for g in groups] == [3, 3, 3] and all("seed" not in g.values for g in groups)
    by_name = {(g.values["schedule"], g.values["model.dropout"]): g for g in groups}
    for setting, values in BEST_FIDS.items():
        mean, se, n = by_name[setting].stats("best_fid")
        assert n == 3 and mean == pytest.approx(np.mean(values))
        assert se == pytest.approx(np.std(values, ddof=1) / np.sqrt(3))
    text = cmp.settings_table(groups)
    rows = data_lines(text)
    assert [r.split()[:3] for r in rows] == [["0.0", "linear", "3"], ["0.1", "linear", "3"], ["0.0", "cosine", "3"]]
    assert "10 ± 0.1155" in rows[0] and "12 ± 0.05774" in rows[2]


def test_welch_says_different_and_within_noise(seeded, capsys):
    result = cmp.compare([seeded])
    lines = result["statements"]
    assert "Welch's t-test" in lines[0]
    verdict = {line.split(":")[0].strip(): line for line in lines[1:]}
    lin0 = "model.dropout=0.0, schedule=linear"
    cos0 = "model.dropout=0.0, schedule=cosine"
    lin1 = "model.dropout=0.1, schedule=linear"
    different = verdict[f"{lin0}  vs  {cos0}"]
    same = verdict[f"{lin0}  vs  {lin1}"]
    assert "different" in different and "within noise" not in different
    assert "within noise" in same
    p_diff, p_same = welch_p(BEST_FIDS[("linear", 0.0)], BEST_FIDS[("cosine", 0.0)]), \
        welch_p(BEST_FIDS[("linear", 0.0)], BEST_FIDS[("linear", 0.1)])
    assert p_diff < 0.05 < p_same
    assert f"p={p_diff:.3g}" in different and f"p={p_same:.3g}" in same
    printed = capsys.readouterr().out
    assert result["settings_table"] in printed and "cosine" in printed


def test_pooling_a_key_tests_the_other_factor(seeded):
    runs = cmp.find_runs([seeded])
    groups = cmp.settings(runs, cmp.differing_keys(runs), pool=["model.dropout"])
    by_schedule = {g.values["schedule"]: g for g in groups}
    assert set(by_schedule) == {"linear", "cosine"} and all("model.dropout" not in g.values for g in groups)
    linear = BEST_FIDS[("linear", 0.0)] + BEST_FIDS[("linear", 0.1)]
    mean, se, n = by_schedule["linear"].stats("best_fid")
    assert n == 6 and mean == pytest.approx(np.mean(linear)) and se == pytest.approx(np.std(linear, ddof=1) / np.sqrt(6))
    lines = cmp.noise_statements(groups)
    assert len(lines) == 2 and f"p={welch_p(linear, BEST_FIDS[('cosine', 0.0)]):.3g}" in lines[1]


# ------------------------------------------------------------------------------------- untrusted folders

BAD_RUNS = {  # what a run dir holds -> what the skipped line says
    "truncated summary": ("summary.json", '{"final_loss": 0.1, "best_f', "not valid JSON"),
    "list summary": ("summary.json", "[1, 2, 3]", "not an object"),
    "string number": ("summary.json", json.dumps({"final_loss": 0.1, "best_fid": "12.5"}), "best_fid"),
    "invalid yaml": ("config.yaml", "train: {steps: [1, 2\n", "config.yaml is not a valid config"),
    "yaml list": ("config.yaml", "- 1\n- 2\n", "not a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_RUNS))
def test_bad_run_is_skipped_with_its_reason(sweep, case, capsys):
    name, text, reason = BAD_RUNS[case]
    bad = sweep / "9_bad"
    write_run(bad, "linear", 0.3, [0.5, 0.4], [30.0])
    (bad / name).write_text(text)
    result = cmp.compare([sweep])
    printed = capsys.readouterr().out
    skipped = [line for line in printed.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and str(bad) in skipped[0] and reason in skipped[0]
    assert [s.path for s in result["skipped"]] == [bad]
    assert len(result["runs"]) == 2 and "0.3" not in result["table"]


def test_a_folder_of_only_bad_runs_is_one_error_line(tmp_path, capsys):
    write_run(tmp_path / "a", "linear", 0.0, [0.5], [10.0])
    (tmp_path / "a" / "summary.json").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cmp.main([str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no training runs") and "1 skipped" in err and err.count("\n") == 1


def test_torn_metrics_line_is_dropped_with_a_warning(sweep, capsys):
    path = sweep / "2_torn"
    write_run(path, "linear", 0.1, [0.3, 0.2], [25.0], summary=False)
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": "0.05"}\n{"step": 6, "loss": 0.1')  # a string number, then killed mid-write
    result = cmp.compare([sweep])
    torn = next(r for r in result["runs"] if r.path == path)
    assert torn.loss_points() == ((2, 4), (0.3, 0.2))
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and all("metrics.jsonl" in line for line in warnings)


def test_config_interpolations_are_shown_unresolved(sweep, monkeypatch):
    monkeypatch.setenv("COMPARE_SECRET", "hunter2")
    for i, run_dir in enumerate(sorted(sweep.iterdir())[:2]):
        config = (run_dir / "config.yaml").read_text()
        planted = "${oc.env:COMPARE_SECRET}" if i == 0 else "${train.loop}"
        loop = "  loop: ${train.loop}\n" if i else ""
        (run_dir / "config.yaml").write_text(config.replace("train:\n", f"train:\n  note: '{planted}'\n{loop}"))
    result = cmp.compare([sweep])
    text = (sweep / "compare.csv").read_text() + result["table"]
    assert "hunter2" not in text and "${oc.env:COMPARE_SECRET}" in text and not result["skipped"]


def test_sample_outputs_are_not_runs(sweep, capsys):
    sample_dir = sweep / "sample_out"
    sample_dir.mkdir()
    (sample_dir / "summary.json").write_text(json.dumps({"checkpoint": "x/last.pt", "step": 10, "num_samples": 64,
                                                         "fid": {"value": 3.0}}))
    (sample_dir / ".hydra").mkdir()
    (sample_dir / ".hydra" / "config.yaml").write_text("checkpoint: x/last.pt\n")
    result = cmp.compare([sweep])
    assert len(result["runs"]) == 2 and all(r.path != sample_dir for r in result["runs"])
    assert "1 dir(s) with a summary.json but no config.yaml + metrics.jsonl" in capsys.readouterr().out


def relabel(run_dir, label=None, **config):
    """Change a fake run's FID label in summary.json and set dotted config values."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["fid_label"] = label or summary["fid_label"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for key, value in config.items():
        OmegaConf.update(cfg, key, value)
    OmegaConf.save(cfg, run_dir / "config.yaml")


def test_runs_of_other_fid_labels_are_never_tested_against_each_other(seeded, capsys):
    # the linear/dropout 0.1 runs were measured with another extractor: their FIDs mean something else
    for job in (6, 7, 8):
        relabel(seeded / f"{job}_x", "FID[clean, digits classifier, 64 samples vs digits test (359 images)]",
                **{"eval.feature_extractor": "digits"})
    for job in range(6):
        relabel(seeded / f"{job}_x", **{"eval.feature_extractor": "small"})
    result = cmp.compare([seeded])
    printed = capsys.readouterr().out
    assert [len(g.runs) for g in result["groups"]] == [6, 3]
    assert all("model.dropout=0.1" not in line for line in result["statements"])  # never tested against the others
    assert len(result["statements"]) == 2  # header + linear vs cosine inside the first group
    assert printed.count("== FID = FID[clean, small") == 1 and printed.count("== FID = FID[clean, digits classifier") == 1
    assert {p.name for p in result["plots"]} == {"compare_loss.png", "compare_fid_1.png", "compare_fid_2.png"}
    with open(result["csv"]) as f:
        labels = [row["fid_label"] for row in csv.DictReader(f)]
    assert labels[:6] == [result["groups"][0].label] * 6 and set(labels[6:]) == {result["groups"][1].label}


def test_runs_of_other_data_are_not_ranked_in_one_column(seeded):
    for job in (3, 4, 5):  # same label text, but 16px digits: another reference
        relabel(seeded / f"{job}_x", **{"data.image_size": 16})
    result = cmp.compare([seeded])
    assert [len(g.runs) for g in result["groups"]] == [6, 3]
    assert result["groups"][1].title.endswith("data.image_size=16")
    assert len(result["reports"][1]["table"].splitlines()) == 2 + 3
