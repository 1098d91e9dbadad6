"""No metrics history is ever lost: metrics.jsonl is rewritten atomically and appended in whole lines, a torn
line is skipped with a warning, and a full disk stops the run with one line, keeping the last checkpoint."""
import contextlib
import errno
import json
import logging
import os
import resource
import signal
import subprocess
import sys

import pytest

from diffusion_lab import files
from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint, progress
from diffusion_lab.training.outputs import Outputs
from tests.helpers import REPO, TINY, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none"]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
TORN = '{"step": 7, "loss": 0.12'  # a line cut by a full disk or a kill


def fast(*overrides):
    return compose_config(FAST + list(overrides))


def write_metrics(path, steps):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "pad": "x" * 60}) + "\n" for s in steps))


@contextlib.contextmanager
def file_size_limit(limit):
    """Writes that would grow a file past `limit` bytes fail with EFBIG, as on a full disk (kernel-enforced)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_carry_metrics_cut_off_mid_write_leaves_the_old_file(tmp_path):
    """A resume in the same dir rewrites metrics.jsonl; a write cut off halfway keeps every old line."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    write_metrics(metrics, range(1, 2001))
    before = metrics.read_bytes()
    out = Outputs(tmp_path / "run")
    with file_size_limit(len(before) // 2), pytest.raises(OSError):
        out.carry_metrics(tmp_path / "run", up_to_step=1990)
    assert metrics.read_bytes() == before, "the old history is intact"
    assert not list(metrics.parent.glob("*.tmp")), "the half-written temp file is removed"


def test_carry_metrics_skips_a_torn_line_and_names_the_file(tmp_path, capsys):
    previous = tmp_path / "previous" / "metrics.jsonl"
    write_metrics(previous, range(1, 7))
    with open(previous, "a") as f:
        f.write(TORN)
    progress.log_to(tmp_path)
    Outputs(tmp_path / "new").carry_metrics(previous.parent, up_to_step=6)
    assert [r["step"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert f"{previous}: line 7 is not a JSON object" in capsys.readouterr().out


@pytest.mark.slow
def test_a_resume_skips_a_torn_last_line(tmp_path, capsys):
    first = tmp_path / "first"
    train(fast("train.steps=4", "train.log_every=1"), first)
    with open(first / "metrics.jsonl", "a") as f:  # a full disk cut the last line of a run that then died
        f.write(TORN)
    summary = train(fast("train.steps=6", "train.log_every=1", f"train.resume={first}"), tmp_path / "second")
    assert summary["steps"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "second" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert f"{first / 'metrics.jsonl'}: line 5 is not a JSON object" in capsys.readouterr().out


def test_a_failed_metrics_append_leaves_whole_lines(tmp_path):
    out = Outputs(tmp_path)
    out.open_logger({"seed": 0}, "none", None, name="test")
    out.log({"loss": 1.0}, 1)
    with file_size_limit((tmp_path / "metrics.jsonl").stat().st_size + 10), pytest.raises(files.WriteError) as error:
        out.log({"loss": 0.5, "pad": "x" * 100}, 2)
    assert "metrics.jsonl" in str(error.value) and "\n" not in str(error.value)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1], "no half line is left"


def test_summary_and_config_are_replaced_whole(tmp_path):
    out = Outputs(tmp_path)
    out.open_logger({"seed": 0, "pad": "x" * 1000}, "none", None, name="test")
    config = (tmp_path / "config.yaml").read_bytes()
    with file_size_limit(100), pytest.raises(files.WriteError, match="config.yaml"):
        out.open_logger({"seed": 1, "pad": "y" * 1000}, "none", None, name="test")
    assert (tmp_path / "config.yaml").read_bytes() == config
    out.summary({"steps": 1, "pad": "x" * 1000}, upload_checkpoint=False)
    summary = (tmp_path / "summary.json").read_bytes()
    with file_size_limit(100), pytest.raises(files.WriteError, match="summary.json"):
        out.summary({"steps": 2, "pad": "y" * 1000}, upload_checkpoint=False)
    assert (tmp_path / "summary.json").read_bytes() == summary


def test_a_csv_is_replaced_whole_with_its_columns_only(tmp_path):
    path = tmp_path / "table.csv"
    files.write_csv(path, [{"a": 1, "b": 2, "extra": 3}, {"a": 4, "b": 5}], ["a", "b"])
    assert path.read_text() == "a,b\n1,2\n4,5\n"
    before = path.read_bytes()
    with file_size_limit(100), pytest.raises(files.WriteError, match="table.csv"):
        files.write_csv(path, [{"a": "x" * 1000, "b": 0}], ["a", "b"])
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_log_file_that_cannot_be_written_is_one_line_not_a_traceback(tmp_path, capsys):
    progress.log_to(tmp_path)
    handler = next(h for h in progress.log.handlers if isinstance(h, logging.FileHandler))

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    handler.stream = FullDisk()
    for i in range(5):
        progress.log.info(f"line {i}")
    handler.stream = None
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"warning: cannot write {tmp_path / 'train.log'}: [Errno 28] No space left on device; its later log lines "
        f"are lost"]


# The training command with a disk that fills up at the Nth write to one of its files (metrics.jsonl or
# train.log): that write puts half of its bytes on disk, then it and every later write to either file fail
# with ENOSPC.
FULL_AT_WRITE = """
import builtins, errno, logging, sys
real_open, writes, full = builtins.open, {}, [False]
which, full_at = sys.argv.pop(1), int(sys.argv.pop(1))

class FillsUp:
    def __init__(self, f, name):
        self.f, self.name = f, name
    def __getattr__(self, attr):
        return getattr(self.f, attr)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()
    def write(self, data):
        writes[self.name] = writes.get(self.name, 0) + 1
        if not full[0] and (self.name != which or writes[self.name] < full_at):
            return self.f.write(data)
        full[0] = True
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

def open_(path, mode="r", *args, **kwargs):
    f, name = real_open(path, mode, *args, **kwargs), str(path).rsplit("/", 1)[-1]
    return FillsUp(f, name) if name in ("metrics.jsonl", "train.log") and "a" in mode else f

builtins.open = logging.FileHandler._builtin_open = open_
from diffusion_lab.train import main
main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("which, full_at, lines", [("metrics.jsonl", 5, 2), ("train.log", 5, 2)])
def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_checkpoint(tmp_path, which, full_at, lines):
    """Filled by a metrics line: the error line naming metrics.jsonl, after one warning that train.log (where
    the error line goes too) cannot be written. Filled by a log line (the 5th: step 3's): one warning about
    train.log, then the error at the next metrics line. Never logging's tracebacks; whole metrics lines; the last checkpoint kept."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", FULL_AT_WRITE, which, str(full_at), *FAST, "train.steps=10",
                             "train.log_every=1", "train.checkpoint_every=2", f"hydra.run.dir={run_dir}"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == lines and "metrics.jsonl" in err[-1] and "No space left" in err[-1], result.stderr[-3000:]
    assert "Logging error" not in result.stdout + result.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)), "whole lines only"
    kept = checkpoint.load(run_dir / "checkpoints" / "last.pt")["step"]  # step 2's, or the stop's own
    assert kept in steps and kept >= max(s for s in steps if s % 2 == 0)
