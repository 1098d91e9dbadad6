"""The table of docs/latent.md from `experiments/latent_digits.sh`'s dirs: per arm (pixel, autoencoder latent,
PCA latent) the FID at n=1000 against the held-out digits, training and sampling images/s and wall time, as means
with 95% t-intervals over seeds, Welch's test of each latent arm against pixel, and the autoencoder's ceiling.

    python experiments/latent_table.py outputs/latent
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List

from diffusion_lab.evaluation.seeds import interval, welch

N_CEILING = 1000  # reconstructed train images per ceiling FID: the same n as the floor and the samples

ARMS = {"pixel": "pixel 1x32x32", "ae": "latent: autoencoder 4x8x8", "pca": "latent: PCA 4x8x8"}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def arm_values(out: Path, arm: str, seeds: List[int]) -> Dict[str, List[float]]:
    """FID, images/s (train, sample) and training seconds of one arm, per seed."""
    values: Dict[str, List[float]] = {"fid": [], "floor": [], "train_ips": [], "sample_ips": [], "train_s": [], "steps": []}
    for seed in seeds:
        row = read(out / f"eval_{arm}_s{seed}" / "fid_vs_cost.json")["rows"][0]
        summary = read(out / f"{arm}_s{seed}" / "summary.json")
        values["fid"].append(row["fid"])
        values["floor"].append(row.get("fid_floor") or float("nan"))
        values["sample_ips"].append(1.0 / row["seconds_per_image"])
        values["train_ips"].append(summary["train_images_per_s"])
        values["train_s"].append(summary["wall_time_s"])
        values["steps"].append(summary["steps"])
    return values


def shown(values: List[float], digits: int = 1) -> str:
    mean, half = interval(values)
    return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if half is not None else "")


def ceilings(out: Path) -> Dict[str, object]:
    """FID of 1000 *train* images passed through each codec (autoencoder, PCA) against the held-out reference,
    beside the floor (the same 1000 train images unchanged): what a latent model that generates the train
    latents exactly would score, so the best FID each latent space allows."""
    import torch
    from omegaconf import OmegaConf

    from diffusion_lab.config import CONF_DIR
    from diffusion_lab.config.trained import load_trained, make_fid_evaluator
    from diffusion_lab.data.datasets import build_dataset
    from diffusion_lab.latent.autoencoder_run import load_autoencoder
    from diffusion_lab.latent.pca import PCACodec

    cpu = torch.device("cpu")
    evaluator = make_fid_evaluator(OmegaConf.load(CONF_DIR / "eval" / "default.yaml"),
                                   load_trained(out / "pixel_s0", cpu).config, cpu, N_CEILING)
    train = build_dataset("digits", split="train", image_size=32).images
    x = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:N_CEILING]]
    pca = PCACodec.fit(train, 4, 4)
    return {"real train images": evaluator.score(x), "autoencoder reconstructions": evaluator.score(
        load_autoencoder(out / "ae", cpu)[0].reconstruct(x)), "PCA reconstructions": evaluator.score(pca.decode(pca.encode(x)))}


def main(out: Path) -> None:
    seeds = sorted(int(p.name.split("_s")[1]) for p in out.glob("pixel_s*") if (p / "summary.json").is_file())
    table = {arm: arm_values(out, arm, seeds) for arm in ARMS}
    print(f"seeds {seeds}; FID n=1000 vs the 359 held-out digits (32x32), dpm_solver_3m 20 steps; 95% t-intervals\n")
    print("| arm | steps | train s | train img/s | sample img/s | FID | per seed |")
    print("|---|---|---|---|---|---|---|")
    for arm, label in ARMS.items():
        v = table[arm]
        print(f"| {label} | {v['steps'][0]} | {shown(v['train_s'], 0)} | {shown(v['train_ips'], 0)} | "
              f"{shown(v['sample_ips'], 0)} | {shown(v['fid'])} | {', '.join(f'{f:.1f}' for f in v['fid'])} |")
    print(f"\nnoise floor (real train images vs the reference, n=1000): {table['pixel']['floor'][0]:.2f}")
    for arm in ("ae", "pca"):
        p = welch(table[arm]["fid"], table["pixel"]["fid"])
        print(f"- {ARMS[arm]} vs pixel: FID difference {shown([a - b for a, b in zip(table[arm]['fid'], table['pixel']['fid'])])}"
              f", Welch p = {p:.3g}" if p is not None else "")
        ratio = [a / b for a, b in zip(table[arm]["train_ips"], table["pixel"]["train_ips"])]
        print(f"  training images/s over pixel's (in the runs, not side by side): {shown(ratio)}")
    print(f"\nceilings: FID of {N_CEILING} train images through each codec against the same reference:")
    for name, result in ceilings(out).items():
        print(f"- {name}: {result.value:.2f}")
    ae = read(out / "ae" / "summary.json")
    print(f"\nthe autoencoder run's own reconstruction FID {ae['recon_fid']:.2f} (floor {ae['fid_floor']:.2f} at "
          f"n={ae['fid_floor_n']}, {ae['fid_label']}), held-out L1 {ae['test_recon_l1']:.4f}")
    bench = out / "bench.json"
    if bench.is_file():
        b = read(bench)
        print(f"side by side (experiments/bench_latent.py): training {b['train_ratio']:.1f}x, sampling "
              f"{b['sample_ratio']:.1f}x the pixel images/s")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/latent"))
