"""What a run tells its reader: a progress bar on a terminal, a plain line every `train.log_every` steps
elsewhere (SLURM, submitit, `> log`), and everything, in full, in the run dir's `train.log`.

All messages go through the `diffusion_lab` logger (`console`): a long message (the Inception weights warning
runs to 400 characters) loses its explaining sentences on the console, never a path or a command.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from .. import console

log = console.log
FILE_ONLY = console.FILE_ONLY
shorten = console.shorten


def log_to(run_dir: Path) -> Path:
    """Send the `diffusion_lab` logger to `run_dir/train.log` (full records) and the console (short lines)."""
    return console.log_to(run_dir, "train")


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
