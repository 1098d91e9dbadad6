"""Files that are never half-written: atomic rewrites, appends that leave a readable file, tolerant readers.

Every rewrite goes to a unique temp file beside the target, is fsynced and renamed over it (readers see the
old file or the new one, never half of one; after a node crash the rename is on disk). An append that fails
(disk full, quota) is cut back to the last whole line. A reader of a JSON-lines file skips a torn line and
names the file, instead of failing on it.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Sequence, Tuple

_UMASK = os.umask(0)
os.umask(_UMASK)


class WriteError(OSError):
    """A file that could not be written; the message is one line naming the file. The old file is intact."""

    def __init__(self, path: Path, cause: BaseException):
        self.path, self.reason = Path(path), first_line(cause)
        super().__init__(f"cannot write {self.path}: {self.reason}")


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temp_files(path: Path) -> None:
    """Delete temp files of `path` left by writers on this host that no longer run (crashed mid-write)."""
    host = socket.gethostname()
    for tmp in path.parent.glob(_temp_prefix(path) + "*.tmp"):
        parts = tmp.name[len(_temp_prefix(path)):].split(".")
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit() or alive(int(parts[1])):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(f) on a temp file beside `path`, fsync it and rename it over `path`; WriteError (one line)
    if that fails, with `path` as it was. Temp files of dead writers on this host are removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp",
                                   prefix=f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}.")
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; run files are shared
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, (OSError, RuntimeError)):  # disk full, quota, vanished folder
            raise WriteError(path, error) from error
        raise
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (written by a library that does not)."""
    for root, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Call fill(folder) on a new temp folder beside `path` and rename it to `path` (which must not exist or be an
    empty folder): readers never see a half-written folder; WriteError (one line) if that fails, the temp removed."""
    import shutil

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, suffix=".tmp",
                                    prefix=f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}."))
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; run files are shared
        fill(tmp)
        fsync_tree(tmp)  # the files' data on disk before the rename makes them visible
        if path.is_dir():
            path.rmdir()  # an empty folder: replaced by the filled one
        os.rename(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, (OSError, RuntimeError)):
            raise WriteError(path, error) from error
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text`, atomically."""
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` as indented JSON, atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_csv(path: Path, rows: Sequence[Dict[str, Any]], fieldnames: Sequence[str]) -> None:
    """Replace `path` with `rows` as CSV (the `fieldnames` columns, others ignored), atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(fieldnames), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def append_line(path: Path, line: str) -> None:
    """Append one line; if that fails, cut the file back to its last whole line (WriteError). Unbuffered: a
    buffered file would write its rest again when closed, after the cut."""
    path, data = Path(path), line.rstrip("\n").encode() + b"\n"
    try:
        f = open(path, "ab", buffering=0)
    except OSError as error:
        raise WriteError(path, error) from error
    with f:
        start = f.tell()
        try:
            written = 0
            while written < len(data):  # a write to a nearly full disk may take only part of the line
                written += f.write(data[written:])
        except OSError as error:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise WriteError(path, error) from error


def read_jsonl(path: Path) -> Tuple[List[Dict[str, Any]], List[str]]:
    """The JSON objects of a JSON-lines file, and one line per line that could not be used (torn, not an
    object), naming the file and line number. A missing file is no rows and no problem."""
    path = Path(path)
    rows: List[Dict[str, Any]] = []
    problems: List[str] = []
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return rows, problems
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            problems.append(f"{path}: line {number} is not a JSON object (a torn write?); skipped")
    return rows, problems
