"""Preemption: a stop signal finishes the current step, the run writes last.pt and exits with 128 + signal.

SIGTERM (SLURM and most schedulers before a kill), SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (submitit's
preemption/timeout warning) all ask for a stop. Exit codes follow the shell convention: 130 SIGINT,
138 SIGUSR1, 140 SIGUSR2, 143 SIGTERM. A second Ctrl-C aborts at once, without a checkpoint.
"""
from __future__ import annotations

import signal
import sys
from typing import Dict, NoReturn, Optional

from .. import console

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped by `signum`."""
    return 128 + int(signum)


class Preemption:
    """Context manager: records the first stop signal; the training loop checks `requested` after each step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "Preemption":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (some launchers): keep the default behaviour
                break
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT and self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            return  # already stopping: a scheduler's repeated warning changes nothing
        self.signum = signum
        line = (f"{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint"
                + (" (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""))
        print(f"\n{line}", file=sys.stderr)
        console.record(line)

    def __exit__(self, *exc) -> bool:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
        return False

    def exit(self) -> NoReturn:
        """Hand the signal on to a launcher's own handler (submitit requeues on SIGUSR2), else exit 128 + signal."""
        handler = signal.getsignal(self.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.signum, None)
        sys.exit(exit_code(self.signum))
