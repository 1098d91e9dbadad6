"""Side-by-side: diffusion_lab's samplers against diffusers' multistep solvers on the sampler lab's exact mixture.

    python experiments/sampler_lab_vs_diffusers.py [--n 4000] [--nfe 5 8 10 20 50]

Every sampler gets the same schedule (diffusers via ``trained_betas``), the same exact denoiser E[eps | x_t] of
the lab's default mixture (conf/sampler_lab.yaml), the same x_T and the same scores (diffusion_lab.sampler_lab).
Peers: DPMSolverMultistepScheduler (DPM-Solver++, orders 2 and 3; use_lu_lambdas, Karras sigmas or trailing) and
UniPCMultistepScheduler (bh2, orders 2 and 3; exponential = log-SNR-uniform, Karras or trailing sigmas). Per NFE,
schedule and error the table shows our default sampler next to the best of all these configurations (bold: lower).
Under cosine use_lu_lambdas repeats t = 999, which diffusers steps through only when told its begin index.
Needs `pip install diffusers`.
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List

import torch
from omegaconf import OmegaConf

from diffusion_lab.config import CONF_DIR
from diffusion_lab.diffusion.objectives import EpsObjective
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.registry import SCHEDULES
from diffusion_lab.sampler_lab import Truth, make_mixture, run_sampler, sampler_settings

LAB = OmegaConf.load(CONF_DIR / "sampler_lab.yaml")
OURS = ["dpm_solver", "dpm_solver_3m"]  # the lab's default sampler first


def diffusers_peers(betas) -> Dict[str, Callable]:
    """name -> factory of a fresh diffusers scheduler on our betas."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    common = dict(num_train_timesteps=len(betas), trained_betas=betas.double().numpy(), prediction_type="epsilon")
    peers = {}
    grids = {"lu": dict(use_lu_lambdas=True), "karras": dict(use_karras_sigmas=True),
             "exponential": dict(use_exponential_sigmas=True), "trailing": dict(timestep_spacing="trailing")}
    for order in (2, 3):
        for grid in ("lu", "karras", "trailing"):
            peers[f"dpm++{order}M {grid}"] = lambda o=order, g=grid: DPMSolverMultistepScheduler(
                **common, algorithm_type="dpmsolver++", solver_order=o, **grids[g])
        for grid in ("exponential", "karras", "trailing"):
            peers[f"unipc-bh2 order {order} {grid}"] = lambda o=order, g=grid: UniPCMultistepScheduler(
                **common, solver_order=o, **grids[g])
    return peers


def diffusers_sampler(factory: Callable, nfe: int) -> Callable:
    """A diffusers scheduler loop with the shared sampler call (one model evaluation per timestep)."""

    def sample(model, schedule, objective, x_T, generator=None):
        scheduler = factory()
        scheduler.set_timesteps(nfe)
        scheduler.set_begin_index(0)  # count steps from 0 even where use_lu_lambdas repeats a timestep (cosine)
        x = x_T * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return sample


def rows_for(schedule_name: str, n: int, nfes: List[int]) -> List[Dict]:
    schedule, objective = SCHEDULES.build(schedule_name), EpsObjective()
    m = LAB.mixture
    truth = Truth.draw(make_mixture(m.dim, m.components, m.width, m.spread, m.seed), n, LAB.projections, LAB.seed)
    rows = []
    for nfe in nfes:
        for name in OURS:
            sampler = build_sampler(name, **dict(sampler_settings(name), steps=nfe))
            rows.append(dict(run_sampler(sampler, schedule, objective, truth, n, LAB.seed), who="ours", name=name, nfe=nfe))
        for name, factory in diffusers_peers(schedule.betas).items():
            result = run_sampler(diffusers_sampler(factory, nfe), schedule, objective, truth, n, LAB.seed)
            rows.append(dict(result, who="diffusers", name=name, nfe=nfe))
    for r in rows:
        assert r.pop("nfe_used") == r["nfe"], r
        r.update(schedule=schedule_name, floor=truth.floor)
    return rows


METRICS = (("spread_error", "spread"), ("mode_weight_error", "mode"), ("sw", "SW"))


def table(rows: List[Dict]) -> str:
    """Markdown: per schedule and NFE, each error of our default sampler next to the best diffusers value for that
    error (any of its configurations; the config is named)."""
    lines = ["| schedule | NFE | " + " | ".join(f"{label}: ours / best diffusers (config)" for _, label in METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for key in dict.fromkeys((r["schedule"], r["nfe"]) for r in rows):
        mine = [r for r in rows if (r["schedule"], r["nfe"]) == key]
        ours = next(r for r in mine if r["name"] == OURS[0])
        cells = []
        for metric, _ in METRICS:
            peers = [r for r in mine if r["who"] == "diffusers" and r[metric] == r[metric]]  # no nan
            best = min(peers, key=lambda r: r[metric])
            cells.append(f"**{ours[metric]:.3f}** / {best[metric]:.3f} ({best['name']})" if ours[metric] < best[metric]
                         else f"{ours[metric]:.3f} / **{best[metric]:.3f}** ({best['name']})")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    floor = rows[0]["floor"]
    lines.append("| noise floor | | " + " | ".join(f"{floor[m]:.3f}" for m, _ in METRICS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=LAB.n)
    parser.add_argument("--nfe", type=int, nargs="+", default=list(LAB.nfe))
    args = parser.parse_args()
    rows = [r for name in ("linear", "cosine") for r in rows_for(name, args.n, args.nfe)]
    print(f"{'schedule':<8} {'NFE':>4} {'sampler':<34} {'spread':>7} {'mode':>6} {'SW':>7}")
    for r in rows:
        print(f"{r['schedule']:<8} {r['nfe']:>4} {r['who'] + ': ' + r['name']:<34} {r['spread_error']:>7.4f} "
              f"{r['mode_weight_error']:>6.4f} {r['sw']:>7.4f}")
    print(f"\nn = {args.n}, exact denoiser of the lab's default mixture; errors: spread = max_k |spread ratio - 1|, "
          f"mode = total variation of the mode weights, SW = sliced W2 to the truth\n")
    print(table(rows))


if __name__ == "__main__":
    main()
