"""One writer per run dir: a second process on a dir in use is refused with one line naming the holder, and
writes nothing; the lock of a dead process is taken over; the lock is released when a run fails."""
import os
import signal
import socket
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.train import train
from diffusion_lab.training import outputs, run_lock
from diffusion_lab.training import run_dir as run_dirs
from diffusion_lab.training.loop import Loop
from tests.helpers import REPO, TINY, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none"]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
ME = f"pid {os.getpid()}@{socket.gethostname()}"

# Holds a run dir's lock until its stdin closes (or it is killed); says "locked" once it holds it.
HOLDER = """
import sys
from diffusion_lab.training import run_lock
run_lock.acquire(sys.argv[1]); run_lock.record(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def fast(*overrides):
    return compose_config(FAST + list(overrides))


def train_cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "diffusion_lab.train", *FAST, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


def snapshot(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture
def holder():
    """Start a process that holds a dir's lock; returns its pid once it holds it; ends it afterwards."""
    procs = []

    def start(run_dir):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], env=ENV, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_fresh_run_in_a_dir_in_use_is_refused_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    run_dirs.claim(run_dir)  # this process is the run that holds the dir
    try:
        before = snapshot(run_dir)
        result = train_cli(["train.steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    finally:
        run_lock.release(run_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert error_lines(result.stderr) == [error_lines(result.stderr)[0]] and ME in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(run_dir) == before, "the refused run wrote nothing (not even Hydra's .hydra/)"


@pytest.mark.slow
def test_an_in_place_resume_of_a_run_in_use_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    train(fast("train.steps=2"), run_dir)
    run_dirs.claim(run_dir, run_dir / "checkpoints" / "last.pt")  # this process resumes it
    try:
        before = snapshot(run_dir)
        result = train_cli(["train.steps=4", f"hydra.run.dir={run_dir}", f"train.resume={run_dir}"], tmp_path)
    finally:
        run_lock.release(run_dir)
    assert result.returncode == 2 and ME in result.stderr and len(error_lines(result.stderr)) == 1, result.stderr
    assert snapshot(run_dir) == before


def test_train_refuses_a_dir_another_process_holds(tmp_path, holder):
    """The lock is checked in the run itself, not only on the command line: nothing is written."""
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(run_lock.RunDirInUse, match=f"in use by pid {proc.pid}@"):
        train(fast("train.steps=2"), run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == [run_lock.LOCK_FILE]


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, holder):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(run_lock.RunDirInUse):
        run_lock.acquire(run_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dirs.claim(run_dir)  # a requeued job: a new process after the old one died
    try:
        assert (run_dir / run_lock.LOCK_FILE).read_text().strip() == ME.removeprefix("pid ")
    finally:
        run_lock.release(run_dir)


def test_a_lock_file_left_by_a_dead_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_lock.LOCK_FILE).write_text(f"999999999@{socket.gethostname()}\n")
    run_dirs.claim(run_dir)
    run_lock.release(run_dir)


def test_a_run_that_fails_releases_its_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"

    def broken(self, *args):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Loop, "run_steps", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        train(fast("train.steps=2"), run_dir)
    assert not run_lock.is_held(run_dir)
    other = subprocess.run([sys.executable, "-c", HOLDER, str(run_dir)], env=ENV, input="", capture_output=True,
                           text=True, timeout=120)
    assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr[-2000:]


def test_a_refused_claim_releases_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    train(fast("train.steps=2"), run_dir)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_dirs.claim(run_dir)
    assert not run_lock.is_held(run_dir)


def test_only_rank_0_locks(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    outputs.Outputs(run_dir, enabled=False).claim(None)
    assert not (run_dir / run_lock.LOCK_FILE).exists() and not run_lock.is_held(run_dir)


@pytest.mark.slow
def test_two_runs_started_together_in_one_dir_one_runs(tmp_path):
    """Exactly one of two runs started at once in one dir trains; the other is refused: one seed's metrics."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "diffusion_lab.train", *FAST, "train.steps=4", "train.log_every=1",
            f"hydra.run.dir={run_dir}"]
    procs = [subprocess.Popen(args + [f"seed={i}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [err[-1000:] for _, _, err in results]
    refused = next(err for p, _, err in results if p.returncode == 2)
    assert len(error_lines(refused)) == 1 and ("in use by pid" in refused or "already holds a run" in refused)
    winner = next(i for i, (p, _, _) in enumerate(results) if p.returncode == 0)
    assert OmegaConf.load(run_dir / "config.yaml").seed == winner
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_an_uncreatable_run_dir_is_one_line(tmp_path):
    result = train_cli(["train.steps=1", "hydra.run.dir=/proc/nope/run"], tmp_path)
    assert result.returncode == 2 and len(error_lines(result.stderr)) == 1, result.stderr[-2000:]
    assert "/proc/nope/run" in result.stderr and "Traceback" not in result.stderr


def test_an_uncreatable_run_dir_is_one_line_in_the_run(tmp_path):
    with pytest.raises(ConfigError, match="/proc/nope/run cannot be created") as error:
        train(fast("train.steps=1"), tmp_path.parent / "/proc/nope/run")
    assert "\n" not in str(error.value)


def test_a_filesystem_without_locks_runs_with_a_warning(tmp_path, monkeypatch, caplog):
    """flock refused by the filesystem (ENOLCK, Lustre without -o flock) must not stop every run there."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run_dirs.claim(tmp_path / "run")
    run_lock.release(tmp_path / "run")
    assert "cannot be locked (No locks available)" in caplog.text


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked while the run holds its lock; once the run lets go, it is free."""
    run_dir = tmp_path / "run"
    run_dirs.claim(run_dir)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives the run's hold
        os.read(read_end, 1)
        os._exit(0)
    try:
        run_lock.release(run_dir)
        other = subprocess.run([sys.executable, "-c", HOLDER, str(run_dir)], env=ENV, input="",
                               capture_output=True, text=True, timeout=120)
        assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr[-2000:]
    finally:
        os.write(write_end, b"x")
        os.waitpid(child, 0)
