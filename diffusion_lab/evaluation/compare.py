"""`python -m diffusion_lab.compare SWEEP_DIR [MORE_DIRS...]`: tables and two plots for a set of runs.

Finds every run dir under the given paths and shows only the config values that differ between them. Runs
that differ only in `seed` are one setting: the settings table gives mean +- standard error and n of best
FID, final FID and final loss, sorted by best FID, and says which differences between settings are beyond
seed noise (Welch's t-test). A per-run table follows. images/s counts training steps only. Writes
compare_loss.png, compare_fid.png (with the noise floor) and compare.csv (one row per run).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml
from omegaconf import OmegaConf

from ..config.early import CommandParser
from .plots import plot_curves, read_metrics, smooth

IGNORED = ("logger", "train.resume", "run_name", "device")  # keys (and key prefixes) that never tell runs apart
METRICS = ("best_fid", "final_fid", "final_loss")
RESULTS = {"final loss": "final_loss", "best FID": "best_fid", "final FID": "final_fid", "FID floor": "fid_floor",
           "steps": "steps", "wall time": "wall_time_s", "images/s": "train_images_per_s"}  # header -> Run attribute
SEED = "seed"  # runs that differ only in this key are one setting
ALPHA = 0.05  # significance level of the Welch's t-tests between settings
SMOOTH_ABOVE = 50  # loss curves with more points than this are EMA-smoothed


@dataclass
class Run:
    """One run dir: its flattened config, metric rows and summary (None when the run never finished)."""

    path: Path
    config: Dict[str, Any]
    metrics: List[Dict]
    summary: Optional[Dict]
    name: str = ""

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
    return {k: v for k, v in flat.items() if not _ignored(k)}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED)


def from_overrides(overrides: Sequence[str]) -> Dict[str, Any]:
    """Config values named on the command line (`schedule=linear`, `model.dropout=0.1`), parsed like YAML."""
    values = {}
    for item in overrides:
        key, _, value = item.lstrip("+~").partition("=")
        try:
            values[key] = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            values[key] = value
    return {k: v for k, v in values.items() if not _ignored(k)}


def load_run(path: Path) -> Run:
    summary_path, config_path = path / "summary.json", path / "config.yaml"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if config_path.is_file():
        config = flatten(OmegaConf.to_container(OmegaConf.load(config_path), resolve=True))
    else:
        config = from_overrides((summary or {}).get("overrides") or [])
    return Run(path, config, read_metrics(path / "metrics.jsonl"), summary)


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every dir under `paths` with a summary.json, or metrics.jsonl + config.yaml (a run that did not finish)."""
    found = {}
    for root in map(Path, paths):
        if not root.is_dir():
            raise FileNotFoundError(f"not a directory: {root}")
        for dirpath, _, files in os.walk(root):
            if "summary.json" in files or {"metrics.jsonl", "config.yaml"} <= set(files):
                found.setdefault(Path(dirpath).resolve(), Path(dirpath))
    runs = [load_run(path) for path in sorted(found.values())]
    _name_runs(runs)
    return runs


def _name_runs(runs: List[Run]) -> None:
    """Short ids: the path below the runs' common parent, Hydra job dirs `3_schedule=...` shortened to `3`."""
    if not runs:
        return
    common = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    for run in runs:
        rel = run.path.resolve().relative_to(common.parent if len(runs) == 1 else common)
        parts = list(rel.parts) or [run.path.name]
        job = parts[-1].split("_", 1)[0]
        run.name = "/".join(parts[:-1] + [job if job.isdigit() else parts[-1]])


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing_keys(runs: Sequence[Run]) -> List[str]:
    """Config keys whose values are not all equal, in config order (a group's own options left out when the
    group itself differs: `schedule.s` only exists because `schedule` = cosine)."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    differ = [k for k in keys if len({(k in run.config, _key(run.config.get(k))) for run in runs}) > 1]
    groups = set(differ)
    return [k for k in differ
            if not (any(k.startswith(g + ".") for g in groups) and any(k not in r.config for r in runs))]


def _sort(runs: Sequence[Run], metric: str) -> List[Run]:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    return sorted(runs, key=lambda r: (getattr(r, metric) is None, getattr(r, metric) or 0.0))


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _show(value: Any, fmt: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return format(value, fmt)


def _aligned(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(columns, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [columns, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


FORMATS = {"final loss": ".4f", "best FID": ".4g", "final FID": ".4g", "FID floor": ".4g", "images/s": ".0f"}


def table(runs: Sequence[Run], keys: Sequence[str], metric: str = "best_fid") -> str:
    """Aligned plain-text table: run id, differing keys, results; sorted by `metric`, missing values last."""
    columns = ["run", *keys, *RESULTS, *(["note"] if any(r.note for r in runs) else [])]
    rows = []
    for run in _sort(runs, metric):
        row = [run.name, *(_show(run.config.get(k)) for k in keys)]
        row += [_duration(run.wall_time_s) if h == "wall time" else _show(getattr(run, a), FORMATS.get(h, ""))
                for h, a in RESULTS.items()]
        rows.append(row + ([run.note or ""] if "note" in columns else []))
    return _aligned(columns, rows)


@dataclass
class Setting:
    """Runs with the same config apart from `seed`."""

    values: Dict[str, Any]
    runs: List[Run]

    def sample(self, metric: str) -> np.ndarray:
        return np.array([v for v in (getattr(r, metric) for r in self.runs) if v is not None], dtype=float)

    def stats(self, metric: str) -> Tuple[Optional[float], Optional[float], int]:
        """(mean, standard error of the mean, n); the error is None below two values."""
        x = self.sample(metric)
        if len(x) == 0:
            return None, None, 0
        se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else None
        return float(x.mean()), se, len(x)

    def name(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.values.items()) or "all runs"


def settings(runs: Sequence[Run], keys: Sequence[str], pool: Sequence[str] = ()) -> List[Setting]:
    """The finished runs grouped by their values of `keys` other than `seed` and `pool`, in order of first
    appearance (an unfinished or interrupted run had another budget: it stays in the per-run table only).
    Pooling a key tests the other factors averaged over it, which assumes the two do not interact."""
    keys = [k for k in keys if k != SEED and k not in pool]
    groups: Dict[str, Setting] = {}
    for run in (r for r in runs if not r.note):
        values = {k: run.config.get(k) for k in keys}
        groups.setdefault(_key(values), Setting(values, [])).runs.append(run)
    return list(groups.values())


def welch(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Two-sided p-value of Welch's t-test (unequal variances); None when a side has fewer than two values."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    p = stats.ttest_ind(a, b, equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def _mean_se(stats: Tuple[Optional[float], Optional[float], int], fmt: str) -> str:
    mean, se, _ = stats
    if mean is None:
        return "-"
    return format(mean, fmt) + (f" ± {se:{fmt}}" if se is not None else "")


def settings_table(groups: Sequence[Setting], metric: str = "best_fid") -> str:
    """One row per setting: its values, n, mean ± s.e. of each metric, mean steps/s; sorted by `metric`."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, not {metric!r}")
    keys = list(groups[0].values) if groups else []
    heads = {"best FID": "best_fid", "final FID": "final_fid", "final loss": "final_loss"}
    ordered = sorted(groups, key=lambda g: (g.stats(metric)[0] is None, g.stats(metric)[0] or 0.0))
    rows = []
    for g in ordered:
        row = [_show(g.values[k]) for k in keys] + [str(len(g.runs))]
        row += [_mean_se(g.stats(a), FORMATS[h]) for h, a in heads.items()]
        row += [_show(g.stats("fid_floor")[0], ".4g"), _show(g.stats("train_images_per_s")[0], ".0f")]
        rows.append(row)
    return _aligned([*keys, "n", *(f"{h} (mean ± s.e.)" for h in heads), "FID floor", "images/s"], rows)


def noise_statements(groups: Sequence[Setting], metric: str = "best_fid", alpha: float = ALPHA) -> List[str]:
    """Plain statements of which settings differ in `metric` beyond seed noise: Welch's t-test per pair."""
    if len(groups) < 2:
        return []
    lines = [f"{metric}: Welch's t-test per pair of settings (two-sided, alpha {alpha}, no correction for "
             f"{len(groups) * (len(groups) - 1) // 2} comparisons):"]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            p = welch(a.sample(metric), b.sample(metric))
            if p is None:
                verdict = "cannot tell: needs at least 2 seeds on each side"
            else:
                verdict = f"{'different' if p < alpha else 'within noise'} (p={p:.3g})"
            lines.append(f"  {a.name()}  vs  {b.name()}: {verdict}")
    return lines


def fid_labels(runs: Sequence[Run]) -> List[str]:
    """What the FID numbers mean: one line when all runs agree, else one per run."""
    labelled = [(r.name, r.fid_label) for r in runs if r.fid_label]
    if not labelled:
        return []
    if len({label for _, label in labelled}) == 1:
        return [f"FID = {labelled[0][1]}"]
    return [f"FID of run {name} = {label}" for name, label in labelled]


def _labels(runs: Sequence[Run], keys: Sequence[str]) -> List[str]:
    """Plot legend per run: `key=value` of the differing keys, keys shortened to their last part when unique."""
    last = [k.split(".")[-1] for k in keys]
    short = [s if last.count(s) == 1 else k for k, s in zip(keys, last)]
    labels = [", ".join(f"{s}={_show(r.config.get(k))}" for k, s in zip(keys, short)) for r in runs]
    if not all(labels) or len(set(labels)) < len(runs):  # no keys, or runs that differ in no key: add the id
        labels = [f"{r.name}: {label}" if label else r.name for r, label in zip(runs, labels)]
    return labels


def floors(runs: Sequence[Run]) -> Dict[str, float]:
    """{legend: value} of the distinct noise floors of the runs' FIDs."""
    found = {(r.fid_floor, (r.summary or {}).get("fid_floor_n")) for r in runs if r.fid_floor is not None}
    return {f"floor (real train images, n={n})": v for v, n in sorted(found, key=str)}


def plot(runs: Sequence[Run], keys: Sequence[str], out: Path) -> List[Path]:
    """compare_loss.png always; compare_fid.png when some run has FID."""
    labels = _labels(runs, keys)
    smoothed = any(len(r.loss_points()[0]) > SMOOTH_ABOVE for r in runs)
    curves = {}
    for label, run in zip(labels, runs):
        steps, losses = run.loss_points()
        values = smooth(losses) if smoothed else losses
        curves[label] = [{"step": s, "loss": v} for s, v in zip(steps, values)]
    title = "training loss" + (" (moving average)" if smoothed else "")
    written = [plot_curves(curves, "loss", out / "compare_loss.png", title, log_y=True)]
    fids = {label: [{"step": s, "fid": v} for s, v in zip(*r.fid_points())] for label, r in zip(labels, runs)}
    if any(fids.values()):
        said = fid_labels(runs)
        title = said[0].removeprefix("FID = ") if len(said) == 1 else "FID (see the table)"
        written.append(plot_curves(fids, "fid", out / "compare_fid.png", title, floors=floors(runs)))
    return written


def write_csv(runs: Sequence[Run], keys: Sequence[str], metric: str, path: Path) -> Path:
    """The table with raw numbers (result columns named as in summary.json), plus each run's directory."""
    columns = ["run", *keys, *RESULTS.values(), *(["note"] if any(r.note for r in runs) else [])]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*columns, "run_dir"])
        for run in _sort(runs, metric):
            values = [run.name, *("" if run.config.get(k) is None else _show(run.config[k]) for k in keys)]
            values += ["" if getattr(run, a) is None else getattr(run, a) for a in RESULTS.values()]
            writer.writerow(values + ([run.note] if "note" in columns else []) + [str(run.path.resolve())])
    return Path(path)


def compare(paths: Sequence[Path], out: Optional[Path] = None, metric: str = "best_fid",
            pool: Sequence[str] = ()) -> Dict[str, Any]:
    """Print the settings table, the noise statements, the per-run table and the FID label; write plots and
    csv into `out` (default: the first path)."""
    runs = find_runs(paths)
    if not runs:
        where = ", ".join(map(str, paths))
        raise FileNotFoundError(f"no runs (summary.json, or metrics.jsonl + config.yaml) under {where}")
    keys = differing_keys(runs)
    out = Path(out or paths[0])
    out.mkdir(parents=True, exist_ok=True)
    groups = settings(runs, keys, pool)
    summary_text = settings_table(groups, metric)
    statements = noise_statements(groups, metric)
    text = table(runs, keys, metric)
    left_out = sum(1 for r in runs if r.note)
    note = [f"({left_out} unfinished or interrupted run(s) left out of the settings above)"] if left_out else []
    note += [f"(pooled over {', '.join(pool)}: runs that differ in it count as one setting)"] if pool else []
    print("\n".join([summary_text, *note, "", *statements, *([""] if statements else []), text]))
    for line in fid_labels(runs):
        print(line)
    plots = plot(runs, keys, out)
    if len(plots) == 1:
        print("no run has FID values: compare_fid.png skipped")
    csv_path = write_csv(runs, keys, metric, out / "compare.csv")
    print(f"wrote {', '.join(p.name for p in [*plots, csv_path])} to {out}")
    return {"table": text, "settings_table": summary_text, "statements": statements, "settings": groups,
            "fid_labels": fid_labels(runs), "plots": plots, "csv": csv_path, "runs": runs}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = CommandParser("python -m diffusion_lab.compare", "tables and two plots for a set of runs (settings with "
                           "mean +- s.e. over seeds, a per-run table, compare_loss.png, compare_fid.png, compare.csv).",
                           ["SWEEP_DIR [MORE_DIRS...]  (sweep dirs, run dirs, or any dir above them)",
                            "--metric final_loss  (sort and test by another metric than best_fid)",
                            "--pool model.dropout  (pool over a key like over seeds)"])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs, run dirs, or any dir above them")
    parser.add_argument("--out", type=Path, help="where the plots and compare.csv go (default: the first path)")
    parser.add_argument("--metric", choices=METRICS, default="best_fid",
                        help="sort by this and test it between settings (losses of different schedules or "
                             "objectives are not comparable)")
    parser.add_argument("--pool", help="comma-separated config keys to pool over like seeds, e.g. model.dropout to "
                                       "test the schedule across dropout values")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out, args.metric, [k for k in (args.pool or "").split(",") if k])
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
