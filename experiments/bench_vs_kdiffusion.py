"""Our continuous-time samplers against k-diffusion (edm) and facebookresearch flow_matching (flow), on the sampler
lab's exact 2-D mixture.

    PYTHONPATH=.:/work/peers python experiments/bench_vs_kdiffusion.py [--n 4000] [--seeds 0 1 2] [--nfe 5 8 10 20]
        [--sigma-min 0.002] [--processes edm flow]

Every sampler gets the same exact model of the lab's default mixture (conf/sampler_lab.yaml), the same x_T per seed
and the same scores (diffusion_lab.sampler_lab: sliced W2 "sw", spread error, mode weight error); per budget each
sampler runs the most steps whose model evaluations (NFE, counted on the model) fit.

  schedule=edm  (EDMProcess, sigma sigma_min..80; --sigma-min moves where both sides' grids end, default EDM's 0.002), model D(x, sigma) = E[x0 | x] (ExactDenoiser kind "x0", t = sigma).
                k-diffusion: sample_euler, heun, dpm_2, lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde on get_sigmas_karras
                (rho 7) and get_sigmas_exponential; ours: euler, heun, edm, dpm_solver, dpm_solver_3m, ddim on the
                karras and logsnr grids.
  schedule=flow (FlowProcess, x_t = (1 - t) x0 + t eps), model the exact velocity (ExactDenoiser kind "flow").
                flow_matching: ODESolver(method euler, midpoint, heun2, step_size 1/steps) in its own convention:
                t' = 0 noise, t' = 1 data, u'(x, t') = -u(x, t = 1 - t'); ours: euler, heun, dpm_solver,
                dpm_solver_3m on the linspace and shift grids.

Peers, kept out of the project's environment:
  k-diffusion: only its ``sampling.py`` is loaded, with importlib.util.spec_from_file_location from the installed
    package dir, so its heavy package __init__ (accelerate, clip, wandb, ...) is not run; sampling.py itself needs
    torch, scipy, torchsde and torchdiffeq (``pip install --no-deps k-diffusion torchsde torchdiffeq trampoline scipy``).
  flow_matching: pip install flow-matching into a separate venv or --target dir (``pip install --no-deps --target
    /work/peers flow-matching``) and put that dir on PYTHONPATH: its wheel ships a top-level ``tests`` package
    that shadows ours, so never install it into the project's environment.
Writes experiments/results/bench_vs_kdiffusion.csv (one row per seed) and .md (the tables), atomically; with a
--sigma-min other than 0.002 the files are named bench_vs_kdiffusion_sigma_min_<value>.{csv,md}.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import types
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from diffusion_lab import files
from diffusion_lab.config import CONF_DIR
from diffusion_lab.diffusion.samplers import build_sampler, steps_for
from diffusion_lab.registry import OBJECTIVES, SCHEDULES
from diffusion_lab.sampler_lab import Truth, make_mixture, run_sampler, sampler_settings

LAB = OmegaConf.load(CONF_DIR / "sampler_lab.yaml")
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
METRICS = ("sw", "spread_error", "mode_weight_error")
RESULTS = Path(__file__).parent / "results"
KD_PACKAGE = "_k_diffusion_bare"  # the bare package sampling.py is loaded into (no __init__ run)

# k-diffusion sampler -> (NFE of `steps` sigmas before the final 0, stochastic); heun and dpm_2 take one Euler step
# to sigma = 0, the SDE samplers draw from a noise_sampler
KDIFFUSION = {"euler": (lambda s: s, False), "heun": (lambda s: 2 * s - 1, False), "dpm_2": (lambda s: 2 * s - 1, False),
              "lms": (lambda s: s, False), "dpmpp_2m": (lambda s: s, False), "dpmpp_2m_sde": (lambda s: s, True),
              "dpmpp_3m_sde": (lambda s: s, True)}
FLOW_MATCHING = {"euler": lambda s: s, "midpoint": lambda s: 2 * s, "heun2": lambda s: 2 * s}  # torchdiffeq stages
OURS = {"edm": (["euler", "heun", "edm", "dpm_solver", "dpm_solver_3m", "ddim"], ["karras", "logsnr"], "x0"),
        "flow": (["euler", "heun", "dpm_solver", "dpm_solver_3m"], ["linspace", "shift"], "flow")}


def load_kdiffusion_sampling():
    """k_diffusion/sampling.py as a module, without running the package's __init__ (ImportError if absent): a bare
    package module under a private name points at the installed dir, so its `from . import utils` loads utils.py
    alone."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed: pip install --no-deps k-diffusion torchsde torchdiffeq trampoline")
    folder = Path(list(spec.submodule_search_locations)[0])
    package = sys.modules.setdefault(KD_PACKAGE, types.ModuleType(KD_PACKAGE))
    package.__path__ = [str(folder)]
    module_spec = importlib.util.spec_from_file_location(f"{KD_PACKAGE}.sampling", folder / "sampling.py")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def most_steps(cost: Callable[[int], int], budget: int) -> int:
    """The most steps whose cost fits the NFE budget (at least 1)."""
    steps = 1
    while cost(steps + 1) <= budget:
        steps += 1
    return steps


def kdiffusion_sampler(k, name: str, grid: str, steps: int, sigma_min: float = SIGMA_MIN) -> Callable:
    """k-diffusion's sample_<name> on its <grid> sigmas, with the shared sampler call (x_T unit noise)."""
    fn, stochastic = getattr(k, f"sample_{name}"), KDIFFUSION[name][1]
    make = {"karras": lambda: k.get_sigmas_karras(steps, sigma_min, SIGMA_MAX, rho=RHO),
            "exponential": lambda: k.get_sigmas_exponential(steps, sigma_min, SIGMA_MAX)}[grid]

    def sample(model, process, objective, x_T, generator=None):
        sigmas = make().to(torch.float64)
        extra = {}
        if stochastic:  # independent N(0, I) per step from our generator (k-diffusion's default: a Brownian tree)
            extra["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x_T.shape, generator=generator,
                                                                           dtype=x_T.dtype)
        return fn(model, x_T * sigmas[0], sigmas, disable=True, **extra)

    return sample


def flow_matching_sampler(method: str, steps: int) -> Callable:
    """flow_matching's ODESolver from its t' = 0 (noise) to t' = 1 (data), step 1/steps, on our exact velocity."""
    from flow_matching.solver import ODESolver

    def sample(model, process, objective, x_T, generator=None):
        def velocity(x, t):  # theirs at t' is -ours at t = 1 - t' (x = t' x1 + (1 - t') x0 vs (1 - t) x0 + t eps)
            return -model(x, torch.full((x.shape[0],), 1.0 - float(t), dtype=torch.float64))

        grid = torch.tensor([0.0, 1.0], dtype=torch.float64)
        return ODESolver(velocity_model=velocity).sample(x_T, step_size=1.0 / steps, method=method, time_grid=grid)

    return sample


def entries(process_name: str, budget: int, k=None, flow_peer: bool = True, sigma_min: float = SIGMA_MIN) -> List[Dict]:
    """Every (who, name, grid, steps, sampler) to run at one NFE budget."""
    names, grids, _ = OURS[process_name]
    out = [dict(who="ours", name=n, grid=g, steps=steps_for(n, budget),
                sampler=build_sampler(n, **dict(sampler_settings(n), grid=g, steps=steps_for(n, budget))))
           for n in names for g in grids]
    if process_name == "edm" and k is not None:
        for name, (cost, _) in KDIFFUSION.items():
            for grid in ("karras", "exponential"):
                s = most_steps(cost, budget)
                out.append(dict(who="k-diffusion", name=name, grid=grid, steps=s,
                                sampler=kdiffusion_sampler(k, name, grid, s, sigma_min)))
    if process_name == "flow" and flow_peer:
        for method, cost in FLOW_MATCHING.items():
            s = most_steps(cost, budget)
            out.append(dict(who="flow_matching", name=method, grid="uniform", steps=s,
                            sampler=flow_matching_sampler(method, s)))
    return out


def bench(process_name: str, nfes: Sequence[int], n: int, seeds: Sequence[int], k=None,
          flow_peer: bool = True, sigma_min: float = SIGMA_MIN) -> List[Dict]:
    """One row per (seed, budget, sampler): the three errors, NFE used (counted) and the seed's noise floor; on edm
    both sides' grids end at `sigma_min` (ours through the process's own sigma_min, k-diffusion's sigmas)."""
    options = {"sigma_min": sigma_min} if process_name == "edm" else {}
    process, objective = SCHEDULES.build(process_name, **options), OBJECTIVES.build(OURS[process_name][2])
    m = LAB.mixture
    mixture = make_mixture(m.dim, m.components, m.width, m.spread, m.seed)
    rows = []
    for seed in seeds:
        truth = Truth.draw(mixture, n, LAB.projections, seed)
        for budget in nfes:
            for e in entries(process_name, budget, k, flow_peer, sigma_min):
                result = run_sampler(e.pop("sampler"), process, objective, truth, n, seed)
                result.pop("spread_ratios")
                rows.append(dict(result, **e, process=process_name, budget=budget, seed=seed,
                                 **{f"{key}_floor": truth.floor[key] for key in METRICS}))
    return rows


def summarise(rows: List[Dict]) -> List[Dict]:
    """Per (process, budget, who, name, grid): mean, min and max over seeds of each error."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["process"], r["budget"], r["who"], r["name"], r["grid"]), []).append(r)
    out = []
    for (process, budget, who, name, grid), mine in groups.items():
        s = dict(process=process, budget=budget, who=who, name=name, grid=grid, nfe=mine[0]["nfe_used"],
                 steps=mine[0]["steps"], per_seed={key: [r[key] for r in mine] for key in METRICS})
        for key in METRICS:
            s[key] = statistics.fmean(s["per_seed"][key])
            s[f"{key}_floor"] = statistics.fmean(r[f"{key}_floor"] for r in mine)
        out.append(s)
    return out


def winners(summary: List[Dict]) -> Dict[tuple, str]:
    """Per (process, budget): which of ours beat the peers' best sw AND best spread (means over seeds); `all
    seeds` where it beats those two peer configurations on every seed too."""
    verdict = {}
    for key in dict.fromkeys((s["process"], s["budget"]) for s in summary):
        mine = [s for s in summary if (s["process"], s["budget"]) == key]
        peers = [s for s in mine if s["who"] != "ours" and s["sw"] == s["sw"]]
        if not peers:
            continue
        best = {m: min(peers, key=lambda s: s[m]) for m in ("sw", "spread_error")}
        wins = []
        for s in (s for s in mine if s["who"] == "ours"):
            if all(s[m] < best[m][m] for m in best):
                every = all(a < b for m in best for a, b in zip(s["per_seed"][m], best[m]["per_seed"][m]))
                wins.append(f"{s['name']} {s['grid']}" + (" (all seeds)" if every else ""))
        verdict[key] = (f"peer best sw {best['sw']['sw']:.4f} ({best['sw']['who']} {best['sw']['name']} "
                        f"{best['sw']['grid']}), best spread {best['spread_error']['spread_error']:.4f} "
                        f"({best['spread_error']['who']} {best['spread_error']['name']} {best['spread_error']['grid']})"
                        f"; ours beating both: {', '.join(wins) or 'none'}")
    return verdict


def cell(s: Dict, key: str) -> str:
    values = s["per_seed"][key]
    return f"{s[key]:.4f} ({min(values):.4f}-{max(values):.4f})"


def markdown(summary: List[Dict]) -> str:
    """One table per process and budget, then the verdict line."""
    verdict, lines = winners(summary), []
    for key in dict.fromkeys((s["process"], s["budget"]) for s in summary):
        mine = sorted((s for s in summary if (s["process"], s["budget"]) == key), key=lambda s: s["sw"])
        lines += [f"\n**{key[0]}, NFE budget {key[1]}**\n", "| who | sampler | grid | steps | NFE | sw mean (min-max) "
                  "| spread err | mode weight err |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['who']} | {s['name']} | {s['grid']} | {s['steps']} | {s['nfe']} | {cell(s, 'sw')} | "
                  f"{cell(s, 'spread_error')} | {cell(s, 'mode_weight_error')} |" for s in mine]
        f = mine[0]
        lines.append(f"| floor | true samples | | | | {f['sw_floor']:.4f} | {f['spread_error_floor']:.4f} | "
                     f"{f['mode_weight_error_floor']:.4f} |")
        if key in verdict:
            lines.append(f"\n{verdict[key]}")
    return "\n".join(lines)


def write(rows: List[Dict], text: str, out: Path, stem: str = "bench_vs_kdiffusion") -> None:
    """<stem>.csv (one row per seed) and <stem>.md (the tables), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    fields = ["process", "budget", "seed", "who", "name", "grid", "steps", "nfe_used", *METRICS,
              *(f"{m}_floor" for m in METRICS)]
    files.write_csv(out / f"{stem}.csv", rows, fields)
    files.write_text(out / f"{stem}.md", text + "\n")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 8, 10, 20])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--sigma-min", type=float, default=SIGMA_MIN, help="where both sides' edm grids end")
    parser.add_argument("--processes", nargs="+", choices=["edm", "flow"], default=["edm", "flow"])
    args = parser.parse_args(argv)
    k = load_kdiffusion_sampling() if "edm" in args.processes else None
    rows = [row for name in args.processes
            for row in bench(name, args.nfe, args.n, args.seeds, k, sigma_min=args.sigma_min)]
    text = (f"n = {args.n} samples, seeds {args.seeds}; edm grids of both sides end at sigma_min = {args.sigma_min:g};"
            f" each cell: mean over seeds (min-max); sorted by sw\n" + markdown(summarise(rows)))
    print(text)
    stem = "bench_vs_kdiffusion" + ("" if args.sigma_min == SIGMA_MIN else f"_sigma_min_{args.sigma_min:g}")
    write(rows, text, args.out, stem)
    print(f"\nwrote {args.out / stem}.csv and .md")


if __name__ == "__main__":
    main()
