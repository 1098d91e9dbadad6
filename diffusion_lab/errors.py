"""Errors the user sees as one line: a refused config value, and how every command prints it and exits."""
from __future__ import annotations

import sys
from typing import NoReturn


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr (and into the command's log file, when it has one) and exit non-zero."""
    import logging

    from . import console

    console.record(f"error: {message}", logging.ERROR)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def error_line(error: BaseException) -> str:
    """An error as one line; for an error re-raised from a DataLoader worker, the original message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # torch's ExceptionWrapper: the cause is last
        return lines[-1].split(": ", 1)[-1]
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return lines[0]
