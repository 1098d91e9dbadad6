"""Preemption: a stop signal finishes the current step (or the FID batch in progress), the run writes last.pt and
exits with 128 + signal. One that arrives after the last step leaves a finished run (exit 0, nothing to resume).

SIGTERM (SLURM and most schedulers before a kill), SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 (submitit's
preemption/timeout warning) all ask for a stop. Exit codes follow the shell convention: 130 SIGINT,
138 SIGUSR1, 140 SIGUSR2, 143 SIGTERM. A second Ctrl-C aborts at once (`Aborted`), without a new checkpoint;
one that arrives while a checkpoint is being written (`shielded`) waits for the write to complete.

Commands that can stop anywhere (`sample`, `evaluate`) use `stop_on_signal` instead: SIGINT or SIGTERM raises
`Stopped` at once, the command may keep what it has (evaluate writes the settings it scored), and the process
ends with one line and 128 + signal.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from typing import Dict, Iterator, NoReturn, Optional

from .. import console

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


COMMAND_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped by `signum`."""
    return 128 + int(signum)


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: the run ends at once; the message (one line) says what was written."""


class Preemption:
    """Context manager: records the first stop signal; the training loop checks `requested` after each step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._writing = 0  # checkpoint writes in progress (see shielded)
        self._abort_after_write = False

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
                if not self._writing:
                    raise Aborted("aborted by a second SIGINT (Ctrl-C); no new checkpoint was written")
                self._abort_after_write = True
                print("\nSIGINT again: aborting once the checkpoint being written is complete", file=sys.stderr)
            return  # already stopping: a scheduler's repeated warning changes nothing
        self.signum = signum
        line = (f"{signal.Signals(signum).name} received: stopping after this step (or FID batch) and writing a "
                "checkpoint" + (" (Ctrl-C again to abort without one)" if signum == signal.SIGINT else ""))
        print(f"\n{line}", file=sys.stderr)
        console.record(line)

    @contextlib.contextmanager
    def shielded(self, what: str) -> Iterator[None]:
        """A checkpoint write that a second Ctrl-C cannot cut in half (torch.save would report the interrupted
        write as a disk error): the write completes, then the run aborts (`Aborted`, naming `what`)."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
        if self._abort_after_write and not self._writing:
            raise Aborted(f"aborted by a second SIGINT (Ctrl-C) after {what} was written")

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


class Stopped(BaseException):
    """A stop signal during a command under `stop_on_signal`; `note` says what the command kept (or "")."""

    def __init__(self, signum: int, note: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.note = signum, note

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _raise_stopped(signum, frame) -> NoReturn:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signal(command: str) -> Iterator[None]:
    """Within: SIGINT or SIGTERM stops `command` by raising `Stopped`; it ends with one line on stderr and
    exit code 128 + signal (no KeyboardInterrupt traceback). The previous handlers are restored after."""
    previous: Dict[int, object] = {}
    try:
        for signum in COMMAND_STOP_SIGNALS:
            previous[signum] = signal.signal(signum, _raise_stopped)
    except ValueError:  # not the main thread: keep the default behaviour
        pass
    try:
        yield
    except Stopped as stopped:
        print(f"{stopped.name} received: {command} stopped" + (f"; {stopped.note}" if stopped.note else ""),
              file=sys.stderr)
        sys.exit(exit_code(stopped.signum))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
