"""Pictures people would rather look at than read: curves, image strips, FID against sampling cost."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .. import files  # noqa: E402


AXIS_WORDS = {"fid": "FID", "loss": "training loss"}  # metric keys as an axis names them


def read_metrics(path: Path) -> List[Dict]:
    """The rows of a metrics.jsonl; a torn line (a write cut by a full disk or a kill) is skipped."""
    return files.read_jsonl(Path(path))[0]


def smooth(values: Sequence[float], fraction: float = 0.05) -> List[float]:
    """Centred moving average over `fraction` of the points: no lag, unlike an EMA."""
    half = min(max(1, int(len(values) * fraction / 2)), (len(values) - 1) // 2)
    v = np.asarray(values, dtype=float)
    if half < 1:
        return v.tolist()
    sums = np.convolve(v, np.ones(2 * half + 1), mode="same")
    counts = np.convolve(np.ones_like(v), np.ones(2 * half + 1), mode="same")
    return (sums / counts).tolist()


def save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` and free it."""
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curves(runs: Dict[str, List[Dict]], key: str, path: Path, title: str, log_y: bool = False,
                floors: Optional[Dict[str, float]] = None) -> Path:
    """One line per run of metric `key` against step; each of `floors` ({legend: value}) a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rows in runs.items():
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, marker="o" if len(points) < 20 else None)
    for (label, value), style in zip((floors or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="gray", linestyle=style, linewidth=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(AXIS_WORDS.get(key, key))
    ax.set_title(textwrap.fill(title, 60), fontsize=10)
    if log_y:
        ax.set_yscale("log")
    if len(runs) > 1 or floors or any(", n=" in label for label in runs):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def curves_per_size(history: Sequence[tuple], sizes: Sequence[Optional[int]], name: str) -> Dict[str, List[Dict]]:
    """{legend: rows} of an FID history with one curve per sample size n: FIDs of different n differ by
    their bias, so they are never joined into one line (a resumed run may have changed eval.num_samples)."""
    curves: Dict[str, List[Dict]] = {}
    for (step, value), n in zip(history, sizes):
        legend = f"{name}, n={n}" if n is not None else f"{name}, n not recorded"
        curves.setdefault(legend, []).append({"step": step, "fid": value})
    return curves


def fid_title(label: Optional[str], sizes: Sequence[Optional[int]]) -> str:
    """fid.png's title: the FID label, unless the curves differ in n (then the legend names each n)."""
    if len(set(sizes)) > 1:
        return "FID against step, one curve per number of generated samples n (the legend names n)"
    return label or "FID"


def plot_loss(metrics_path: Path, path: Path) -> Path:
    """Training loss (raw and smoothed) of one run."""
    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, alpha=0.3, color="tab:blue", label="loss")
        ax.plot(steps, smooth(losses), color="tab:blue", label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def _to_image(images) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> one row of images as an H x (N*W) x 3 float array in [0, 1]."""
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=len(images), padding=1, pad_value=1.0)
    return ((grid[:3] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()


def image_rows(rows: Dict[str, "torch.Tensor"], column_titles: Sequence[str], path: Path, title: str) -> Path:
    """A labelled figure: each entry of `rows` is a row of images [N, C, H, W], one column per title."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * len(column_titles) + 1.5, 1.3 * len(rows) + 0.6),
                             squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        row = _to_image(images)
        ax.imshow(row, interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        width = row.shape[1] / len(column_titles)
        ax.set_xticks([width * (i + 0.5) for i in range(len(column_titles))])
        ax.set_xticklabels(column_titles, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def forward_diffusion(x0: "torch.Tensor", schedules: Dict[str, object], timesteps: Sequence[int], path: Path,
                      seed: int = 0, view=None) -> Path:
    """The same images noised to increasing t, one row per (schedule, image), with the same noise; `view` maps
    each row to pixels (a latent run's decoder)."""
    import torch

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    rows = {}
    for name, schedule in schedules.items():
        for i, image in enumerate(x0):
            t = torch.tensor(list(timesteps))
            x_t, _ = schedule.to("cpu").add_noise(image.expand(len(t), *image.shape), t,
                                                  noise[i].expand(len(t), *image.shape))
            scale = schedule.input_scale(t)  # what the network sees: unit variance on a VE / EDM path
            x_t = x_t if scale is None else x_t * scale.float().view(-1, *([1] * image.dim()))
            rows[f"{name} #{i}"] = x_t if view is None else view(x_t).cpu()
    return image_rows(rows, [f"t={t:g}" for t in timesteps], path, "forward diffusion q(x_t | x0)")


def denoising_trajectory(trajectory, path: Path, num_images: int = 4) -> Path:
    """x_t and x0_pred at the recorded sampler steps, for the first few images."""
    import torch

    rows = {}
    for i in range(min(num_images, len(trajectory.x_t[0]))):
        rows[f"x_t #{i}"] = torch.stack([x[i] for x in trajectory.x_t])
        rows[f"x0_pred #{i}"] = torch.stack([x[i] for x in trajectory.x0_pred])
    return image_rows(rows, [f"t={t:.4g}" for t in trajectory.timesteps], path, "denoising trajectory")


def _setting(row: Dict) -> tuple:
    """(sampler, guidance scale w or None): what one line of fid_vs_cost.png holds; a teacher's rows (scored
    beside a consistency model) are its own line."""
    name = ("teacher: " if row.get("model") == "teacher" else "") + row["sampler"]
    return name, row.get("guidance_scale")


def _setting_label(setting: tuple) -> str:
    name, w = setting
    return name if w is None else f"{name}, w={w:g}"


def fid_vs_cost_figure(rows: List[Dict], label: str, floor: Optional[tuple] = None):
    """The figure of `plot_fid_vs_cost`: one line per sampler and guidance scale w (a guidance sweep would
    otherwise join points of different w, at the same NFE, into one vertical line)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for setting in sorted({_setting(r) for r in rows}, key=lambda s: (s[0], -1 if s[1] is None else s[1])):
        mine = sorted((r for r in rows if _setting(r) == setting), key=lambda r: r["nfe"])
        for ax, key in zip(axes, ("nfe", "seconds_per_image")):
            ax.plot([r[key] for r in mine], [r["fid"] for r in mine], marker="o", label=_setting_label(setting))
    for ax, xlabel in zip(axes, ("model evaluations (NFE)", "wall seconds per image")):
        if floor and floor[0] is not None:
            ax.axhline(floor[0], color="gray", linestyle="--", linewidth=1, label=f"floor (real train images, n={floor[1]})")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.set_title(f"FID against {xlabel.split(' (')[0]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return fig


def plot_fid_vs_cost(rows: List[Dict], path: Path, label: str, floor: Optional[tuple] = None) -> Path:
    """FID against NFE (log x) and against seconds per image, one line per sampler (and guidance scale w);
    floor: (value, n) drawn dashed."""
    return save_figure(fid_vs_cost_figure(rows, label, floor), path)


def _guided_lines(rows: List[Dict]) -> Dict[tuple, List[Dict]]:
    """{(sampler, NFE): its rows in order of w}: one line per sampler setting of a guidance sweep."""
    settings = sorted({(r["sampler"], r["nfe"]) for r in rows})
    return {s: sorted((r for r in rows if (r["sampler"], r["nfe"]) == s), key=lambda r: r["guidance_scale"])
            for s in settings}


def _plot_key(ax, rows: List[Dict], key: str, **style) -> Optional[str]:
    """Draw `key` against w where it is known; the line's colour, or None when nothing was drawn."""
    points = [(r["guidance_scale"], r[key]) for r in rows if r.get(key) is not None]
    return ax.plot(*zip(*points), **style)[0].get_color() if points else None


def guidance_figure(rows: List[Dict], label: str, floor: Optional[tuple] = None,
                    floors: Optional[Dict[str, float]] = None):
    """The figure of `plot_guidance`: FID, classifier accuracy, and precision (solid) with recall (dashed), against
    w; one colour per sampler setting. Guidance trades diversity for fidelity: precision rises and recall falls."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (sampler, nfe), mine in _guided_lines(rows).items():
        name = f"{sampler}, NFE {nfe}"
        for ax, key in zip(axes, ("fid", "accuracy")):
            _plot_key(ax, mine, key, marker="o", label=name)
        color = _plot_key(axes[2], mine, "precision", marker="o", label=f"precision, {name}")
        _plot_key(axes[2], mine, "recall", marker="s", linestyle="--", color=color, label=f"recall, {name}")
    if floor and floor[0] is not None:
        axes[0].axhline(floor[0], color="gray", linestyle="--", linewidth=1, label=f"floor (real train images, n={floor[1]})")
    for key, style in (("precision", ":"), ("recall", "-.")):
        if (floors or {}).get(key) is not None:
            axes[2].axhline(floors[key], color="gray", linestyle=style, linewidth=1, label=f"{key} of real train images")
    ylabels = ("FID", "classifier accuracy on the asked labels", "precision (fidelity), recall (diversity), k=3")
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel("guidance scale w (0 unconditional, 1 conditional)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[2].set_ylim(-0.03, 1.03)
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return fig


def plot_guidance(rows: List[Dict], path: Path, label: str, floor: Optional[tuple] = None,
                  floors: Optional[Dict[str, float]] = None) -> Path:
    """FID, classifier accuracy and precision/recall against the guidance scale w, one line per sampler setting
    (the usual FID-guidance trade-off curve, and the fidelity/diversity trade behind it); floor: (value, n) drawn
    dashed on the FID panel; floors: {precision, recall} of real training images, gray on the last panel."""
    return save_figure(guidance_figure(rows, label, floor, floors), path)


def plot_ema_fid(rows: List[Dict], path: Path, label: str, floor: Optional[tuple] = None,
                 tracked: Sequence[float] = ()) -> Path:
    """FID against the post-hoc EMA length sigma_rel, one line per sampler setting; floor: (value, n) dashed; the
    relative stds the run tracked marked as dotted verticals."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in dict.fromkeys(r["setting"] for r in rows):
        points = sorted((r["sigma_rel"], r["fid"]) for r in rows if r["setting"] == setting)
        ax.plot(*zip(*points), marker="o", label=setting)
    if floor and floor[0] is not None:
        ax.axhline(floor[0], color="gray", linestyle="--", linewidth=1, label=f"floor (real train images, n={floor[1]})")
    for i, std in enumerate(tracked):
        ax.axvline(std, color="black", linestyle=":", linewidth=1, label="tracked while training" if i == 0 else None)
    ax.set_xlabel("EMA length sigma_rel (relative std of the averaging profile)")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(textwrap.fill(label, 80), fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
