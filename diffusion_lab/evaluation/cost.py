"""FID against sampling cost (model evaluations, NFE) over seeds, from `evaluate` dirs, for `compare`.

Each evaluate dir's fid_vs_cost.json names the training run it scored (its checkpoint); that run's config less its
seed is the training setting. A point is (training setting, sampler setting without its step count, NFE) with one
FID per seed; points of different FID labels (sample size, features, reference) are never put side by side.
"""
from __future__ import annotations

import json
import os
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib.ticker

from .. import files
from ..files import first_line
from .plots import plt, save_figure
from .runs import BadRun, Run, Skipped, load_run
from .seeds import interval, welch

RESULT = "fid_vs_cost.json"  # what `evaluate` writes
LEVEL = 0.95  # the intervals' confidence level
ALPHA = 0.05  # Welch's t-test level of the statements


@dataclass
class Evaluation:
    """One evaluate dir: the training run it scored and its rows (one FID per sampler setting)."""

    path: Path
    run: Run
    label: str
    floor: Optional[float]
    rows: List[Dict]


@dataclass
class Point:
    """FIDs of one (training setting, sampler setting, NFE), one per seed."""

    setting: str
    sampler: str
    nfe: int
    fids: Dict[int, float] = field(default_factory=dict)

    def name(self) -> str:
        return f"{self.setting}: {self.sampler}" if self.setting else self.sampler


def _run_dir(checkpoint: str, where: Path) -> Path:
    """The training run dir a checkpoint names: as written (relative to here), else relative to a dir above the
    evaluate dir (the command was run from there); a checkpoint file stands for the nearest dir above it that
    holds a config.yaml (RUN_DIR/checkpoints/last.pt -> RUN_DIR)."""
    path = Path(checkpoint)
    candidates = [path] if path.is_absolute() else [path, *(parent / path for parent in where.resolve().parents)]
    for candidate in candidates:
        if candidate.is_file():
            return next((d for d in list(candidate.parents)[:2] if (d / "config.yaml").is_file()), candidate.parent)
        if candidate.exists():
            return candidate
    raise BadRun(f"its checkpoint {checkpoint} is not found (from here or from a dir above it)")


def read_evaluation(path: Path, runs: Dict[Path, Run]) -> Evaluation:
    """The evaluate dir `path`; the training run it names is taken from `runs` (by resolved path) or loaded."""
    try:
        result = json.loads((path / RESULT).read_text())
        checkpoint = str(result["checkpoint"])
        rows = [r for r in result["rows"] if isinstance(r.get("fid"), (int, float)) and isinstance(r.get("nfe"), int)
                and r.get("model", "checkpoint") == "checkpoint"]  # a teacher's rows belong to the teacher's run
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise BadRun(f"{RESULT} is not an evaluate result: {first_line(error)}") from error
    where = _run_dir(checkpoint, path)
    run = runs.get(where.resolve()) or load_run(where)
    return Evaluation(path, run, str(result.get("label") or ""), result.get("floor"), rows)


def find_evaluations(paths: Sequence[Path], runs: Sequence[Run]) -> Tuple[List[Evaluation], List[Skipped]]:
    """Every evaluate dir under `paths`, read; the ones that could not be, each with its reason."""
    known = {r.path.resolve(): r for r in runs}
    found, skipped = [], []
    dirs = sorted({Path(d).resolve(): Path(d) for root in paths for d, _, names in os.walk(root)
                   if RESULT in names}.values())
    for path in dirs:
        try:
            found.append(read_evaluation(path, known))
        except (BadRun, OSError) as error:
            skipped.append(Skipped(path, first_line(error)))
    return found, skipped


def _options(row: Dict) -> Dict:
    """A row's sampler options other than its step count, with the guidance scale as w."""
    options = {k: v for k, v in json.loads(row.get("settings") or "{}").items() if k != "steps"}
    return dict(options, **({"w": row["guidance_scale"]} if row.get("guidance_scale") is not None else {}))


def sampler_settings(rows: Sequence[Dict]) -> List[str]:
    """Each row's sampler named with the options that vary among the rows of that sampler, e.g. `euler
    (grid=linspace)` beside `euler (grid=karras)`; a sampler whose rows all agree is its bare name."""
    values = defaultdict(lambda: defaultdict(set))
    for row in rows:
        for k, v in _options(row).items():
            values[row["sampler"]][k].add(json.dumps(v, sort_keys=True))
    names = []
    for row in rows:
        shown = ", ".join(f"{k}={v}" for k, v in _options(row).items() if len(values[row["sampler"]][k]) > 1)
        names.append(f"{row['sampler']} ({shown})" if shown else str(row["sampler"]))
    return names


def points(evaluations: Sequence[Evaluation], setting_of: Callable[[Run], str]) -> Dict[str, List[Point]]:
    """{FID label: points}, each point's FIDs keyed by the training run's seed (a seed scored twice keeps the
    later evaluate dir, in path order)."""
    by_label: Dict[str, Dict[tuple, Point]] = defaultdict(dict)
    samplers = iter(sampler_settings([row for ev in evaluations for row in ev.rows]))
    for ev in evaluations:
        setting, seed = setting_of(ev.run), ev.run.config.get("seed")
        for row in ev.rows:
            key = (setting, next(samplers), row["nfe"])
            by_label[ev.label].setdefault(key, Point(*key)).fids[seed] = float(row["fid"])
    return {label: sorted(found.values(), key=lambda p: (p.nfe, p.setting, p.sampler))
            for label, found in by_label.items()}


def _mean_interval(point: Point) -> str:
    mean, half = interval(list(point.fids.values()), LEVEL)
    return f"{mean:.2f}" + (f" ± {half:.2f}" if half is not None else "")


def table(found: Sequence[Point]) -> str:
    """Markdown rows: NFE, training setting, sampler, seeds, mean ± 95% t-interval, FID per seed."""
    lines = ["| NFE | training setting | sampler | seeds | FID mean ± 95% interval | FID per seed |",
             "|---|---|---|---|---|---|"]
    for p in found:
        seeds = sorted(p.fids, key=str)
        lines.append(f"| {p.nfe} | {p.setting or 'all runs'} | {p.sampler} | {len(seeds)} | {_mean_interval(p)} | "
                     + ", ".join(f"{p.fids[s]:.2f}" for s in seeds) + " |")
    return "\n".join(lines)


def statements(found: Sequence[Point], alpha: float = ALPHA) -> List[str]:
    """Per NFE: the lowest mean FID, and each other point's Welch's t-test against it (beyond seed noise or not)."""
    lines = []
    for nfe in sorted({p.nfe for p in found}):
        here = sorted((p for p in found if p.nfe == nfe), key=lambda p: sum(p.fids.values()) / len(p.fids))
        best, verdicts = here[0], []
        for other in here[1:]:
            p = welch(list(best.fids.values()), list(other.fids.values()))
            verdicts.append(f"  {other.name()} {_mean_interval(other)}: " + (
                "cannot tell (fewer than 2 seeds)" if p is None else
                f"{'higher beyond seed noise' if p < alpha else 'within noise'} (p={p:.2g})"))
        lines += [f"{nfe} NFE: lowest {best.name()} {_mean_interval(best)} ({len(best.fids)} seeds)"
                  + ("" if verdicts else ", alone at this NFE"), *verdicts]
    return lines


def plot(found: Sequence[Point], floors: Sequence[float], path: Path, title: str) -> Path:
    """FID against NFE, one line per (training setting, sampler): the mean over seeds with its 95% t-interval,
    one colour per training setting, one line style per sampler; the noise floor dashed."""
    lines: Dict[Tuple[str, str], List[Point]] = defaultdict(list)
    for p in found:
        lines[(p.setting, p.sampler)].append(p)
    colours = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(p.setting for p in found))}
    styles = {s: ["-", "--", ":", "-."][i % 4] for i, s in enumerate(dict.fromkeys(p.sampler for p in found))}
    fig, ax = plt.subplots(figsize=(8, 5 + 0.16 * (len(lines) + len(set(floors)))))  # room for the legend below
    for (setting, sampler), pts in lines.items():
        means = [interval(list(p.fids.values()), LEVEL) for p in pts]
        seeds = max(len(p.fids) for p in pts)
        ax.errorbar([p.nfe for p in pts], [m for m, _ in means], yerr=[h or 0.0 for _, h in means], marker="o",
                    capsize=3, color=colours[setting], ls=styles[sampler],
                    label="\n".join(textwrap.wrap(f"{pts[0].name()} ({seeds} seed{'s' * (seeds > 1)})", 140)))
    for floor in sorted(set(floors)):
        ax.axhline(floor, ls="--", color="gray", label=f"noise floor {floor:.2f}")
    nfes = sorted({p.nfe for p in found})
    ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)", ylabel="FID",
           title="\n".join(textwrap.wrap(title, 100) + ["mean over seeds, bars: 95% t-interval of the mean"]))
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.title.set_fontsize(8)
    legend = ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12))  # below: never over a point
    fig.tight_layout()
    fig.subplots_adjust(bottom=min(0.6, 0.12 + legend.get_window_extent(fig.canvas.get_renderer()).height
                                   / fig.bbox.height))
    return save_figure(fig, path)


def write_csv(by_label: Dict[str, List[Point]], path: Path) -> Path:
    """One row per (FID label, point, seed), written atomically."""
    rows = [dict(fid_label=label, training_setting=p.setting, sampler=p.sampler, nfe=p.nfe, seed=seed, fid=fid)
            for label, found in by_label.items() for p in found for seed, fid in p.fids.items()]
    files.write_csv(path, rows, ["fid_label", "training_setting", "sampler", "nfe", "seed", "fid"])
    return Path(path)
