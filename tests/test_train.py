"""End-to-end runs of `python -m diffusion_lab.train`: artefacts, resume, sweeps and bad overrides."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint
from tests.helpers import REPO, TINY, compose_config, read_wandb_records, run_cli, write_tiny_cifar


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    summary = train(compose_config(TINY + ["logger=wandb"]), run_dir, overrides=["tiny"])
    return run_dir, summary


def test_run_leaves_every_artefact(tiny_run):
    run_dir, summary = tiny_run
    for name in ["config.yaml", "metrics.jsonl", "loss.png", "summary.json", "checkpoints/last.pt"]:
        assert (run_dir / name).is_file(), name
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for key in ["loss", "lr", "grad_norm", "images_per_s"]:
        assert all(r[key] > 0 for r in train_rows), key
    assert summary["steps"] == 6 and summary["wandb"]["mode"] == "offline"
    assert json.loads((run_dir / "summary.json").read_text())["final_loss"] == pytest.approx(summary["final_loss"])
    assert summary["fid_history_n"] == [64, 64]  # the sample size of each FID, so fid.png draws one curve per n
    assert summary["final_loss"] == train_rows[-1]["loss"]  # the last logged loss, not a mean of the last few
    assert summary["final_loss_smoothed"] == pytest.approx(sum(r["loss"] for r in train_rows) / 3)
    # train.warmup_steps=2 of train.steps=6 is clipped to 20% of the run, and the start line says so
    assert "lr: warm-up 1 steps (train.warmup_steps=2 clipped to 20% of train.steps=6) to 0.002, then cosine to step 6" \
        in (run_dir / "train.log").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B run is written"


def _updated(tree, items):
    """Apply W&B summary/history items (a `key`, or a `nested_key` path, and a JSON value) to a nested dict."""
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        node = tree
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}  # a picture replaces whatever number was there
            node = node[key]
        node[path[-1]] = json.loads(item.value_json)
    return tree


def wandb_run(run_dir):
    """(run record, final summary, history rows) of the run's offline .wandb file, read with wandb's Record;
    a picture logged under a key turns that key's value into a dict, as in the W&B UI."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    run, summary, history = None, {}, []
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            _updated(summary, record.summary.update)
        elif kind == "history":
            history.append(_updated({}, record.history.item))
    return run, summary, history


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_floor_and_numbers_in_summary_json_and_wandb(tiny_run):
    run_dir, summary = tiny_run
    saved = json.loads((run_dir / "summary.json").read_text())
    assert is_number(saved["fid_floor"]) and 0 < saved["fid_floor"] < saved["best_fid"]
    assert saved["fid_floor_n"] == 64 and saved["fid_reference"] == "digits test (359 images)"
    assert "digits classifier" in saved["fid_label"] and saved["final_fid"] == saved["fid_history"][-1][1]
    metrics = [r for r in read_metrics(run_dir / "metrics.jsonl") if "fid" in r]
    assert [r["fid_floor"] for r in metrics] == [saved["fid_floor"]] * 2 and all("is_like" in r for r in metrics)
    beside = ("kid", "kid_std", "precision", "recall")  # at the same eval points, with their floors beside
    assert all(is_number(r[k]) for r in metrics for k in (*beside, "kid_floor", "precision_floor", "recall_floor"))
    assert all(0 <= r[k] <= 1 for r in metrics for k in ("precision", "recall", "precision_floor", "recall_floor"))
    assert {saved[f"final_{k}"] for k in beside} == {metrics[-1][k] for k in beside}
    assert [saved[f"{k}_floor"] for k in ("kid", "precision", "recall")] == [
        metrics[-1][f"{k}_floor"] for k in ("kid", "precision", "recall")]

    run, wb, history = wandb_run(run_dir)
    assert run.job_type == "train"
    for key in ("final_loss", "best_fid", "final_fid", "fid_floor", "loss", "fid", "kid", "recall", "final_kid",
                "final_precision", "kid_floor", "recall_floor"):
        assert is_number(wb[key]), (key, wb.get(key))
    for key in ("final_loss", "best_fid", "fid_floor", "final_kid", "final_recall", "precision_floor"):
        assert wb[key] == pytest.approx(saved[key])
    assert wb["fid_label"] == saved["fid_label"]
    types = {k: v["_type"] for row in history for k, v in row.items() if isinstance(v, dict) and "_type" in v}
    assert {"plots/loss", "plots/fid", "plots/samples"} <= set(types) and set(types.values()) == {"image-file"}
    assert all(k.startswith("plots/") for k in types)  # no picture under a number's key
    assert all(is_number(row[k]) for row in history for k in ("loss", "fid") if k in row)


def test_sample_logs_a_linked_wandb_run(tiny_run, tmp_path):
    from diffusion_lab.sample import sample

    run_dir, summary = tiny_run
    cfg = compose_config([f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "num_samples=16", "fid=true",
                          "sampler.steps=3"], config_name="sample")
    result = sample(cfg, tmp_path / "sample")
    run, wb, history = wandb_run(tmp_path / "sample")
    assert run.job_type == "sample" and result["wandb"]["id"] == run.run_id != summary["wandb"]["id"]
    source = {u.key: json.loads(u.value_json) for u in run.config.update}["source_run"]
    assert source == summary["wandb"]["id"]  # linked to the run that trained the checkpoint
    assert wb["fid"] == pytest.approx(result["fid"]["value"]) and is_number(wb["fid_floor"]) and wb["num_samples"] == 16
    assert any(isinstance(row.get("plots/grid"), dict) for row in history)


def test_checkpoint_holds_everything_to_continue(tiny_run):
    run_dir, _ = tiny_run
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 6
    assert state["data"] == {"epoch": 0, "index": 6}
    assert state["train_step"]["optimizer"]["state"], "optimizer moments are saved"
    assert state["train_step"]["ema"] is not None and state["config"]["train"]["steps"] == 6
    assert {"torch", "python", "numpy", "noise_generator"} <= set(state["rng"])
    assert [s for s, _ in state["loss_history"]] == [2, 4, 6]


def test_resume_continues_exactly(tmp_path):
    """6 steps straight == 3 steps, then resume to 6: same losses, same weights, same optimizer state.
    (A constant lr: a decaying schedule ends at train.steps, so a 3-step run decays on a different clock.)"""
    base = TINY + ["logger=none", "eval.every=0", "train.lr_schedule=constant"]
    straight = train(compose_config(base), tmp_path / "straight")
    train(compose_config([o for o in base if not o.startswith("train.steps")] + ["train.steps=3"]), tmp_path / "a")
    resumed = train(compose_config(base + [f"train.resume={tmp_path / 'a' / 'checkpoints' / 'last.pt'}"]),
                    tmp_path / "b")
    assert resumed["steps"] == straight["steps"] == 6
    one = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    two = checkpoint.load(tmp_path / "b" / "checkpoints" / "last.pt")
    assert one["loss_history"][-1] == two["loss_history"][-1], "steps 5-6 give bit-identical losses"
    for key, value in one["model"].items():
        assert torch.equal(value, two["model"][key]), key
    exp_avg = [s["exp_avg"] for s in one["train_step"]["optimizer"]["state"].values()]
    exp_avg2 = [s["exp_avg"] for s in two["train_step"]["optimizer"]["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(exp_avg, exp_avg2))
    steps = [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [2, 3, 4, 6], "the resumed run's metrics continue the earlier curve (3 = the first run's end)"


def test_resume_auto_finds_matching_run(tmp_path):
    base = TINY + ["logger=none", "eval.every=0", "train.steps=3"]
    train(compose_config(base), tmp_path / "outputs" / "first")
    cfg = compose_config([o for o in base if not o.startswith("train.steps")] + ["train.steps=4", "train.resume=auto"])
    summary = train(cfg, tmp_path / "outputs" / "second", outputs_root=tmp_path / "outputs")
    state = checkpoint.load(tmp_path / "outputs" / "second" / "checkpoints" / "last.pt")
    assert summary["steps"] == 4 and [s for s, _ in state["loss_history"]] == [2, 3, 4]
    other = compose_config(base + ["schedule=linear", "train.resume=auto"])
    assert checkpoint.find_resumable(other, [tmp_path / "outputs"]) is None, "a different schedule is not resumed"


def _planted_run(run_dir, config, mtime):
    """A run dir with config.yaml and a checkpoints/last.pt written at `mtime` (resumable_runs reads no weights)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    os.utime(run_dir / "checkpoints" / "last.pt", (mtime, mtime))
    return run_dir / "checkpoints" / "last.pt"


def test_resume_auto_prefers_the_newest_single_run_and_skips_a_corrupt_config(tmp_path, caplog):
    from omegaconf import OmegaConf

    from diffusion_lab.train import auto_resume_line

    cfg = compose_config(TINY + ["logger=none"])
    config = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True))
    out = tmp_path / "outputs"
    old_single = _planted_run(out / "2026-01-01" / "10-00-00-aaaa", config, 1000)
    new_single = _planted_run(out / "2026-01-02" / "10-00-00-bbbb", config, 2000)
    sweep = out / "multirun" / "2026-01-03" / "10-00-00-cccc"
    newest_job = _planted_run(sweep / "0-schedule_cosine", config, 3000)  # newer, but a sweep job
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    corrupt = _planted_run(out / "2026-01-04" / "10-00-00-dddd", "model: [unclosed\n", 4000)
    with caplog.at_level("WARNING", logger="diffusion_lab"):
        runs = checkpoint.resumable_runs(cfg, [out])
    assert runs == [new_single, old_single, newest_job]
    assert f"skipping {corrupt.parent.parent / 'config.yaml'}" in caplog.text
    line = auto_resume_line(runs)
    assert line.startswith(f"resume=auto: continuing {new_single} (the newest of 3 matching runs") and "\n" not in line


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]],
                         ids=["basic", "joblib"])
def test_cli_multirun_two_jobs_one_wandb_group(tmp_path, launcher):
    sweep = tmp_path / "sweep"
    result = run_cli("diffusion_lab.train", ["-m", "schedule=linear,cosine", f"hydra.sweep.dir={sweep}", *launcher,
                                             "eval.every=0", *[o for o in TINY if not o.startswith("eval")]],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(summaries) == 2
    assert {s["wandb"]["group"] for s in summaries} == {f"schedule {sweep.parent.name}/{sweep.name}"}
    assert len({s["wandb"]["id"] for s in summaries}) == 2
    names = [s["name"] for s in summaries]
    assert sum("schedule=linear" in n for n in names) == sum("schedule=cosine" in n for n in names) == 1
    tags = []
    for s in summaries:
        run, _, _ = wandb_run(sweep / s["run_dir"].split("/")[-1])
        assert run.run_group == s["wandb"]["group"] and run.job_type == "train"
        tags.append(list(run.tags))
    assert sorted(tags) == [["schedule=cosine"], ["schedule=linear"]]  # the swept key, not the fixed overrides
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0-schedule_linear", "1-schedule_cosine"]


@pytest.mark.slow
def test_sweep_job_dir_passes_back_unquoted(tmp_path):
    """A sweep job's dir (number + swept keys) is a plain path: it resumes as `train.resume=DIR`."""
    sweep, base = tmp_path / "sweep", ["eval.every=0", "logger=none", *[o for o in TINY if not o.startswith("eval")]]
    result = run_cli("diffusion_lab.train", ["-m", "schedule=cosine", "model.dropout=0.0,0.1",
                                             f"hydra.sweep.dir={sweep}", *base], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    job = sweep / "1-model.dropout_0.1"  # the fixed schedule=cosine is not in the name
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0-model.dropout_0.0", job.name]
    more = [o for o in base if not o.startswith("train.steps")] + ["train.steps=8", "model.dropout=0.1"]
    resumed = run_cli("diffusion_lab.train", [f"train.resume={job}", f"hydra.run.dir={tmp_path / 'more'}", *more],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {job / 'checkpoints' / 'last.pt'} at step 6" in resumed.stdout


@pytest.mark.parametrize("override,needle", [
    ("schedule=cosin", "unknown schedule 'cosin'; known: cosine, edm, flow, linear, ve, vp"),
    ("model=cifar model.dropout=2", "model.dropout"),
    ("train.batch_size=0", "train.batch_size"),
    ("data.image_size=6", "image_size"),
    ("model.dropot=0.1", "dropot"),
    ("data=folder", "data.root is required"),
    ("+experiment=ddpm_cifar10", "use experiment=ddpm_cifar10 (no +)"),
    ("+train.stpes=5", "no part of diffusion_lab reads train.stpes; did you mean train.steps?"),
])
def test_cli_bad_override_fails_in_one_line(tmp_path, override, needle):
    result = run_cli("diffusion_lab.train", override.split() + ["logger=none"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("last.pt"))


CIFAR_TINY = ["data=cifar10", "data.download=false", "data.verify_checksums=false", "data.image_size=8",
              "model=cifar", "model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
              "model.attention_resolutions=[4]", "model.time_dim=64", "train.steps=2", "train.batch_size=8",
              "train.num_grid_samples=4", "sampler.steps=3", "eval.every=0", "logger=none"]


def test_cifar10_path_trains_on_tiny_cifar_format_data(tmp_path):
    write_tiny_cifar(tmp_path / "cifar", per_batch=8)
    summary = train(compose_config(CIFAR_TINY + [f"data.root={tmp_path / 'cifar'}"]), tmp_path / "run")
    assert summary["dataset"] == "cifar10" and summary["dataset_size"] == 40 and summary["steps"] == 2
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert tuple(state["image_shape"]) == (3, 8, 8)


def test_cli_cifar10_missing_says_where_to_put_it(tmp_path):
    root = tmp_path / "nothing-here"
    result = run_cli("diffusion_lab.train", CIFAR_TINY + [f"data.root={root}"], cwd=tmp_path, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert str(root) in lines[0] and "cifar-10-batches-py" in lines[0]


@pytest.mark.slow
def test_cli_ctrl_c_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    args = [o for o in TINY if not o.startswith("train.steps")] + [
        "train.steps=100000", "eval.every=0", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_lab.train", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert 4 <= state["step"] < 100000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == state["step"]
    assert "train.resume=" in out


def test_grad_accum_reads_the_batch_in_parts_and_counts_whole_batches(tmp_path):
    """train.batch_size stays the images per optimizer step: 6 steps of 16 in 2 parts read 12 micro-batches of 8."""
    summary = train(compose_config(TINY + ["logger=none", "eval.every=0", "train.grad_accum_steps=2"]), tmp_path)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert summary["steps"] == 6 and state["data"] == {"epoch": 0, "index": 12}
    epochs = [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert epochs == pytest.approx([s * 16 / summary["dataset_size"] for s in (2, 4, 6)])
