"""What does a latent space buy per second? Pixel vs latent diffusion, interleaved A/B timing in one process.

    PYTHONPATH=. python experiments/bench_latent.py [--rounds 5] [--steps 5] [--batch 128] [--json PATH]

The same `base` U-Net config (hidden_dims [32, 64, 128]) trained as the default run trains it (cosine / eps,
``training.step.TrainStep``: Adam, clip 1, EMA), on digits-shaped batches of

    pixel    1 x 32 x 32 images (data.image_size=32)
    latent   4 x 8 x 8 latents (a factor-4 autoencoder's, `conf/autoencoder/kl.yaml`; cached, so no encoder cost)

and sampled with the default sampler (dpm_solver_3m, 20 steps) from a batch of noise, the latent samples then
decoded by the default autoencoder (`models.autoencoder.KLAutoencoder`, random weights: the cost is the same).
Each round times --steps training steps and one sampling batch of each, the order flipped every round; printed:
median images/s of each and the median (min-max) of the per-round ratios latent / pixel.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from diffusion_lab import files, models  # noqa: F401  (models registers the U-Nets)
from diffusion_lab.diffusion import objectives, samplers, schedules  # noqa: F401  (register themselves)
from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.models.autoencoder import KLAutoencoder
from diffusion_lab.registry import MODELS, OBJECTIVES, SCHEDULES
from diffusion_lab.training.ema import EMA
from diffusion_lab.training.step import TrainStep, build_optimizer

SHAPES = {"pixel": (1, 32, 32), "latent": (4, 8, 8)}


def arm(shape: tuple, batch: int, seed: int, decoder=None) -> Dict[str, Callable[[], None]]:
    """{"train": one optimizer step, "sample": one dpm_solver_3m batch (decoded when `decoder`)} for `shape`."""
    torch.manual_seed(seed)
    model = MODELS.build("base", image_size=shape[-1], channels=shape[0])
    process, objective = SCHEDULES.build("cosine"), OBJECTIVES.build("eps")
    loss = DiffusionLoss(process, objective)
    device = torch.device("cpu")
    step = TrainStep(model, build_optimizer(model.parameters(), "adamw", 2e-3, (0.9, 0.999), 0.0, device), device,
                     "fp32", 1.0, 0, EMA(model, decay=0.995))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, *shape, generator=g) * 2 - 1
    network = objective.network(model, process)
    sampler = samplers.build_sampler("dpm_solver_3m", steps=20)

    def train() -> None:
        step(lambda: loss(network, x0, loss.sample_t(batch, device, g), torch.randn(x0.shape, generator=g)))

    @torch.no_grad()
    def sample() -> None:
        x = sampler(objective.network(model.eval(), process), process, objective, torch.randn(x0.shape, generator=g))
        if decoder is not None:
            decoder.decode(x)
        model.train()

    return {"train": train, "sample": sample}


def seconds(fn: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def run(rounds: int, steps: int, batch: int) -> Dict[str, Dict[str, List[float]]]:
    """Images/s of every (arm, phase) in every round."""
    arms = {"pixel": arm(SHAPES["pixel"], batch, 0), "latent": arm(SHAPES["latent"], batch, 0, KLAutoencoder().eval())}
    for fns in arms.values():  # warm-up: allocator, Adam state, first calls
        fns["train"](), fns["sample"]()
    rates = {name: {"train": [], "sample": []} for name in arms}
    for r in range(rounds):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            rates[name]["train"].append(batch / seconds(arms[name]["train"], steps))
            rates[name]["sample"].append(batch / seconds(arms[name]["sample"], 1))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rates = run(args.rounds, args.steps, args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.rounds} rounds")
    result = {"rates": rates}
    for phase in ("train", "sample"):
        ratios = [a / b for a, b in zip(rates["latent"][phase], rates["pixel"][phase])]
        result[f"{phase}_ratio"] = statistics.median(ratios)
        print(f"{phase:>6}: pixel {statistics.median(rates['pixel'][phase]):8.1f} img/s | latent "
              f"{statistics.median(rates['latent'][phase]):8.1f} img/s | latent/pixel {statistics.median(ratios):.1f}x "
              f"(min {min(ratios):.1f}, max {max(ratios):.1f})")
    if args.json:
        files.write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
