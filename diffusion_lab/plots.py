"""Pictures people would rather look at than read: loss and FID curves."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: Path) -> List[Dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ema_smooth(values: Sequence[float], alpha: float = 0.9) -> List[float]:
    out, running = [], None
    for v in values:
        running = v if running is None else alpha * running + (1 - alpha) * v
        out.append(running)
    return out


def plot_curves(runs: Dict[str, List[Dict]], key: str, path: Path, title: str, log_y: bool = False) -> Path:
    """One line per run of metric `key` against step."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker="o" if len(points) < 20 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    if len(runs) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_loss(metrics_path: Path, path: Path) -> Path:
    """Training loss (raw and smoothed) of one run."""
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, alpha=0.3, color="tab:blue", label="loss")
        ax.plot(steps, ema_smooth(losses), color="tab:blue", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
