"""`python -m diffusion_lab.compare SWEEP_DIR [MORE_DIRS...]`: tables and plots for a set of training runs.

Finds every training run dir (config.yaml + metrics.jsonl) under the given paths; a dir whose files cannot
be used is listed as skipped with its reason. Runs are grouped by what their numbers mean (FID label and
data config): a group is never ranked or tested against another. Within a group only the config values that
differ are shown (as written in config.yaml, interpolations unresolved). Runs that differ only in `seed` are one
setting: the settings table gives mean +- standard error and n of best
FID, final FID and final loss, sorted by best FID, and says which differences between settings are beyond
seed noise (Welch's t-test). A per-run table follows. images/s counts training steps only. Writes
compare_loss.png, compare_fid.png (with the noise floor; one per group) and compare.csv (one row per run).
`evaluate` dirs found under the same paths add FID against model evaluations over seeds (evaluation/cost.py):
a table with 95% intervals, Welch's t-tests at each NFE, compare_fid_vs_nfe.png and compare_nfe.csv.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import console
from ..config.early import CommandParser
from ..errors import fail
from ..files import first_line, write_text
from . import cost
from .plots import plot_curves, smooth
from .runs import Found, Run, scan, under
from .seeds import welch

METRICS = ("best_fid", "final_fid", "final_loss")
RESULTS = {"final loss": "final_loss", "best FID": "best_fid", "final FID": "final_fid", "FID floor": "fid_floor",
           "steps": "steps", "wall time": "wall_time_s", "images/s": "train_images_per_s"}  # header -> Run attribute
SEED = "seed"  # runs that differ only in this key are one setting
ALPHA = 0.05  # significance level of the Welch's t-tests between settings
SMOOTH_ABOVE = 50  # loss curves with more points than this are EMA-smoothed
DATA = ("data",)  # config keys (and prefixes) that decide what the images and the FID reference are
TRAINING_ONLY = ("sampler", "eval", "logger", "guidance")  # what a training run samples and logs with, not what evaluate scores
FID_CONFIG = (*DATA, "eval.mode", "eval.feature_extractor", "eval.num_samples", "eval.reference", "eval.fallback")


def find_runs(paths: Sequence[Path]) -> List[Run]:
    """Every training run under `paths` that could be read (see `runs.scan` for the ones that could not)."""
    return scan(paths).runs


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


@dataclass
class Comparable:
    """Runs whose numbers measure the same thing: one FID label (mode, extractor, sample count, reference)
    and one data config. Runs of different groups are never ranked in one column nor tested against each other."""

    label: Optional[str]
    runs: List[Run]
    title: str = ""


def _config_part(run: Run, prefixes: Sequence[str]) -> str:
    return _key({k: v for k, v in run.config.items() if under(k, prefixes)})


def comparable(runs: Sequence[Run]) -> List[Comparable]:
    """The runs grouped by (FID label, data config), in order of first appearance. A run without a label (it
    did not finish, or FID was off) takes the label of the finished runs with the same data and eval config
    when they agree on one; otherwise it stands with the runs of its own data and eval config."""
    labels: Dict[str, set] = {}
    for run in runs:
        if run.fid_label:
            labels.setdefault(_config_part(run, FID_CONFIG), set()).add(run.fid_label)
    groups: Dict[Tuple[Optional[str], str], Comparable] = {}
    for run in runs:
        known = labels.get(_config_part(run, FID_CONFIG), set())
        label = run.fid_label or (next(iter(known)) if len(known) == 1 else None)
        key = (label, _config_part(run, DATA if label else FID_CONFIG))
        groups.setdefault(key, Comparable(label, [])).runs.append(run)
    found = list(groups.values())
    _name_groups(found)
    return found


def _name_groups(groups: Sequence[Comparable]) -> None:
    """Each group's title: its FID label and the data / eval values, fixed within it, that set it apart."""
    runs = [r for g in groups for r in g.runs]
    fixed = [k for k in differing_keys(runs) if under(k, FID_CONFIG)]
    apart = [k for k in fixed if all(len({_key(r.config.get(k)) for r in g.runs}) == 1 for g in groups)]
    for group in groups:
        values = ", ".join(f"{k}={_show(group.runs[0].config.get(k))}" for k in apart)
        group.title = "; ".join(filter(None, [f"FID = {group.label}" if group.label else "no FID label", values]))


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


def plot(runs: Sequence[Run], groups: Sequence[Comparable], keys: Sequence[str], out: Path) -> List[Path]:
    """compare_loss.png always; compare_fid.png when some run has FID, one compare_fid_N.png per group
    (numbered from 1, in the order printed) when the runs' FIDs do not all mean the same thing."""
    labels = dict(zip((id(r) for r in runs), _labels(runs, keys)))
    smoothed = any(len(r.loss_points()[0]) > SMOOTH_ABOVE for r in runs)
    curves = {}
    for run in runs:
        steps, losses = run.loss_points()
        values = smooth(losses) if smoothed else losses
        curves[labels[id(run)]] = [{"step": s, "loss": v} for s, v in zip(steps, values)]
    title = "training loss" + (" (moving average)" if smoothed else "")
    written = [plot_curves(curves, "loss", out / "compare_loss.png", title, log_y=True)]
    for number, group in enumerate(groups, start=1):
        fids = {labels[id(r)]: [{"step": s, "fid": v} for s, v in zip(*r.fid_points())] for r in group.runs}
        if any(fids.values()):
            name = "compare_fid.png" if len(groups) == 1 else f"compare_fid_{number}.png"
            title = group.title.removeprefix("FID = ")
            written.append(plot_curves(fids, "fid", out / name, title, floors=floors(group.runs)))
    return written


def write_csv(groups: Sequence[Comparable], keys: Sequence[str], metric: str, path: Path) -> Path:
    """The table with raw numbers (result columns named as in summary.json), each run's FID label (its group's)
    and directory; the rows of one group together, each group sorted by `metric`."""
    runs = [r for g in groups for r in g.runs]
    columns = ["run", *keys, *RESULTS.values(), *(["note"] if any(r.note for r in runs) else [])]
    rows = []
    for group in groups:
        for run in _sort(group.runs, metric):
            values = [run.name, *("" if run.config.get(k) is None else _show(run.config[k]) for k in keys)]
            values += ["" if getattr(run, a) is None else getattr(run, a) for a in RESULTS.values()]
            rows.append(values + ([run.note] if "note" in columns else []) + [group.label or "", str(run.path.resolve())])
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([*columns, "fid_label", "run_dir"])
    writer.writerows(rows)
    write_text(path, text.getvalue())
    return Path(path)


def report(runs: Sequence[Run], metric: str = "best_fid", pool: Sequence[str] = ()) -> Dict[str, Any]:
    """One group's settings table, noise statements and per-run table, and the text that shows them."""
    keys = differing_keys(runs)
    groups = settings(runs, keys, pool)
    summary_text = settings_table(groups, metric)
    statements = noise_statements(groups, metric)
    text = table(runs, keys, metric)
    left_out = sum(1 for r in runs if r.note)
    note = [f"({left_out} unfinished or interrupted run(s) left out of the settings above)"] if left_out else []
    note += [f"(pooled over {', '.join(pool)}: runs that differ in it count as one setting)"] if pool else []
    shown = "\n".join([summary_text, *note, "", *statements, *([""] if statements else []), text])
    return {"table": text, "settings_table": summary_text, "statements": statements, "settings": groups, "text": shown}


def found_lines(found: Found) -> List[str]:
    """One line per skipped run dir and per dropped metrics line, and the count of dirs that are not runs."""
    lines = [f"skipped {s.path}: {s.reason}" for s in found.skipped]
    lines += [f"warning: {problem}" for run in found.runs for problem in run.problems]
    if found.not_runs:
        lines.append(f"({found.not_runs} dir(s) with a summary.json but no config.yaml + metrics.jsonl, e.g. sample "
                     f"outputs, are not training runs: not counted)")
    return lines


def cost_report(evaluations: Sequence[cost.Evaluation], out: Path) -> Dict[str, Any]:
    """FID against NFE over seeds of the evaluate dirs: per FID label a table, the noise statements and a plot
    (compare_fid_vs_nfe.png, numbered when labels differ); compare_nfe.csv with every FID."""
    keys = [k for k in differing_keys([ev.run for ev in evaluations]) if k != SEED and not under(k, TRAINING_ONLY)]
    last = [k.split(".")[-1] for k in keys]
    short = [s if last.count(s) == 1 else k for k, s in zip(keys, last)]  # keys by their last part when unique
    by_label = cost.points(evaluations, lambda run: ", ".join(f"{s}={_show(run.config.get(k))}"
                                                              for k, s in zip(keys, short)))
    texts, plots = [], []
    for number, (label, found) in enumerate(by_label.items(), start=1):
        lines = cost.statements(found)
        texts.append("\n".join([f"== FID against model evaluations: FID = {label or 'no label'} ==",
                                 cost.table(found), "", f"Welch's t-test against the lowest mean at each NFE "
                                 f"(two-sided, alpha {cost.ALPHA}, no correction for multiple comparisons):", *lines]))
        name = "compare_fid_vs_nfe.png" if len(by_label) == 1 else f"compare_fid_vs_nfe_{number}.png"
        floors = [ev.floor for ev in evaluations if ev.label == label and ev.floor is not None]
        plots.append(cost.plot(found, floors, out / name, label))
        console.say(texts[-1] + "\n")
    csv_path = cost.write_csv(by_label, out / "compare_nfe.csv")
    return {"points": by_label, "text": "\n\n".join(texts), "plots": plots, "csv": csv_path}


def _train_report(found: Found, out: Path, metric: str, pool: Sequence[str]) -> Dict[str, Any]:
    """The training runs' settings tables, noise statements, per-run tables, plots and compare.csv."""
    runs, groups = found.runs, comparable(found.runs)
    reports = [report(g.runs, metric, pool) for g in groups]
    for group, shown in zip(groups, reports):
        console.say("\n".join([f"== {group.title} ({len(group.runs)} runs) ==", shown["text"], ""] if len(groups) > 1
                               else [shown["text"], *fid_labels(runs)]))
    if len(groups) > 1:
        console.info(f"{len(groups)} groups whose FIDs or data differ: runs of different groups are not compared")
    keys = differing_keys(runs)
    plots = plot(runs, groups, keys, out)
    if len(plots) == 1:
        console.info("no run has FID values: compare_fid.png skipped")
    csv_path = write_csv(groups, keys, metric, out / "compare.csv")
    return {"table": "\n\n".join(r["table"] for r in reports),
            "settings_table": "\n\n".join(r["settings_table"] for r in reports),
            "statements": [line for r in reports for line in r["statements"]],
            "settings": [s for r in reports for s in r["settings"]], "groups": groups, "reports": reports,
            "fid_labels": fid_labels(runs), "plots": plots, "csv": csv_path, "runs": runs}


def compare(paths: Sequence[Path], out: Optional[Path] = None, metric: str = "best_fid",
            pool: Sequence[str] = ()) -> Dict[str, Any]:
    """Print the skipped dirs, then per group of comparable runs the settings table, the noise statements and
    the per-run table, and the FID label; then, for `evaluate` dirs, FID against NFE over seeds; write plots and
    csv files into `out` (default: the first path)."""
    found = scan(paths)
    evaluations, unread = cost.find_evaluations(paths, found.runs)
    out = Path(out or paths[0])
    if found.runs or evaluations:
        out.mkdir(parents=True, exist_ok=True)
        console.log_to(out, "compare")  # compare.log: every line printed here
    for line in found_lines(found) + [f"skipped {s.path}: {s.reason}" for s in unread]:
        console.info(line)
    if not found.runs and not evaluations:
        where = ", ".join(map(str, paths))
        skipped = len(found.skipped) + len(unread)
        raise FileNotFoundError(f"no training runs (config.yaml + metrics.jsonl) or evaluate results ({cost.RESULT}) "
                                f"under {where}" + (f" ({skipped} skipped, see above)" if skipped else ""))
    result = {"table": "", "settings_table": "", "statements": [], "settings": [], "groups": [], "reports": [],
              "fid_labels": [], "plots": [], "csv": None, "runs": found.runs}
    if found.runs:
        result.update(_train_report(found, out, metric, pool))
    if evaluations:
        result["cost"] = cost_report(evaluations, out)
        result["plots"] = [*result["plots"], *result["cost"]["plots"]]
    written = [p for p in [*result["plots"], result["csv"], result.get("cost", {}).get("csv")] if p]
    console.info(f"wrote {', '.join(p.name for p in written)} to {out}")
    return dict(result, skipped=[*found.skipped, *unread])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = CommandParser("python -m diffusion_lab.compare", "tables and plots for a set of runs (settings with "
                           "mean +- s.e. over seeds, a per-run table, compare_loss.png, compare_fid.png, compare.csv) "
                           "and, for evaluate dirs, FID against NFE over seeds (compare_fid_vs_nfe.png).",
                           ["SWEEP_DIR [MORE_DIRS...]  (sweep dirs, run dirs, or any dir above them)",
                            "--metric final_loss  (sort and test by another metric than best_fid)",
                            "--pool model.dropout  (pool over a key like over seeds)"])
    parser.add_argument("paths", nargs="+", type=Path, help="sweep dirs, run dirs, evaluate dirs, or any dir above them")
    parser.add_argument("--out", type=Path, help="where the plots and compare.csv go (default: the first path)")
    parser.add_argument("--metric", choices=METRICS, default="best_fid",
                        help="sort by this and test it between settings (losses of different schedules or "
                             "objectives are not comparable)")
    parser.add_argument("--pool", help="comma-separated config keys to pool over like seeds, e.g. model.dropout to "
                                       "test the schedule across dropout values")
    args = parser.parse_args(argv)
    try:
        compare(args.paths, args.out, args.metric, [k for k in (args.pool or "").split(",") if k])
    except OSError as error:  # no runs, a path that is not a dir, an output that cannot be written
        fail(first_line(error))


if __name__ == "__main__":
    main()
