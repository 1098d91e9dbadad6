"""Formulations on one network: FID against NFE over seeds, from `evaluate` dirs named eval_<formulation>_s<seed>.

    python experiments/formulations_table.py outputs/formulations [--plot docs/formulations_fid_vs_nfe.png]

Prints a markdown table (FID per seed, mean +- std) and Welch's t-test of each point against the default's
DPM-Solver++(3M) at 20 NFE; the plot draws the mean over seeds with min-max bars and the floor dashed.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

NAMES = {"default": "default (cosine, eps)", "edm_digits": "EDM", "rectified_flow_digits": "rectified flow"}
REFERENCE = ("default", "dpm_solver_3m", 20)  # the default run's own sampler at its own NFE


def read_points(root: Path) -> dict:
    """{(formulation, sampler, nfe): {seed: fid}} and the floors seen, from every eval_*_s*/fid_vs_cost.csv."""
    points, floors = defaultdict(dict), set()
    for path in sorted(root.glob("eval_*_s*/fid_vs_cost.csv")):
        formulation, seed = re.fullmatch(r"eval_(.+)_s(\d+)", path.parent.name).groups()
        for row in csv.DictReader(path.open()):
            grid = json.loads(row["settings"]).get("grid")
            sampler = row["sampler"] + (f" ({grid})" if grid else "")
            points[(formulation, sampler, int(row["nfe"]))][int(seed)] = float(row["fid"])
            floors.add(round(float(row["fid_floor"]), 4))
    return points, floors


def welch(a: list, b: list) -> str:
    """Welch's t-test p-value of two seed samples, or '-' with fewer than 2 seeds on either side."""
    if len(a) < 2 or len(b) < 2:
        return "-"
    return f"{stats.ttest_ind(a, b, equal_var=False).pvalue:.2g}"


def table(points: dict) -> str:
    """Markdown rows: formulation, sampler, NFE, seeds, FID per seed, mean +- std, Welch p vs REFERENCE."""
    ref = list(points.get(REFERENCE, {}).values())
    lines = ["| formulation | sampler | NFE | seeds | FID per seed | mean +- std | p vs default 20 NFE |",
             "|---|---|---|---|---|---|---|"]
    for (formulation, sampler, nfe), by_seed in sorted(points.items()):
        fids = [by_seed[s] for s in sorted(by_seed)]
        spread = f" +- {statistics.stdev(fids):.1f}" if len(fids) > 1 else ""
        lines.append(f"| {NAMES.get(formulation, formulation)} | {sampler} | {nfe} | {','.join(map(str, sorted(by_seed)))}"
                     f" | {', '.join(f'{f:.1f}' for f in fids)} | {statistics.mean(fids):.1f}{spread} | {welch(fids, ref)} |")
    return "\n".join(lines)


def plot(points: dict, floors: set, path: Path) -> None:
    """FID against NFE, one line per (formulation, sampler): mean over seeds, min-max bars, floor dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = defaultdict(list)
    for (formulation, sampler, nfe), by_seed in points.items():
        lines[(formulation, sampler)].append((nfe, list(by_seed.values())))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(NAMES, ["tab:blue", "tab:orange", "tab:green"]))
    for (formulation, sampler), pts in sorted(lines.items()):
        pts.sort()
        nfe = [p[0] for p in pts]
        mean = [statistics.mean(p[1]) for p in pts]
        err = [[m - min(p[1]) for m, p in zip(mean, pts)], [max(p[1]) - m for m, p in zip(mean, pts)]]
        seeds = max(len(p[1]) for p in pts)
        own = formulation == "default" or not sampler.startswith("dpm_solver_3m")  # its own sampler: solid
        ax.errorbar(nfe, mean, yerr=err, marker="o" if own else "s", ls="-" if own else ":", capsize=3,
                    color=colors.get(formulation), label=f"{NAMES.get(formulation, formulation)}: {sampler}, {seeds} seed(s)")
    for floor in sorted(floors):
        ax.axhline(floor, ls="--", color="gray", label=f"noise floor {floor:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)", ylabel="FID (digits classifier, n=1000)",
           title="digits, one network, 750 steps: mean over seeds, bars min-max")
    ax.set_xticks([5, 10, 20], ["5", "10", "20"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    points, floors = read_points(args.root)
    print(table(points))
    print("floor(s):", sorted(floors))
    if args.plot:
        plot(points, floors, args.plot)


if __name__ == "__main__":
    main()
