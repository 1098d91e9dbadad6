"""`python -m diffusion_lab.evaluate checkpoint=PATH`: FID against sampling cost for one checkpoint.

Every sampler setting in `samplers` draws `num_samples` images from the same starting noise; the
result is a table and a plot of FID against NFE (model evaluations) and against wall time.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Dict, List

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from .build import resolve_device  # noqa: E402
from .config import CONF_DIR, fail  # noqa: E402
from .data import save_grid  # noqa: E402
from .sample import generate, load_trained, make_fid_evaluator  # noqa: E402
from .samplers import build_sampler, num_evaluations  # noqa: E402


def sampler_settings(entry: DictConfig) -> Dict:
    """A sampler option's defaults from conf/sampler/<name>.yaml, updated with the entry's values."""
    path = CONF_DIR / "sampler" / f"{entry.name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"unknown sampler '{entry.name}'; known: {known}")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), entry))


def plot_cost(rows: List[Dict], path: Path, label: str) -> Path:
    """FID against NFE (log x) and against seconds per image, one line per sampler."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["sampler"] for r in rows}):
        mine = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        for ax, key in zip(axes, ("nfe", "seconds_per_image")):
            ax.plot([r[key] for r in mine], [r["fid"] for r in mine], marker="o", label=name)
    for ax, xlabel in zip(axes, ("model evaluations (NFE)", "wall seconds per image")):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(cfg: DictConfig, run_dir: Path) -> List[Dict]:
    """One FID per sampler setting; writes fid_vs_cost.{csv,json,png} and a grid per setting."""
    device = resolve_device(cfg.device)
    trained = load_trained(Path(cfg.checkpoint), device)
    evaluator = make_fid_evaluator(cfg.eval, trained.config, device)
    if not evaluator.enabled:
        raise ValueError(f"FID is disabled: {evaluator.disabled_reason}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, label = [], ""
    for entry in cfg.samplers:
        settings = sampler_settings(entry)
        name = settings.pop("name")
        sampler = build_sampler(name, **settings)
        started = time.perf_counter()
        images = generate(trained, sampler, cfg.num_samples, cfg.batch_size, cfg.seed, device)
        seconds = time.perf_counter() - started
        result = evaluator.score(images)
        nfe = num_evaluations(name, settings, trained.schedule.num_timesteps)
        tag = f"{name}-{nfe}"
        save_grid(images[:64], run_dir / f"grid_{tag}.png")
        rows.append({"sampler": name, "nfe": nfe, "fid": result.value, "seconds": seconds,
                     "seconds_per_image": seconds / cfg.num_samples, "settings": json.dumps(settings)})
        label = result.label()
        print(f"{tag:>16}  NFE {nfe:5d}  FID {result.value:9.4f}  {seconds:7.1f}s")
    with open(run_dir / "fid_vs_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "fid_vs_cost.json").write_text(json.dumps({"label": label, "checkpoint": str(cfg.checkpoint),
                                                          "step": trained.step, "rows": rows}, indent=2))
    plot_cost(rows, run_dir / "fid_vs_cost.png", f"{label}, checkpoint step {trained.step}")
    print(f"{label}\nwrote {run_dir / 'fid_vs_cost.png'} and fid_vs_cost.csv")
    return rows


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (FileNotFoundError, ValueError) as error:
        fail(str(error).splitlines()[0])


if __name__ == "__main__":
    main()
