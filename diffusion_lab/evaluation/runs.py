"""Training run dirs as `compare` reads them: which dirs are runs, and each one read without trusting a byte.

A training run is a dir holding config.yaml and metrics.jsonl (train writes both before its first step);
`sample` and `evaluate` outputs (a summary.json or fid_vs_cost.json without them) are not runs. A run whose
files cannot be used (a truncated summary.json, a list where an object belongs, a number written as a
string, a config.yaml that is not YAML) is skipped with one line saying why; a torn line of metrics.jsonl is
dropped with one line. config.yaml is read as written: interpolations (`${...}`) stay strings, never resolved.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ..files import first_line, read_jsonl

# keys (and key prefixes) that never tell runs apart; train.teacher is each seed's own teacher run (its kind is in
# the student's schedule and objective.base), so students of the seeds' teachers are one setting
IGNORED = ("logger", "train.resume", "run_name", "device", "train.teacher")
NUMBERS = ("final_loss", "best_fid", "final_fid", "fid_floor", "wall_time_s", "train_images_per_s")
COUNTS = ("steps", "fid_floor_n")
ROW_NUMBERS = ("loss", "fid")  # metrics.jsonl values compare reads


class BadRun(ValueError):
    """A run dir whose files cannot be used; the message is one line saying which file and why."""


@dataclass
class Run:
    """One run dir: its flattened config, metric rows and summary (None when the run never finished)."""

    path: Path
    config: Dict[str, Any]
    metrics: List[Dict]
    summary: Optional[Dict]
    name: str = ""
    problems: List[str] = field(default_factory=list)  # lines of metrics.jsonl that were dropped

    def _from_summary(self, key: str) -> Any:
        return self.summary.get(key) if self.summary else None

    @property
    def final_loss(self) -> Optional[float]:
        if self.summary:
            return self.summary.get("final_loss")
        losses = [r["loss"] for r in self.metrics if r.get("loss") is not None]  # as train.py: the last logged
        return losses[-1] if losses else None

    @property
    def best_fid(self) -> Optional[float]:
        if self.summary:
            return self.summary.get("best_fid")
        return min(self.fid_points()[1], default=None)

    @property
    def final_fid(self) -> Optional[float]:
        if self.summary and "final_fid" in self.summary:
            return self.summary["final_fid"]
        return (self.fid_points()[1] or (None,))[-1]

    @property
    def fid_floor(self) -> Optional[float]:
        return self._from_summary("fid_floor")

    @property
    def steps(self) -> Optional[int]:
        if self.summary:
            return self.summary.get("steps")
        return max((r["step"] for r in self.metrics if "step" in r), default=None)

    @property
    def wall_time_s(self) -> Optional[float]:
        return self._from_summary("wall_time_s")

    @property
    def train_images_per_s(self) -> Optional[float]:
        return self._from_summary("train_images_per_s")

    @property
    def fid_label(self) -> Optional[str]:
        return self._from_summary("fid_label")

    @property
    def note(self) -> str:
        if self.summary is None:
            return "no summary.json"
        return "interrupted" if self.summary.get("interrupted") else ""

    def loss_points(self):
        points = [(r["step"], r["loss"]) for r in self.metrics if r.get("loss") is not None]
        return tuple(zip(*points)) if points else ((), ())

    def fid_points(self):
        points = [(r["step"], r["fid"]) for r in self.metrics if r.get("fid") is not None]
        if not points and self.summary:
            points = [tuple(p) for p in self.summary.get("fid_history") or []]
        return tuple(zip(*points)) if points else ((), ())


@dataclass
class Skipped:
    """A dir that looked like a run but could not be read, and why (one line)."""

    path: Path
    reason: str


@dataclass
class Found:
    """What a search found: the runs, the run dirs that were skipped, and how many dirs held only a
    summary.json (sample or evaluate outputs, or runs without config.yaml + metrics.jsonl: not counted)."""

    runs: List[Run]
    skipped: List[Skipped]
    not_runs: int = 0


def flatten(tree: Dict, prefix: str = "") -> Dict[str, Any]:
    """Dotted keys; a group's `name` becomes the group's own key (`schedule.name` -> `schedule`)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        elif key == "name" and prefix:
            flat[prefix[:-1]] = value
        else:
            flat[dotted] = value
    return {k: v for k, v in flat.items() if not ignored(k)}


def under(key: str, prefixes: Sequence[str]) -> bool:
    """Whether dotted `key` is one of `prefixes` or lies below one (`data.root` is under `data`)."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def ignored(key: str) -> bool:
    return under(key, IGNORED)


def is_number(value: Any) -> bool:
    """An int or float (NaN and inf included: a diverged run may log them), not a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, file: str, key: str, value: Any, wanted: str) -> None:
    if not ok:
        raise BadRun(f"{file}: {key} is {json.dumps(value, default=str)[:40]}, not {wanted}")


def check_summary(summary: Any) -> Dict[str, Any]:
    """summary.json's content when every value compare reads has its type, else BadRun naming the key."""
    if not isinstance(summary, dict):
        raise BadRun(f"summary.json holds a JSON {type(summary).__name__}, not an object")
    for key in NUMBERS:
        _check(summary.get(key) is None or is_number(summary[key]), "summary.json", key, summary.get(key), "a number")
    for key in COUNTS:
        value = summary.get(key)
        _check(value is None or (isinstance(value, int) and not isinstance(value, bool)), "summary.json", key,
               value, "a whole number")
    history = summary.get("fid_history") or []
    _check(isinstance(history, list) and all(isinstance(p, list) and len(p) == 2 and all(map(is_number, p))
                                             for p in history), "summary.json", "fid_history", history,
           "a list of [step, fid] pairs")
    for key, kind, wanted in (("fid_label", str, "a string"), ("interrupted", bool, "true or false"),
                              ("overrides", list, "a list")):
        _check(summary.get(key) is None or isinstance(summary[key], kind), "summary.json", key, summary.get(key), wanted)
    return summary


def read_summary(path: Path) -> Optional[Dict[str, Any]]:
    """The checked summary.json of a run dir, or None when there is none."""
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:  # truncated, empty, not text
        raise BadRun(f"summary.json is not valid JSON (a truncated write?): {first_line(error)}") from error
    return check_summary(summary)


def read_config(path: Path) -> Dict[str, Any]:
    """config.yaml flattened, its interpolations left as the strings they are (never resolved)."""
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml errors, omegaconf's own, undecodable bytes: all mean "not a config"
        raise BadRun(f"config.yaml is not a valid config: {first_line(error)}") from error
    if not isinstance(config, DictConfig):
        raise BadRun(f"config.yaml holds a {type(config).__name__}, not a mapping")
    tree = OmegaConf.to_container(config, resolve=False)
    if not isinstance(tree.get("train"), dict):
        raise BadRun("config.yaml has no train section: not a training run")
    return flatten(tree)


def usable_row(row: Dict[str, Any]) -> bool:
    """A metrics row with a whole-number step and, where present, numeric loss and FID."""
    step = row.get("step")
    return isinstance(step, int) and not isinstance(step, bool) and all(
        row.get(k) is None or is_number(row[k]) for k in ROW_NUMBERS)


def read_metric_rows(path: Path) -> tuple:
    """(usable rows, one line per dropped line) of metrics.jsonl."""
    rows, problems = read_jsonl(path)
    usable = [r for r in rows if usable_row(r)]
    if len(usable) < len(rows):
        problems.append(f"{path}: {len(rows) - len(usable)} row(s) without a whole-number step or with a "
                        f"non-numeric loss/fid; skipped")
    return usable, problems


def load_run(path: Path) -> Run:
    """The run in `path` (config.yaml, metrics.jsonl, summary.json if finished); BadRun if unusable."""
    summary = read_summary(path / "summary.json")
    config = read_config(path / "config.yaml")
    rows, problems = read_metric_rows(path / "metrics.jsonl")
    return Run(path, config, rows, summary, problems=problems)


def find_run_dirs(paths: Sequence[Path]) -> tuple:
    """(run dirs, number of dirs with only a summary.json) under `paths`, each dir once."""
    found, not_runs = {}, 0
    for root in map(Path, paths):
        if not root.is_dir():
            raise FileNotFoundError(f"not a directory: {root}")
        for dirpath, _, files in os.walk(root):
            if {"metrics.jsonl", "config.yaml"} <= set(files):
                found.setdefault(Path(dirpath).resolve(), Path(dirpath))
            elif "summary.json" in files:
                not_runs += 1
    return sorted(found.values()), not_runs


def scan(paths: Sequence[Path]) -> Found:
    """Every training run under `paths`, read; the dirs that could not be read, each with its reason."""
    dirs, not_runs = find_run_dirs(paths)
    runs, skipped = [], []
    for path in dirs:
        try:
            runs.append(load_run(path))
        except (BadRun, OSError) as error:
            skipped.append(Skipped(path, first_line(error)))
    name_runs(runs)
    return Found(runs, skipped, not_runs)


def name_runs(runs: List[Run]) -> None:
    """Short ids: the path below the runs' common parent, Hydra job dirs `3_schedule=...` shortened to `3`."""
    if not runs:
        return
    common = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    for run in runs:
        rel = run.path.resolve().relative_to(common.parent if len(runs) == 1 else common)
        parts = list(rel.parts) or [run.path.name]
        job = parts[-1].split("_", 1)[0]
        run.name = "/".join(parts[:-1] + [job if job.isdigit() else parts[-1]])
