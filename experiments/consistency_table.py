"""The targets of docs/consistency.md from `experiments/consistency_digits.sh`'s dirs: per seed, the consistency
models' FID at 1/2/4 NFE over the teacher's FID at 20 NFE, and each stage's training time over the teacher's
(the same sitting, one training at a time), with means and 95% t-intervals over seeds.

    python experiments/consistency_table.py outputs/consistency
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict

from diffusion_lab.evaluation.seeds import interval


def fids(path: Path) -> Dict[int, float]:
    """NFE -> FID of the checkpoint's own rows in an evaluate dir."""
    rows = json.loads((path / "fid_vs_cost.json").read_text())["rows"]
    return {r["nfe"]: r["fid"] for r in rows if r.get("model", "checkpoint") == "checkpoint"}


def seconds(path: Path) -> float:
    return json.loads((path / "summary.json").read_text())["wall_time_s"]


def shown(values) -> str:
    mean, half = interval(values)
    return f"{mean:.2f}" + (f" +- {half:.2f}" if half is not None else "")


def main(out: Path) -> None:
    seeds = sorted(int(p.name.split("_s")[1]) for p in out.glob("teacher_s*") if (p / "summary.json").is_file())
    ratios: Dict[str, list] = {}
    print("| seed | teacher 10 / 20 NFE | CD 1 / 2 / 4 NFE | CT 1 / 2 / 4 NFE | train s: teacher, CD, CT |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        teacher, cd, ct = (fids(out / f"eval_{k}_s{seed}") for k in ("teacher", "cd", "ct"))
        times = [seconds(out / f"{k}_s{seed}") for k in ("teacher", "cd", "ct")]
        print(f"| {seed} | {teacher[10]:.1f} / {teacher[20]:.1f} | {' / '.join(f'{cd[n]:.1f}' for n in (1, 2, 4))} | "
              f"{' / '.join(f'{ct[n]:.1f}' for n in (1, 2, 4))} | {times[0]:.0f}, {times[1]:.0f}, {times[2]:.0f} |")
        for name, fid in (("CD", cd), ("CT", ct)):
            for n in (1, 2, 4):
                ratios.setdefault(f"{name} {n}-step FID / teacher 20-NFE FID", []).append(fid[n] / teacher[20])
        ratios.setdefault("CD training time / teacher's", []).append(times[1] / times[0])
        ratios.setdefault("CT training time / (teacher's + CD's)", []).append(times[2] / (times[0] + times[1]))
    print(f"\nmeans over seeds {seeds} with 95% t-intervals:")
    for name, values in ratios.items():
        print(f"- {name}: {shown(values)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/consistency"))
