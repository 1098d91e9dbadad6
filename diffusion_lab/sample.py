"""`python -m diffusion_lab.sample checkpoint=PATH`: samples (and optionally FID) from a trained checkpoint.

The checkpoint's saved config rebuilds the model, schedule and objective, so a model trained with any
objective samples with any sampler: `sampler=ddim sampler.steps=50 num_samples=1000`.
Writes grid.png and samples.npz (array `images`, uint8, N x H x W x C) into the run dir. A class-conditional
checkpoint samples `labels=[...]` or `per_class=k` (default: num_samples cycling through the classes), guided by
`sampler.guidance_scale`; its grid has one row per class and samples.npz also holds `labels`.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("sample", "sample")  # --help and shell completion answer here, before torch is imported

from pathlib import Path
from typing import Optional, Tuple

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import console, files
from .config import CONF_DIR
from .config.build import build_sampler, resolve_device
from .config.preflight import checked_main, run_command
from .config.trained import check_steps, generate, load_trained, make_fid_evaluator, sampler_notice
from .data.images import save_grid, to_uint8
from .training import preemption
from .training.loggers import log_linked_run


def asked_labels(cfg: DictConfig, model: torch.nn.Module) -> Optional[torch.Tensor]:
    """The labels to sample: ``labels=[...]`` as given, ``per_class=k`` k of every class, else num_samples
    labels cycling through the classes; None for an unconditional model (which refuses labels)."""
    num_classes = getattr(model, "num_classes", None)
    if cfg.labels is not None and cfg.per_class is not None:
        raise ValueError("give labels=[...] or per_class=k, not both")
    if num_classes is None:
        if cfg.labels is not None or cfg.per_class is not None:
            raise ValueError("labels / per_class need a class-conditional checkpoint (model.num_classes=null)")
        return None
    if cfg.per_class is not None:
        return torch.arange(num_classes).repeat_interleave(int(cfg.per_class))
    if cfg.labels is None:
        return torch.arange(cfg.num_samples) % num_classes
    labels = torch.tensor(list(cfg.labels), dtype=torch.long)
    if len(labels) == 0 or bool(((labels < 0) | (labels >= num_classes)).any()):
        raise ValueError(f"labels={list(cfg.labels)} must be a non-empty list of classes in [0, {num_classes - 1}]")
    return labels


def class_rows(images: torch.Tensor, labels: torch.Tensor, per_row: int = 8) -> Tuple[torch.Tensor, int]:
    """A class-by-sample grid: one row per class (in order of first appearance), its first ``per_row`` images,
    short rows padded with blank (-1) images; returns (images, row length) for ``save_grid``."""
    classes = list(dict.fromkeys(labels.tolist()))
    rows = [images[labels == c][:per_row] for c in classes]
    width = max(len(r) for r in rows)
    blank = torch.full_like(images[:1], -1.0)
    return torch.cat([torch.cat([r, blank.expand(width - len(r), *r.shape[1:])]) for r in rows]), width


def sample(cfg: DictConfig, run_dir: Path) -> dict:
    """Write grid.png, samples.npz (and fid.json) into run_dir; return a summary."""
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, device, data=cfg.get("data"))  # data: a diffusers: checkpoint's FID data
    check_steps(OmegaConf.to_container(cfg.sampler), trained)
    notice = sampler_notice(trained, cfg.sampler.name)
    if notice:
        console.info(notice)
    sampler = build_sampler(cfg)
    labels = asked_labels(cfg, trained.model)
    num_samples = cfg.num_samples if labels is None else len(labels)
    images = generate(trained, sampler, num_samples, cfg.batch_size, cfg.seed, device, labels=labels)
    run_dir.mkdir(parents=True, exist_ok=True)
    if labels is None:
        save_grid(images[:64], run_dir / "grid.png")
        np.savez_compressed(run_dir / "samples.npz", images=to_uint8(images))
    else:
        grid, per_row = class_rows(images, labels)
        save_grid(grid, run_dir / "grid.png", nrow=per_row)
        np.savez_compressed(run_dir / "samples.npz", images=to_uint8(images), labels=labels.numpy())
    summary = {"checkpoint": str(cfg.checkpoint), "step": trained.step, "sampler": OmegaConf.to_container(cfg.sampler),
               "num_samples": num_samples, "objective": trained.config.objective.name}
    if cfg.fid:
        evaluator = make_fid_evaluator(cfg.eval, trained.config, device, num_samples)
        if evaluator.enabled:
            result = evaluator.score(images)
            console.info(str(result))
            beside = {k: v for k, v in result.metrics().items() if k not in ("fid", "fid_floor")}  # KID, P/R, ...
            summary["fid"] = {"value": result.value, "label": result.label(), "floor": result.floor,
                              "floor_n": result.floor_n, **beside}
    values = {f"fid_{k}" if k != "value" else "fid": v for k, v in summary.get("fid", {}).items()}
    summary["wandb"] = log_linked_run(OmegaConf.to_container(trained.config), trained.source, "sample", run_dir,
                                      OmegaConf.to_container(cfg), {"num_samples": num_samples, **values},
                                      {"grid": run_dir / "grid.png"})
    files.write_json(run_dir / "summary.json", summary)
    console.info(f"wrote {run_dir / 'grid.png'} and {run_dir / 'samples.npz'} ({num_samples} images)")
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="sample", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    with preemption.stop_on_signal("sample"):
        run_command(sample, cfg)


def main() -> None:
    checked_main(hydra_main, config_name="sample")


if __name__ == "__main__":
    main()
