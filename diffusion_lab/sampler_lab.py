"""The sampler lab: score any sampler against the exact answer, in seconds on a CPU, no training.

    python -m diffusion_lab.sampler_lab sampler=dpm_solver schedule=cosine 'nfe=[5,8,10,20,50]' 'also=[ddim,heun]'
    python -m diffusion_lab.sampler_lab -m sampler=ddim,dpm_solver grid=logsnr,karras

Data is a known Gaussian mixture (``exact.GaussianMixture``), the model its exact denoiser E[eps | x_t], so every
error is the sampler's (and the schedule's) alone. Per NFE budget it reports:
  mode_weight_error  total variation between the component weights of the samples (each sample assigned to its
                     most likely component) and the true weights;
  spread_error       max over components of |spread ratio - 1|, the spread ratio being the RMS distance of a
                     component's samples to its mean over the same for a large true sample;
  sw                 sliced Wasserstein-2 distance to the true distribution (quantiles of a large true sample).
Each has a noise floor: its mean over 5 independent true samples of the same size n, where a perfect sampler lands.
It writes ``sampler_lab.csv`` and ``sampler_lab.png`` (errors against NFE, one line per sampler) into the run dir.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("sampler_lab", "sampler_lab")  # --help and shell completion answer here, before torch is imported

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import console, files
from .config import CONF_DIR, trained
from .config.build import build_objective, build_schedule
from .config.preflight import checked_main, run_command
from .diffusion.exact import ExactDenoiser, GaussianMixture
from .diffusion.samplers import build_sampler, num_evaluations, steps_for

FIELDS = ["schedule", "sampler", "grid", "nfe", "steps", "mode_weight_error", "spread_error", "spread_ratios", "sw",
          "mode_weight_floor", "spread_floor", "sw_floor", "n"]


def make_mixture(dim: int, components: int, width: float, spread: float, seed: int) -> GaussianMixture:
    """Means uniform in [-spread, spread]^dim, stds width * (0.5 .. 1.5), weights proportional to 1..K (seeded)."""
    if dim < 1 or components < 1 or width <= 0 or spread < 0:
        raise ValueError("mixture needs dim >= 1, components >= 1, width > 0 and spread >= 0")
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(components, dim, generator=g, dtype=torch.float64) * 2 - 1) * spread
    stds = width * (0.5 + torch.rand(components, generator=g, dtype=torch.float64))
    weights = torch.arange(1, components + 1, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, stds)


def sorted_projections(x: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Projections of x [n, d] on each direction, sorted per direction -> [n, P] (numpy's sort: several times
    faster than torch's along dim 0 on a CPU)."""
    return torch.from_numpy(np.sort((x @ directions.T).numpy(), axis=0))


def sliced_wasserstein(x: torch.Tensor, reference: "Truth") -> float:
    """sqrt(mean over the reference's unit directions of W2^2 between the projections of x [n, d] and the true
    distribution, whose quantiles come from a large true sample) - zero only for a perfect, infinite sample."""
    projected = sorted_projections(x, reference.directions)  # [n, P]
    positions = ((torch.arange(len(x), dtype=torch.float64) + 0.5) / len(x) * reference.quantiles.shape[0]).long()
    return (projected - reference.quantiles[positions]).pow(2).mean().sqrt().item()


@dataclass
class Truth:
    """Everything a score needs from the true distribution, drawn once per run."""

    mixture: GaussianMixture
    directions: torch.Tensor  # [P, d] unit vectors
    quantiles: torch.Tensor  # [N, P] sorted projections of a large true sample
    reference_spread: torch.Tensor  # [K] RMS distance to the mean of each component, from the large true sample
    floor: Dict[str, float]  # each metric of true samples of the same size n (mean of 5 draws): the noise floor

    @staticmethod
    def draw(mixture: GaussianMixture, n: int, projections: int, seed: int) -> "Truth":
        g = torch.Generator().manual_seed(seed + 1)
        directions = torch.randn(projections, mixture.dim, generator=g, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
        big = mixture.sample(max(25 * n, 100_000), g)[0]
        truth = Truth(mixture, directions, sorted_projections(big, directions), spreads(mixture, big), {})
        floors = [score(mixture.sample(n, g)[0], truth) for _ in range(5)]
        truth.floor = {key: sum(f[key] for f in floors) / len(floors) for key in ("mode_weight_error", "spread_error",
                                                                                    "sw")}
        return truth


def spreads(mixture: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """RMS distance of the samples assigned to each component to that component's mean (nan if none)."""
    labels = mixture.assign(x)
    out = torch.full((len(mixture.weights),), math.nan, dtype=torch.float64)
    for k in range(len(out)):
        mine = x[labels == k]
        if len(mine):
            out[k] = (mine - mixture.means[k]).pow(2).sum(1).mean().sqrt()
    return out


def score(samples: torch.Tensor, truth: Truth) -> Dict[str, float]:
    """Mode-weight error, spread ratios and sliced Wasserstein of samples [n, d] (see the module docstring)."""
    samples = samples.to(torch.float64)
    if not bool(torch.isfinite(samples).all()):
        return {"mode_weight_error": math.nan, "spread_error": math.nan, "spread_ratios": "", "sw": math.nan}
    counts = torch.bincount(truth.mixture.assign(samples), minlength=len(truth.mixture.weights))
    weights = counts.to(torch.float64) / len(samples)
    ratios = spreads(truth.mixture, samples) / truth.reference_spread
    return {
        "mode_weight_error": 0.5 * (weights - truth.mixture.weights).abs().sum().item(),
        "spread_error": (ratios - 1).abs().nan_to_num(1.0).max().item(),
        "spread_ratios": ";".join(f"{r:.4f}" for r in ratios.tolist()),
        "sw": sliced_wasserstein(samples, truth),
    }


def noise(n: int, dim: int, seed: int) -> torch.Tensor:
    """The same x_T for every sampler and budget (common random numbers make their differences sharper)."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_sampler(sampler: Callable, schedule, objective, truth: Truth, n: int, seed: int) -> Dict[str, float]:
    """Draw n samples with `sampler` (the shared call) driven by the exact denoiser, and score them."""
    model = ExactDenoiser(schedule, truth.mixture, kind=objective.name)
    x = sampler(model, schedule, objective, noise(n, truth.mixture.dim, seed),
                generator=torch.Generator().manual_seed(seed + 2))
    return dict(score(x, truth), nfe_used=model.calls)


def sampler_settings(name: str, overrides: Optional[DictConfig] = None) -> Dict:
    """conf/sampler/<name>.yaml as sampler parameters, updated with `overrides`; no clipping (exact denoiser)."""
    settings = trained.sampler_settings(OmegaConf.merge({"name": name}, overrides or {}))
    settings.pop("name")
    settings.update(clip_x0=False, clamp_final=False)
    return settings


def lab_rows(cfg: DictConfig) -> List[Dict]:
    """Every (sampler, NFE) point of the config, scored against one Truth."""
    schedule, objective = build_schedule(cfg), build_objective(cfg)
    m = cfg.mixture
    truth = Truth.draw(make_mixture(m.dim, m.components, m.width, m.spread, m.seed), cfg.n, cfg.projections, cfg.seed)
    entries = [(cfg.sampler.name, cfg.sampler)] + [(name, None) for name in cfg.also]
    rows = []
    for name, overrides in entries:
        settings = sampler_settings(name, overrides)
        if cfg.grid is not None:
            settings["grid"] = OmegaConf.to_container(cfg.grid) if OmegaConf.is_config(cfg.grid) else cfg.grid
        if name == "ddpm":
            raise ValueError("ddpm runs all T steps: the lab sweeps NFE (use ddim eta=1 or euler_ancestral)")
        for budget in cfg.nfe:
            settings["steps"] = steps_for(name, int(budget))
            result = run_sampler(build_sampler(name, **settings), schedule, objective, truth, cfg.n, cfg.seed)
            assert result.pop("nfe_used") == num_evaluations(name, settings, schedule)
            rows.append(dict(result, schedule=cfg.schedule.name, sampler=name, grid=str(settings["grid"]),
                             nfe=num_evaluations(name, settings, schedule), steps=settings["steps"],
                             mode_weight_floor=truth.floor["mode_weight_error"],
                             spread_floor=truth.floor["spread_error"], sw_floor=truth.floor["sw"], n=cfg.n))
    return rows


PANEL_TITLES = {"mode_weight_error": "mode weight error (total variation)",
                "spread_error": "spread error (max |spread ratio - 1|)",
                "sw": "sliced Wasserstein-2 distance"}  # the plot's words for the CSV's columns


def plot(rows: List[Dict], path: Path) -> Path:
    """Mode-weight error, spread error and SW (with its floor) against NFE, one line per sampler."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, floor in zip(axes, ("mode_weight_error", "spread_error", "sw"),
                              ("mode_weight_floor", "spread_floor", "sw_floor")):
        for name in dict.fromkeys(r["sampler"] for r in rows):
            mine = [r for r in rows if r["sampler"] == name]
            ax.plot([r["nfe"] for r in mine], [r[key] for r in mine], marker="o", label=f"{name} ({mine[0]['grid']})")
        ax.axhline(rows[0][floor], color="gray", ls="--", label="noise floor (true samples)")
        ax.set(xscale="log", yscale="log", xlabel="model evaluations (NFE)", title=PANEL_TITLES[key])
        ax.set_xticks(sorted({r["nfe"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[-1].legend(fontsize=7)
    fig.suptitle(f"exact mixture denoiser, {rows[0]['schedule']} schedule, n={rows[0]['n']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def lab(cfg: DictConfig, run_dir: Path) -> List[Dict]:
    """Run the lab, print the table, write the CSV and the plot."""
    rows = lab_rows(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_csv(run_dir / "sampler_lab.csv", rows, FIELDS)
    plot(rows, run_dir / "sampler_lab.png")
    lines = [f"{'sampler':<16} {'grid':<10} {'steps':>5} {'NFE':>4} {'mode err':>9} {'spread err':>10} {'SW':>8}   "
             f"({cfg.schedule.name}, n={cfg.n})",
             f"{'noise floor':<16} {'':<10} {'':>5} {'':>4} {rows[0]['mode_weight_floor']:>9.4f} "
             f"{rows[0]['spread_floor']:>10.4f} {rows[0]['sw_floor']:>8.4f}"]
    lines += [f"{r['sampler']:<16} {r['grid']:<10} {r['steps']:>5} {r['nfe']:>4} {r['mode_weight_error']:>9.4f} "
              f"{r['spread_error']:>10.4f} {r['sw']:>8.4f}" for r in rows]
    console.say("\n".join(lines))
    console.info(f"wrote {run_dir / 'sampler_lab.csv'} and {run_dir / 'sampler_lab.png'}")
    return rows


@hydra.main(config_path=str(CONF_DIR), config_name="sampler_lab", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_command(lab, cfg)


def main() -> None:
    """Every bad value stops with one line before Hydra starts."""
    checked_main(hydra_main, config_name="sampler_lab")


if __name__ == "__main__":
    main()
