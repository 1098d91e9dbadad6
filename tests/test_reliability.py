"""The reliability guarantees listed in docs/reliability.md, each tested where it can break.

Checkpoints are data; preemption loses nothing; one run, one directory; the divergence policy; the
checkpoint before anything risky; exact resume after SIGKILL; resume refuses a different config.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.config import CONF_DIR
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation.fid import FIDResult
from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.evaluation.tracker import FIDTracker
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint, outputs
from diffusion_lab.training.checkpoint import CheckpointError
from diffusion_lab.training.step import TrainStep, build_optimizer
from tests.helpers import REPO, TINY, compose_config, run_main, wait_for_step, write_malicious_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none"]
# One thread per subprocess: on a busy 2-core machine, torch's spinning threads slow tiny steps 30-fold.
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def fast(*overrides):
    return compose_config(FAST + list(overrides))




@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 6-step run (checkpoints at steps 3 and 6) to resume from and to tamper with."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(fast("train.steps=6"), run_dir)
    return run_dir


# ------------------------------------------------------------------------------------------------
# 1. Checkpoints are data, not code


@pytest.mark.parametrize("entry", ["train.resume=path", "train.resume=auto", "sample", "evaluate"])
def test_malicious_checkpoint_never_runs_code(tmp_path, capsys, entry):
    marker = tmp_path / "MARKER"
    planted = write_malicious_checkpoint(tmp_path / "outputs" / "old" / "checkpoints" / "last.pt", marker)
    if entry == "train.resume=auto":  # a planted run whose config matches: resume=auto picks it
        OmegaConf.save(fast("train.steps=6"), planted.parent.parent / "config.yaml")
    module, args = {
        "train.resume=path": ("diffusion_lab.train", [*FAST, "train.steps=6", f"train.resume={planted}"]),
        "train.resume=auto": ("diffusion_lab.train", [*FAST, "train.steps=6", "train.resume=auto"]),
        "sample": ("diffusion_lab.sample", [f"checkpoint={planted}"]),
        "evaluate": ("diffusion_lab.evaluate", [f"checkpoint={planted}", "eval.feature_extractor=small"]),
    }[entry]
    code, _, err = run_main(module, args, tmp_path, capsys)
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: refusing to load"), err
    assert str(planted) in err and "posix.system" in err


def test_checkpoint_holds_only_tensors_and_plain_values(finished_run):
    state = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)  # no allow-list at all
    assert torch.is_tensor(state["rng"]["numpy"][1]) and state["step"] == 6


def test_checkpoint_before_this_format_still_loads_and_resumes(finished_run, tmp_path):
    """A checkpoint holding numpy's RNG state as an ndarray (the old format) loads and resumes exactly."""
    state = checkpoint.load(finished_run / "checkpoints" / "last.pt")
    np.random.seed(123)
    state["rng"]["numpy"] = np.random.get_state()
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy)
    with pytest.raises(Exception):
        torch.load(legacy, weights_only=True)  # the numpy global needs the allow-list
    np.random.seed(0)
    checkpoint.set_rng_states(checkpoint.load(legacy)["rng"])
    assert np.random.rand() == np.random.RandomState(123).rand()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "truncated", "foreign"])
def test_broken_checkpoint_is_one_line(finished_run, tmp_path, content):
    path = tmp_path / "broken.pt"
    if content == "truncated":
        path.write_bytes((finished_run / "checkpoints" / "last.pt").read_bytes()[:5000])
    elif content == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# 4. One run, one directory; unique, durable temp files


WRITER = """
import sys, torch
from pathlib import Path
from diffusion_lab.training import checkpoint
value = int(sys.argv[2])
for _ in range(40):
    checkpoint.save(Path(sys.argv[1]), {"value": value, "payload": torch.full((200_000,), float(value))})
"""


@pytest.mark.slow
def test_concurrent_writers_never_leave_an_unreadable_file(tmp_path):
    path = tmp_path / "last.pt"
    env = ENV
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(v)], env=env, stderr=subprocess.PIPE,
                                text=True) for v in (1, 2)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            state = torch.load(path, weights_only=True)
            assert torch.all(state["payload"] == state["value"]), "a reader saw a mixed or partial file"
            reads += 1
        time.sleep(0.005)
    for w in writers:
        assert w.wait() == 0, f"a writer crashed: {w.stderr.read()[-2000:]}"
    assert torch.load(path, weights_only=True)["value"] in (1, 2) and reads > 0
    assert not list(tmp_path.glob("*.tmp")), "temp files left behind"


def test_a_full_disk_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"step": 1})

    def disk_full(state, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device") as error:
        checkpoint.save(path, {"step": 2})
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert torch.load(path, weights_only=True) == {"step": 1} and not list(tmp_path.glob("*.tmp"))


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".last.pt.{host}.{int(dead.stdout)}.abc.tmp"
    live = tmp_path / f".last.pt.{host}.{os.getpid()}.def.tmp"  # a writer that is still running
    for p in (stale, live):
        p.write_bytes(b"half a checkpoint")
    checkpoint.save(tmp_path / "last.pt", {"x": 1})
    assert not stale.exists() and live.exists()


def test_run_dirs_started_in_the_same_second_differ(monkeypatch):
    import hydra.core.utils as hydra_utils
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import setup_globals

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 23, 12, 0, 0)

    monkeypatch.setattr(hydra_utils, "datetime", Frozen)
    setup_globals()
    dirs = []
    for _ in range(2):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", return_hydra_config=True)
            dirs.append((cfg.hydra.run.dir, cfg.hydra.sweep.dir, cfg.hydra.run.dir))
    GlobalHydra.instance().clear()
    (run_a, sweep_a, again_a), (run_b, sweep_b, _) = dirs
    assert run_a == again_a, "a config resolves its run dir once"
    assert run_a != run_b and sweep_a != sweep_b
    assert run_a.startswith("outputs/2026-11-23/12-00-00-") and sweep_a.startswith("outputs/multirun/2026-11-23/12-00-00-")


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_dirs(tmp_path):
    env = ENV
    args = [sys.executable, "-m", "diffusion_lab.train", *FAST, "train.steps=2"]
    procs = [subprocess.Popen(args + [f"seed={i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").rglob("config.yaml") if p.parent.name != ".hydra")
    assert len(run_dirs) == 2
    assert sorted(OmegaConf.load(d / "config.yaml").seed for d in run_dirs) == [0, 1]


@pytest.mark.slow
def test_jobs_of_a_parallel_sweep_share_one_sweep_dir(tmp_path):
    """The uid is drawn once per sweep: joblib's worker processes resolve the same sweep dir."""
    env = ENV
    result = subprocess.run([sys.executable, "-m", "diffusion_lab.train", "-m", "schedule=linear,cosine",
                             "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *FAST, "train.steps=1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    sweeps = {p.parent.parent for p in (tmp_path / "outputs" / "multirun").rglob("summary.json")}
    assert len(sweeps) == 1 and len(list(next(iter(sweeps)).glob("*/summary.json"))) == 2


def test_a_run_dir_holding_a_run_is_not_reused(finished_run, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    with pytest.raises(ConfigError, match="already holds a run"):
        train(fast("train.steps=6"), finished_run)
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before, "nothing is overwritten"


@pytest.mark.slow
def test_a_run_continues_in_its_own_dir_without_duplicated_metrics(tmp_path):
    """A requeued job resumes in its own dir: the metrics written after its checkpoint are dropped, not repeated."""
    run_dir = tmp_path / "run"
    train(fast("train.steps=4", "train.checkpoint_every=1000", "train.log_every=1"), run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:  # logged after the checkpoint by a run that was then killed
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train(fast("train.steps=6", "train.log_every=1", f"train.resume={run_dir / 'checkpoints' / 'last.pt'}",
               "train.checkpoint_every=1000"), run_dir)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert [r.get("loss") != 1.0 for r in read_metrics(run_dir / "metrics.jsonl")] == [True] * 6


# ------------------------------------------------------------------------------------------------
# 5. Divergence policy


def _tiny_step(**kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    from diffusion_lab.training.ema import EMA

    ema = EMA(model, decay=0.9)
    step = TrainStep(model, build_optimizer(model.parameters(), "adamw", 1e-2), "cpu", "fp32",
                     grad_clip=1.0, warmup_steps=10, ema=ema, **kwargs)
    return model, ema, step


@pytest.mark.parametrize("bad", ["nan loss", "finite loss, inf gradient"])
def test_non_finite_step_skips_the_update(bad):
    model, ema, step = _tiny_step()
    x = torch.randn(8, 4)
    step(lambda: model(x).pow(2).mean())  # one good step: optimizer state exists
    before = ([p.clone() for p in model.parameters()], [p.clone() for p in ema.module.parameters()],
              step.lr, {k: v.clone() for k, v in step.optimizer.state[model.weight].items()})
    if bad == "nan loss":
        loss_fn = lambda: model(x).pow(2).mean() * float("nan")  # noqa: E731
    else:  # sqrt at 0: the loss is 0, its gradient is inf * 0 = nan
        loss_fn = lambda: torch.sqrt(model(x).pow(2).mean() * 0)  # noqa: E731
    loss, grad_norm = step(loss_fn)
    assert step.skipped and not (np.isfinite(loss) and np.isfinite(grad_norm))
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters())), "weights changed"
    assert all(torch.equal(a, b) for a, b in zip(before[1], ema.module.parameters())), "EMA changed"
    assert step.lr == before[2], "warm-up advanced"
    assert all(torch.equal(v, step.optimizer.state[model.weight][k]) for k, v in before[3].items()), "moments changed"
    step(lambda: model(x).pow(2).mean())
    assert not step.skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_non_finite_fp16_step_lowers_the_scale():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).cuda()
    step = TrainStep(model, build_optimizer(model.parameters(), "adamw", 1e-2, device="cuda"), "cuda", "fp16")
    x = torch.randn(8, 4, device="cuda")
    scale = step.scaler.get_scale()
    step(lambda: model(x).pow(2).mean() * float("inf"))
    assert step.skipped and step.scaler.get_scale() < scale


@pytest.mark.slow
def test_diverging_run_stops_with_one_true_line(tmp_path, capsys):
    """lr=1e30 blows the weights up after one step; every later step is skipped; the run stops after 3."""
    args = [*FAST, "train.steps=50", "train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0",
            "train.max_bad_steps=3", "train.checkpoint_every=1000", f"hydra.run.dir={tmp_path / 'run'}"]
    code, _, err = run_main("diffusion_lab.train", args, tmp_path, capsys)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 3 and len(lines) == 1, err
    assert "3 consecutive steps" in lines[0]
    kept = tmp_path / "run" / "checkpoints" / "last.pt"
    if "no checkpoint was written" in lines[0]:
        assert not kept.exists(), "the line says no checkpoint exists: none does"
    else:  # the line names the checkpoint it kept, its step, and that its weights are finite: all true
        state = checkpoint.load(kept)
        assert f"{kept} (step {state['step']}, finite weights)" in lines[0] and not checkpoint.non_finite(state)


def test_resume_refuses_non_finite_weights(finished_run, tmp_path):
    state = checkpoint.load(finished_run / "checkpoints" / "last.pt")
    next(iter(state["model"].values()))[0] = float("nan")
    checkpoint.save(tmp_path / "nan.pt", state)
    with pytest.raises(CheckpointError, match="non-finite"):
        train(fast("train.steps=8", f"train.resume={tmp_path / 'nan.pt'}"), tmp_path / "run")


def test_nan_fid_never_becomes_the_best():
    images = type("D", (), {"channels": 1, "image_size": 8})()
    tracker = FIDTracker(OmegaConf.create({"every": 0, "num_samples": 1}), lambda split: images, "cpu")
    result = lambda v: FIDResult(v, "clean", "small", 10, "ref")  # noqa: E731
    assert not tracker.record(1, result(float("nan")))
    assert tracker.record(2, result(5.0)) and not tracker.record(3, result(float("nan")))
    assert tracker.best == 5.0 and tracker.record(4, result(4.0))


# ------------------------------------------------------------------------------------------------
# 6. Checkpoint before anything risky; 7. resume with a different config


def test_checkpoint_is_written_before_the_sample_grid(tmp_path, monkeypatch):
    def broken_grid(*args, **kwargs):
        raise RuntimeError("the sampler failed")

    monkeypatch.setattr(outputs, "save_grid", broken_grid)
    with pytest.raises(RuntimeError, match="sampler failed"):
        train(fast("train.steps=4", "train.checkpoint_every=1000", "train.sample_every=0"), tmp_path / "run")
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


WITH_FID = ["eval.every=2", "eval.num_samples=64", "eval.batch_size=32", "eval.feature_extractor=small"]


@pytest.mark.parametrize("broken", ["grid", "fid"])
def test_checkpoint_is_written_before_every_grid_and_fid(tmp_path, monkeypatch, broken):
    def fails(*args, **kwargs):
        raise RuntimeError(f"the {broken} failed")

    if broken == "grid":
        monkeypatch.setattr(outputs, "save_grid", fails)
        rhythm = ["train.sample_every=2"]
    else:
        monkeypatch.setattr(FIDTracker, "evaluate", fails)
        rhythm = ["train.sample_every=0", *WITH_FID]
    with pytest.raises(RuntimeError, match=f"{broken} failed"):  # step 2: neither a checkpoint nor the last step
        train(fast("train.steps=4", "train.checkpoint_every=1000", *rhythm), tmp_path / "run")
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def _signal_self(signum=signal.SIGTERM):
    os.kill(os.getpid(), signum)  # delivered to the main thread before the next Python line runs


def test_a_signal_during_fid_stops_it_between_batches_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from diffusion_lab.evaluation.fid import FIDEvaluator

    batches, batch_stats = [], FIDEvaluator.batch_stats

    def signalling(self, images):
        batches.append(len(images))
        _signal_self()
        return batch_stats(self, images)

    monkeypatch.setattr(FIDEvaluator, "batch_stats", signalling)
    with pytest.raises(SystemExit) as exit:
        train(fast("train.steps=100", "train.checkpoint_every=1000", "train.sample_every=0", *WITH_FID),
              tmp_path / "run")
    assert exit.value.code == 143 and batches == [32], "one batch of two, then the stop"
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "fid" in r]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 2: FID not measured: SIGTERM arrived during it" in log and "stopped by SIGTERM at step 2" in log


@pytest.mark.parametrize("during", ["grid", "fid", "pictures"])
def test_a_signal_after_the_last_step_leaves_a_finished_run(tmp_path, monkeypatch, during):
    from diffusion_lab.training import loop

    received = []
    previous = signal.signal(signal.SIGTERM, lambda *a: received.append(a))  # on main the pictures ran unguarded
    target, name = {"grid": (outputs, "save_grid"), "fid": (FIDTracker, "evaluate"),
                    "pictures": (loop, "final_pictures")}[during]
    original = getattr(target, name)

    def signalling(*args, **kwargs):
        _signal_self()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, signalling)
    try:
        summary = train(fast("train.steps=4", "train.checkpoint_every=1000", "train.sample_every=0",
                             *(WITH_FID[1:] + ["eval.every=1000"] if during == "fid" else [])), tmp_path / "run")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert summary["interrupted"] is False and summary["steps"] == 4 and not received
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["interrupted"] is False
    log = (tmp_path / "run" / "train.log").read_text()
    assert "SIGTERM arrived after the last step: the run is finished" in log and "train.resume" not in log
    assert checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 4


def test_a_second_ctrl_c_during_the_stop_checkpoint_lets_it_complete(tmp_path, monkeypatch, capsys):
    logged, save = [], torch.save

    def first_ctrl_c_at_step_2(self, metrics, step):
        logged.append(step)
        if step == 2:
            _signal_self(signal.SIGINT)

    def second_ctrl_c_while_writing(state, f):
        write, calls = f.write, []

        def interrupted_write(data):
            calls.append(1)
            if len(calls) == 3:
                _signal_self(signal.SIGINT)
            return write(data)

        f.write = interrupted_write
        return save(state, f)

    monkeypatch.setattr(outputs.Outputs, "log", first_ctrl_c_at_step_2)
    monkeypatch.setattr(torch, "save", second_ctrl_c_while_writing)
    run_dir = tmp_path / "outputs" / "run"
    code, out, err = run_main("diffusion_lab.train", [*FAST, "train.steps=100", "train.log_every=1",
                                                      "train.checkpoint_every=1000", "train.sample_every=0",
                                                      f"hydra.run.dir={run_dir}"], tmp_path, capsys)
    assert code == 130 and logged == [1, 2], err[-2000:]
    assert "aborted by a second SIGINT (Ctrl-C) after checkpoints/last.pt was written" in err
    assert "cannot write" not in err and "Traceback" not in err
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"] == 2


@pytest.mark.parametrize("change,needle", [
    ("schedule=linear", "schedule.name: cosine -> linear"),
    ("objective=v", "objective.name: eps -> v"),
    ("train.batch_size=8", "train.batch_size: 16 -> 8"),
    ("model.hidden_dims=[16,16]", "model.hidden_dims"),
    ("data.image_size=16", "data.image_size: 8 -> 16"),
])
def test_explicit_resume_refuses_a_different_config(finished_run, tmp_path, change, needle):
    with pytest.raises(CheckpointError) as error:
        train(fast("train.steps=8", change, f"train.resume={finished_run / 'checkpoints' / 'last.pt'}"), tmp_path / "r")
    assert needle in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "r").exists(), "refused before anything is written"


@pytest.mark.slow
def test_explicit_resume_accepts_rhythm_changes(finished_run, tmp_path):
    cfg = fast("train.steps=7", "train.log_every=1", "train.checkpoint_every=7",
               f"train.resume={finished_run / 'checkpoints' / 'last.pt'}")
    assert train(cfg, tmp_path / "r")["steps"] == 7


# ------------------------------------------------------------------------------------------------
# 2. Preemption; 3. exact resume after SIGKILL


def _start(args, cwd):
    env = ENV
    return subprocess.Popen([sys.executable, "-m", "diffusion_lab.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2])
def test_stop_signal_writes_a_checkpoint_and_resume_auto_continues(tmp_path, signum):
    args = [*FAST, "train.steps=100000", "train.checkpoint_every=100000", "train.log_every=1"]
    proc = _start(args + [f"hydra.run.dir={tmp_path / 'outputs' / 'first'}"], tmp_path)
    wait_for_step(tmp_path / "outputs" / "first" / "metrics.jsonl", 3, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]
    stopped = checkpoint.load(tmp_path / "outputs" / "first" / "checkpoints" / "last.pt")["step"]
    assert stopped >= 3 and f"{signal.Signals(signum).name} received" in err
    assert f"stopped by {signal.Signals(signum).name} at step {stopped}" in out
    if signum != signal.SIGTERM:
        return  # one resume is enough: the checkpoint is the same whichever signal wrote it
    more = [o for o in args if not o.startswith("train.steps")] + [f"train.steps={stopped + 2}", "train.resume=auto"]
    resumed = _start(more + [f"hydra.run.dir={tmp_path / 'outputs' / 'second'}"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"at step {stopped}" in out
    steps = [r["step"] for r in read_metrics(tmp_path / "outputs" / "second" / "metrics.jsonl")]
    assert steps == list(range(1, stopped + 3)), "no duplicated or missing steps"


def _write_image_folder(root: Path, n: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("data", ["digits", "folder"])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, data):
    data_args = (["model.dropout=0.1"] if data == "digits" else
                 ["data=folder", f"data.root={_write_image_folder(tmp_path / 'images')}", "data.image_size=8",
                  "model.dropout=0.1", "train.batch_size=8"])
    steps = 60
    args = [*FAST, *data_args, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=5",
            "train.sample_every=0"]
    assert torch.get_num_threads() == 1  # as in the subprocesses: float sums may depend on the thread count
    train(compose_config(args), tmp_path / "straight")
    proc = _start(args + [f"hydra.run.dir={tmp_path / 'killed'}"], tmp_path)
    wait_for_step(tmp_path / "killed" / "metrics.jsonl", random.randint(6, 30), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    killed_at = checkpoint.load(tmp_path / "killed" / "checkpoints" / "last.pt")["step"]
    assert 5 <= killed_at < steps
    resumed = _start(args + [f"train.resume={tmp_path / 'killed' / 'checkpoints' / 'last.pt'}",
                             f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    one = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    two = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    pairs = [*zip(one["model"].values(), two["model"].values()),
             *zip(one["train_step"]["ema"]["module"].values(), two["train_step"]["ema"]["module"].values()),
             *[(a[k], b[k]) for a, b in zip(one["train_step"]["optimizer"]["state"].values(),
                                           two["train_step"]["optimizer"]["state"].values()) for k in a]]
    assert len(pairs) > 10 and all(torch.equal(a, b) for a, b in pairs), f"not bit-identical (killed at {killed_at})"
    assert one["loss_history"] == two["loss_history"]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == list(range(1, steps + 1))


def test_starting_a_dataloader_leaves_the_global_rng_alone(tmp_path):
    """Resume restores the global torch RNG (dropout); a file-backed loader must not draw from it."""
    from diffusion_lab.data.datasets import folder
    from diffusion_lab.data.loader import ResumableLoader

    loader = ResumableLoader(folder(str(_write_image_folder(tmp_path / "images", n=8)), image_size=8), 4, seed=0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_an_offline_wandb_run_is_complete_when_finish_returns(tmp_path):
    """W&B's service writes an offline run's .wandb file when it closes the run, which can be after
    `run.finish()` returns (on a loaded machine, often): `WandbLogger.finish` shuts the service down once
    the last run is finished, so the file is complete at once. Several runs, as a loaded machine misses some."""
    from wandb.sdk import wandb_setup

    from diffusion_lab.training.loggers import WandbLogger
    from tests.helpers import read_wandb_records

    for i in range(3):
        logger = WandbLogger(tmp_path / str(i), {"lr": 0.1}, name=f"run {i}", mode="offline")
        logger.summarize({"final_loss": 0.25})
        logger.finish()
        assert wandb_setup._singleton is None, "the service is shut down after the last run"
        files = list((tmp_path / str(i) / "wandb").glob("offline-run-*/run-*.wandb"))
        records = [r for f in files for r in read_wandb_records(f)]
        kinds = {r.WhichOneof("record_type") for r in records}
        assert len(files) == 1 and {"run", "summary", "exit"} <= kinds, (i, kinds)
        assert any(r.run.run_id == logger.run_id for r in records if r.WhichOneof("record_type") == "run")
