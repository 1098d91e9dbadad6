"""`python -m diffusion_lab.evaluate checkpoint=PATH`: FID against sampling cost for one checkpoint.

Every sampler setting in `samplers` draws `num_samples` images from the same starting noise; the
result is a table and a plot of FID against NFE (model evaluations) and against wall time. For a class-conditional
checkpoint, `guidance_scales=[0,1,2,4]` scores every setting at each guidance scale w on labels cycling through
the classes, with the digits classifier's accuracy on the asked labels (digits only), and plots both against w.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("evaluate", "evaluate")  # --help and shell completion answer here, before torch is imported

import csv
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .config import CONF_DIR
from .config.build import resolve_device
from .config.preflight import checked_main, run_command
from .config.trained import check_steps, generate, load_trained, make_fid_evaluator, sampler_settings
from .data.images import save_grid
from .diffusion.conditioning import balanced_labels
from .diffusion.samplers import build_sampler, num_evaluations
from .evaluation.features import class_accuracy
from .evaluation.plots import plot_fid_vs_cost, plot_guidance
from .training.loggers import log_linked_run


def guidance_scales(cfg: DictConfig, labels: Optional[torch.Tensor]) -> List[Optional[float]]:
    """The swept w (``guidance_scales``), or [None] (each sampler setting's own) when not swept."""
    if cfg.guidance_scales is None:
        return [None]
    if labels is None:
        raise ValueError("guidance_scales needs a class-conditional checkpoint (model.num_classes=null)")
    if not cfg.guidance_scales or any(w < 0 for w in cfg.guidance_scales):
        raise ValueError(f"guidance_scales={list(cfg.guidance_scales)} must be a non-empty list of values >= 0")
    return [float(w) for w in cfg.guidance_scales]


def score(cfg: DictConfig, trained, evaluator, settings: Dict, labels: Optional[torch.Tensor], run_dir: Path,
          device: torch.device) -> Dict:
    """FID (and, for a conditional model with a classifier, the accuracy on the asked labels) of one setting."""
    settings = dict(settings)
    name = settings.pop("name")
    started = time.perf_counter()
    images = generate(trained, build_sampler(name, **settings), cfg.num_samples, cfg.batch_size, cfg.seed, device,
                      labels=labels)
    seconds = time.perf_counter() - started
    result = evaluator.score(images)
    nfe = num_evaluations(name, settings, trained.schedule.num_timesteps)
    w = settings.get("guidance_scale")
    tag = f"{name}-{nfe}" + (f"-w{w:g}" if w is not None else "")
    classifier = evaluator.extractor if hasattr(evaluator.extractor, "logits") else None
    accuracy = class_accuracy(classifier, images, labels) if labels is not None and classifier is not None else None
    save_grid(images[:64], run_dir / f"grid_{tag}.png")
    print(f"{tag:>20}  NFE {nfe:5d}  FID {result.value:9.4f} (floor {result.floor:.4f})  "
          + (f"accuracy {accuracy:.4f}  " if accuracy is not None else "") + f"{seconds:7.1f}s")
    return {"sampler": name, "nfe": nfe, "guidance_scale": w, "fid": result.value, "fid_floor": result.floor,
            "accuracy": accuracy, "seconds": seconds, "seconds_per_image": seconds / cfg.num_samples,
            "settings": json.dumps(settings), "label": result.label()}


def evaluate(cfg: DictConfig, run_dir: Path) -> List[Dict]:
    """One FID per sampler setting (and guidance scale); writes fid_vs_cost.{csv,json,png}, a grid per setting
    and, when guidance_scales is swept, guidance.png (FID and classifier accuracy against w)."""
    device = resolve_device(cfg.device)
    trained = load_trained(Path(cfg.checkpoint), device)
    every = [sampler_settings(entry) for entry in cfg.samplers]
    for settings in every:
        check_steps(settings, trained)
    labels = balanced_labels(trained.model, cfg.num_samples)
    scales = guidance_scales(cfg, labels)
    evaluator = make_fid_evaluator(cfg.eval, trained.config, device, cfg.num_samples)
    if not evaluator.enabled:
        raise ValueError(f"FID is disabled: {evaluator.disabled_reason}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [score(cfg, trained, evaluator, {**settings, **({} if w is None else {"guidance_scale": w})}, labels, run_dir,
                  device) for settings in every for w in scales]
    label = rows[-1].pop("label")
    for row in rows:
        row.pop("label", None)
    with open(run_dir / "fid_vs_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "fid_vs_cost.json").write_text(json.dumps({"label": label, "floor": evaluator.floor,
                                                          "floor_n": evaluator.floor_n, "checkpoint": str(cfg.checkpoint),
                                                          "step": trained.step, "rows": rows}, indent=2))
    title, floor = f"{label}, checkpoint step {trained.step}", (evaluator.floor, evaluator.floor_n)
    pictures = {"fid_vs_cost": plot_fid_vs_cost(rows, run_dir / "fid_vs_cost.png", title, floor=floor)}
    if scales != [None]:
        pictures["guidance"] = plot_guidance(rows, run_dir / "guidance.png", title, floor=floor)
    values = {f"fid/{r['sampler']}-{r['nfe']}" + (f"-w{r['guidance_scale']:g}" if r["guidance_scale"] is not None else ""):
              r["fid"] for r in rows}
    log_linked_run(OmegaConf.to_container(trained.config), trained.source, "evaluate", run_dir,
                   OmegaConf.to_container(cfg), {**values, "fid_floor": evaluator.floor, "fid_label": label}, pictures)
    print(f"{label}\nwrote {', '.join(str(p) for p in pictures.values())} and fid_vs_cost.csv")
    return rows


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_command(evaluate, cfg)


def main() -> None:
    checked_main(hydra_main, config_name="evaluate")


if __name__ == "__main__":
    main()
