"""One writer per run dir: an exclusive `fcntl.flock` on `<run_dir>/.lock`, taken before the run writes anything.

The kernel drops the lock on every way a process ends (an exception, SIGTERM, SIGKILL, a node's OOM killer), so a
lock is never stale: a requeued job or a resume after a crash takes it over at once. The file holds `pid@host` of
the holder, so a refused second process can say who has the dir. Within one process the lock is re-entrant (the
submitit requeue check and the run both take it); it is released when the last holder lets go, or at exit.
A forked child (DataLoader worker) does not keep the lock. The file itself stays in the dir: removing it would
let two processes lock two different files of one name.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Dict, Iterator, List

from ..errors import ConfigError
from .progress import log

LOCK_FILE = ".lock"

_held: Dict[Path, List[int]] = {}  # resolved run dir -> [file descriptor, holders in this process]


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock files: the lock then ends with this
    process, not with the last worker to notice that its parent died."""
    for fd, _ in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunDirInUse(ConfigError):
    """Another process holds the run dir's lock; the message is one line naming it."""


def holder(run_dir: Path) -> str:
    """`pid 123@host` of the process recorded in the run dir's lock file, or `another process`."""
    with contextlib.suppress(OSError):
        text = (Path(run_dir) / LOCK_FILE).read_text().strip()
        if text:
            return f"pid {text}"
    return "another process"


def acquire(run_dir: Path) -> None:
    """Hold `run_dir`'s lock (creating the dir), or raise RunDirInUse naming the holder. Writes nothing else:
    the holder's pid goes into the lock file with `record`, once the run has decided to write."""
    key = Path(run_dir).resolve()
    if key in _held:
        _held[key][1] += 1
        return
    try:
        key.mkdir(parents=True, exist_ok=True)
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as error:
        raise ConfigError(f"run dir {run_dir} cannot be created or written: {error.strerror or error}") from error
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        os.close(fd)
        raise RunDirInUse(f"run dir {run_dir} is in use by {holder(key)} (its {LOCK_FILE} is locked); wait "
                          f"for that run to end or pick another hydra.run.dir") from error
    except OSError as error:  # a filesystem without flock (Lustre mounted without -o flock): run, unguarded
        log.warning(f"run dir {run_dir} cannot be locked ({error.strerror or error}): nothing stops a second "
                    f"run from writing into it")
    _held[key] = [fd, 1]


def record(run_dir: Path) -> None:
    """Write `pid@host` of this process into the held lock file (the name a refused process shows)."""
    fd = _held[Path(run_dir).resolve()][0]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)


def release(run_dir: Path) -> None:
    """Let go of one hold on `run_dir`'s lock; the last one unlocks it. A dir not held is a no-op."""
    key = Path(run_dir).resolve()
    entry = _held.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _held[key]
        os.close(entry[0])  # closing the only descriptor of the open file drops the flock


def is_held(run_dir: Path) -> bool:
    """Whether this process holds `run_dir`'s lock."""
    return Path(run_dir).resolve() in _held


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """`acquire` for the block, `release` after it, however it ends."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
