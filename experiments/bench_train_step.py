"""Does a continuous-time recipe cost more per training step than the discrete one? Interleaved A/B timing.

    PYTHONPATH=. python experiments/bench_train_step.py [--rounds 7] [--steps 20] [--batch 128]

One training step (forward + backward + clip + Adam + EMA, ``training.step.TrainStep`` on
``diffusion.losses.DiffusionLoss``) of the same ``base`` U-Net (identical initial weights) on a fixed digits-shaped
batch (batch x 1 x 8 x 8 in [-1, 1]) for three recipes (process / objective / density + weighting):

    discrete    cosine / eps / uniform t, uniform weighting (the default run's recipe)
    edm         edm / edm / lognormal sigma, edm weighting
    flow        flow / flow / uniform t, uniform weighting

Each round times ``--steps`` steps of every recipe, the order rotated every round (A B C, B C A, ...), after one
untimed warm-up round. Printed: each recipe's median steps/s and the median of the per-round ratios
recipe / discrete (time per step), with their min-max over the rounds.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import torch

from diffusion_lab import models  # noqa: F401  (registers the U-Nets)
from diffusion_lab.diffusion import objectives, processes, schedules  # noqa: F401  (register themselves)
from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.registry import MODELS, OBJECTIVES, SCHEDULES
from diffusion_lab.training.ema import EMA
from diffusion_lab.training.step import TrainStep, build_optimizer

RECIPES = {"discrete": ("cosine", "eps", "uniform", "uniform"), "edm": ("edm", "edm", "lognormal", "edm"),
           "flow": ("flow", "flow", "uniform", "uniform")}  # name -> (process, objective, density, weighting)


def recipe_step(name: str, net: torch.nn.Module, x0: torch.Tensor, seed: int) -> Callable[[], float]:
    """One call = one optimizer step of recipe `name` on its own copy of `net` (Adam lr 2e-3, clip 1, EMA 0.995)."""
    process_name, objective_name, density, weighting = RECIPES[name]
    process, objective = SCHEDULES.build(process_name), OBJECTIVES.build(objective_name)
    loss = DiffusionLoss(process, objective, weighting=weighting, density=density)
    model = copy.deepcopy(net)
    device = torch.device("cpu")
    optimizer = build_optimizer(model.parameters(), "adam", 2e-3, (0.9, 0.999), 0.0, device)
    step = TrainStep(model, optimizer, device, "fp32", 1.0, 0, EMA(model, decay=0.995))
    g = torch.Generator().manual_seed(seed)
    network = objective.network(model, process)

    def loss_fn() -> torch.Tensor:
        t = loss.sample_t(x0.shape[0], device, g)  # LongTensor (discrete) or float64 times
        eps = torch.randn(x0.shape, generator=g)
        return loss(network, x0, t, eps)

    return lambda: step(loss_fn)[0]


def timed(step: Callable[[], float], steps: int) -> float:
    """Seconds per step over `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def run(rounds: int, steps: int, batch: int, seed: int = 0) -> Dict[str, List[float]]:
    """Seconds per step of every recipe in every round (order rotated per round)."""
    torch.manual_seed(seed)
    net = MODELS.build("base", image_size=8, channels=1)
    x0 = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    fns = {name: recipe_step(name, net, x0, seed + 1) for name in RECIPES}
    names = list(RECIPES)
    for name in names:  # warm-up: allocator, Adam state, first-call costs
        timed(fns[name], 2)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(fns[name], steps))
    return times


def report(times: Dict[str, List[float]]) -> str:
    """Median steps/s and the per-round ratio to discrete (median, min-max)."""
    lines = ["| recipe | median steps/s | time ratio to discrete: median (min-max over rounds) |", "|---|---|---|"]
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, times["discrete"])]
        lines.append(f"| {name} | {1 / statistics.median(values):.2f} | {statistics.median(ratios):.3f} "
                     f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    times = run(args.rounds, args.steps, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}x1x8x8, "
          f"{args.rounds} rounds of {args.steps} steps\n" + report(times))


if __name__ == "__main__":
    main()
