"""What a run tells its reader: a progress bar on a terminal, a plain line every `train.log_every` steps
elsewhere (SLURM, submitit, `> log`), and everything, in full, in the run dir's `train.log`.

All messages go through the `diffusion_lab` logger. The console shows a long message (the Inception
weights warning runs to 400 characters) as its first sentence and points to `train.log` for the rest.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .. import files

log = logging.getLogger("diffusion_lab")
FILE_ONLY = {"file_only": True}  # `extra=` for a record that only train.log gets (the bar shows it already)
CONSOLE_WIDTH = 160  # longer console messages are cut to their first sentence


def shorten(message: str, log_file: Path, width: int = CONSOLE_WIDTH) -> str:
    """One console line: the message itself if short, else its first sentence and where the rest is."""
    if len(message) <= width and "\n" not in message:
        return message
    first = message.splitlines()[0].split(". ", 1)[0].rstrip(".")
    if len(first) > width:
        first = first[:width - 3] + "..."
    return f"{first} (details in {log_file})"


class _OneLineErrors:
    """A handler whose failed write (a full disk, a closed stdout) is one warning line on stderr, once, instead
    of logging's "--- Logging error ---" traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        where = getattr(self, "baseFilename", "the console")
        with contextlib.suppress(Exception):
            print(f"warning: cannot write {where}: {files.first_line(sys.exc_info()[1] or OSError())}; its later "
                  f"log lines are lost", file=sys.stderr)


class _LogFile(_OneLineErrors, logging.FileHandler):
    """train.log."""


class _Console(_OneLineErrors, logging.Handler):
    """stdout through tqdm.write, so a line never tears the progress bar."""

    def __init__(self, log_file: Path):
        super().__init__(logging.INFO)
        self.log_file = log_file
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record: logging.LogRecord) -> None:
        text = shorten(record.getMessage(), self.log_file)
        tqdm.write(text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}",
                   file=sys.stdout)


def log_to(run_dir: Path) -> Path:
    """Send the `diffusion_lab` logger to `run_dir/train.log` (full records) and the console (short lines),
    replacing the handlers of an earlier run in this process. Returns the log file."""
    for handler in [h for h in log.handlers if getattr(h, "diffusion_lab", False)]:
        log.removeHandler(handler)
        handler.close()
    log_file = Path(run_dir) / "train.log"
    file = _LogFile(log_file)
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    for handler in (file, _Console(log_file)):
        handler.diffusion_lab = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Hydra's root handlers would print every line twice
    return log_file


def eta(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class Progress:
    """The run's progress: `report` at each log point, `update` after each step; a context manager."""

    def __init__(self, total: int, initial: int = 0, terminal: Optional[bool] = None):
        self.total, self.initial = total, initial
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.started = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True,
                        disable=None if self.terminal else True)

    def report(self, step: int, loss: float, lr: float, images_per_s: float) -> str:
        """`step 50/1500 | loss 0.0312 | lr 1.00e-03 | 812 img/s | eta 0:01:23`: a console line off a terminal,
        the bar's postfix on one; train.log gets the line either way."""
        remaining = (time.perf_counter() - self.started) / max(step - self.initial, 1) * (self.total - step)
        line = (f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {images_per_s:.0f} img/s | "
                f"eta {eta(remaining)}")
        if self.terminal:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}", img_s=f"{images_per_s:.0f}")
        log.info(line, extra=FILE_ONLY if self.terminal else None)
        return line

    def update(self) -> None:
        self.bar.update(1)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
