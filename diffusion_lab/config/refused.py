"""A refused command leaves no run dir behind.

Hydra creates the run dir (its `.hydra/` files and the job's log) before a command can look at its input. Before
Hydra starts, `plan` notes where the run (or sweep) dir will be and its nearest folder that exists already (the
anchor); a dir below the anchor was made by this command. `remove_unused` removes such a dir when it holds
only Hydra's files and logs, and then its parents that are empty and below the anchor. A dir the user named
that existed before, or one holding anything else, is never touched.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..training.run_lock import LOCK_FILE

_anchor: Optional[Path] = None  # the nearest existing ancestor of the planned run dir, before Hydra started


def plan(path: Optional[Path]) -> None:
    """Before Hydra starts: the run (or sweep) dir this command will get (None: unknown, nothing is removed)."""
    global _anchor
    if path is None:
        _anchor = None
        return
    path = Path(path).absolute()
    _anchor = next(p for p in (path, *path.parents) if p.exists())


def _made_here(path: Path) -> bool:
    return _anchor is not None and _anchor in path.parents


def _unused(run_dir: Path) -> bool:
    """Only Hydra's `.hydra/*.yaml` files, `*.log` files and the run lock."""
    for entry in run_dir.iterdir():
        if entry.is_dir() and entry.name == ".hydra":
            if any(not (f.is_file() and f.suffix == ".yaml") for f in entry.iterdir()):
                return False
        elif not (entry.is_file() and (entry.suffix == ".log" or entry.name == LOCK_FILE)):
            return False
    return True


def removable(run_dir: Path) -> bool:
    """Whether `remove_unused` would remove run_dir: made by this command and holding nothing of a run."""
    run_dir = Path(run_dir).absolute()
    return run_dir.is_dir() and _made_here(run_dir) and _unused(run_dir)


def remove_unused(run_dir: Path) -> bool:
    """Remove run_dir if `removable`, then its empty parents below the anchor; returns whether it was removed."""
    run_dir = Path(run_dir).absolute()
    if not removable(run_dir):
        return False
    shutil.rmtree(run_dir)
    for parent in run_dir.parents:
        if not _made_here(parent) or any(parent.iterdir()):
            break
        parent.rmdir()
    return True
