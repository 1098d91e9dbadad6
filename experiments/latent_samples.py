"""docs/latent_samples.png from `experiments/latent_digits.sh`'s dirs: one seed's samples of each arm (pixel,
autoencoder latent, PCA latent; DPM-Solver++(3M), 20 steps, the same sampler seed) beside held-out digits and the
autoencoder's reconstructions of them.

    PYTHONPATH=. python experiments/latent_samples.py outputs/latent [SEED] [OUT.png]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffusion_lab.config.trained import generate, load_trained
from diffusion_lab.data.datasets import build_dataset
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.evaluation.plots import image_rows
from diffusion_lab.latent.autoencoder_run import load_autoencoder

N = 12
ARMS = {"pixel": "pixel", "ae": "autoencoder latent", "pca": "PCA latent"}


def main(out: Path, seed: int, path: Path) -> None:
    cpu = torch.device("cpu")
    rows = {}
    for arm, label in ARMS.items():
        trained = load_trained(out / f"{arm}_s{seed}", cpu)
        rows[f"{label}\n(seed {seed})"] = generate(trained, build_sampler("dpm_solver_3m", steps=20), N, N, 0, cpu,
                                                   progress=False)
    test = build_dataset("digits", split="test", image_size=32)
    real = torch.stack([test[i] for i in range(N)])
    rows["held-out digits"] = real
    rows["their autoencoder\nreconstructions"] = load_autoencoder(out / "ae", cpu)[0].reconstruct(real)
    image_rows(rows, [""] * N, path, "digits at 32x32: samples at equal training time, DPM-Solver++(3M) 20 steps")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0,
         Path(sys.argv[3]) if len(sys.argv) > 3 else Path("docs/latent_samples.png"))
