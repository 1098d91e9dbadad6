"""What a command tells its reader: short console lines, and everything it printed, in full, in its run dir's log.

Every command (train, sample, evaluate, sampler_lab, compare, metric_check) calls `log_to(run_dir, name)` once
its run dir is known and then says everything through the `diffusion_lab` logger (`say` for tables), so
`<run dir>/<name>.log` holds every line the console showed, the error line included (`errors.fail`). On a
terminal a loop shows a progress bar; elsewhere (`> file`, SLURM) plain lines, never carriage returns.

A console line is never cut inside a path, a command or a `key=value`: a long message keeps its first
sentence and every sentence that names one of those, drops the other (explaining) sentences and says where
the whole message is.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, TypeVar

from tqdm.auto import tqdm

from .files import first_line

log = logging.getLogger("diffusion_lab")
FILE_ONLY = {"file_only": True}  # `extra=` for a record that only the log file gets (the bar shows it already)
VERBATIM = {"verbatim": True}  # `extra=` for a table line: printed as it is, never shortened
CONSOLE_WIDTH = 160  # longer console messages lose their explaining sentences
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
_ACTIONABLE = re.compile(r"[/\\=`]|\bpython\b|\bwandb sync\b")  # a path, URL, key=value or command
T = TypeVar("T")


def _sentences(message: str) -> List[str]:
    """The message's sentences ('. ' ends one; a path's dots do not), line by line."""
    return [s.strip() for line in message.splitlines() for s in re.split(r"(?<=\.)\s+(?=[A-Z(])", line) if s.strip()]


def shorten(message: str, log_file: Optional[Path], width: int = CONSOLE_WIDTH) -> str:
    """One console line: the message if short, else its first sentence and every sentence naming a path,
    URL, command or key=value (never cut), and where the rest is."""
    if len(message) <= width and "\n" not in message:
        return message
    sentences = _sentences(message)
    kept = sentences[:1] + [s for s in sentences[1:] if _ACTIONABLE.search(s)]
    text = " ".join(kept)
    if len(kept) == len(sentences) or log_file is None:
        return text
    return f"{text.rstrip('.')} (details in {log_file})"


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
            print(f"warning: cannot write {where}: {first_line(sys.exc_info()[1] or OSError())}; its later "
                  f"log lines are lost", file=sys.stderr)


class _LogFile(_OneLineErrors, logging.FileHandler):
    """The command's log file."""


class _Console(_OneLineErrors, logging.Handler):
    """stdout through tqdm.write, so a line never tears a progress bar."""

    def __init__(self, log_file: Optional[Path]):
        super().__init__(logging.INFO)
        self.log_file = log_file
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        text = message if getattr(record, "verbatim", False) else shorten(message, self.log_file)
        tqdm.write(text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}",
                   file=sys.stdout)


def _ours() -> List[logging.Handler]:
    return [h for h in log.handlers if getattr(h, "diffusion_lab", False)]


def close() -> None:
    """Stop writing the current log file (its handlers are closed; the console goes back to plain prints)."""
    for handler in _ours():
        log.removeHandler(handler)
        handler.close()


def log_to(run_dir: Path, name: str) -> Path:
    """Send the `diffusion_lab` logger to `run_dir/<name>.log` (full records, appended) and the console (short
    lines), replacing the handlers of an earlier command in this process. Returns the log file."""
    close()
    log_file = Path(run_dir) / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file = _LogFile(log_file)
    file.setFormatter(logging.Formatter(FORMAT))
    for handler in (file, _Console(log_file)):
        handler.diffusion_lab = True
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # Hydra's root handlers would print every line twice, in their own format
    return log_file


def log_file() -> Optional[Path]:
    """The log file the current command writes, if it has one yet."""
    files = [h.baseFilename for h in _ours() if isinstance(h, logging.FileHandler)]
    return Path(files[0]) if files else None


def info(message: str) -> None:
    """One console line, also in the log file (a plain print before any log file is open)."""
    if _ours():
        log.info(message)
    else:
        print(message)


def say(text: str) -> None:
    """Print text (a table: several lines) as it is, never shortened, and log every line."""
    for line in text.splitlines() or [""]:
        if _ours():
            log.info(line, extra=VERBATIM)
        else:
            print(line)


def record(message: str, level: int = logging.INFO) -> None:
    """Write a line that went to the console some other way (stderr, a signal handler) into the log file only."""
    if _ours():
        log.log(level, message, extra=FILE_ONLY)


def terminal() -> bool:
    return sys.stdout.isatty()


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """Iterate items with a progress bar on a terminal; elsewhere a plain line `desc 2/4` at each quarter
    (nothing for a single item)."""
    if terminal():
        yield from tqdm(items, total=total, desc=desc, dynamic_ncols=True)
        return
    marks = {max(1, round(total * q / 4)) for q in range(1, 5)} if total > 1 else set()
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            info(f"{desc} {done}/{total}")
