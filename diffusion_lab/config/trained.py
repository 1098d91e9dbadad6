"""A trained checkpoint rebuilt from its saved config: the EMA model with its schedule and objective, ready to
sample from any sampler; and the sampler settings that `evaluate` and `sampler_lab` read from `conf/sampler/`."""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .. import console
from ..diffusion.objectives import Objective
from ..diffusion.schedules import NoiseSchedule
from ..evaluation.fid import FIDEvaluator
from ..evaluation.tracker import build_evaluator
from ..training import checkpoint
from ..training import run_dir as run_dirs
from . import CONF_DIR
from .build import build_dataset, build_model, build_objective, build_schedule


@dataclass
class Trained:
    """A checkpoint's EMA model with the schedule and objective it was trained with."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    objective: Objective
    config: DictConfig
    image_shape: tuple
    step: int
    source: dict  # the W&B run that trained it: {"run": id, "group": group} (None values without W&B)


def load_trained(path: Path, device: torch.device) -> Trained:
    path = run_dirs.checkpoint_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = checkpoint.load(path, map_location=device)
    cfg = OmegaConf.create(state["config"])
    channels, image_size, _ = state["image_shape"]
    embedding = state["model"].get("label_emb.weight")  # resolves model.num_classes=auto: K + 1 rows
    model = build_model(cfg, image_size, channels, None if embedding is None else embedding.shape[0] - 1).to(device)
    model.load_state_dict(state["train_step"]["ema"]["module"])
    model.eval()
    run_summary = path.parent.parent / "summary.json"  # <run dir>/checkpoints/<name>.pt
    group = json.loads(run_summary.read_text()).get("group") if run_summary.is_file() else None
    return Trained(model, build_schedule(cfg).to(device), build_objective(cfg), cfg,
                   tuple(state["image_shape"]), state["step"], {"run": state.get("wandb_run_id"), "group": group})


def check_steps(settings: dict, trained: Trained) -> None:
    """A sampler cannot take more steps than the checkpoint's schedule has timesteps."""
    steps, T = settings.get("steps"), trained.schedule.num_timesteps
    if steps is not None and steps > T:
        raise ValueError(f"sampler.steps={steps} ({settings.get('name')}) must be <= the checkpoint's "
                         f"schedule.noise_steps={T}")


def generate(trained: Trained, sampler: Callable, num_samples: int, batch_size: int, seed: int,
             device: torch.device, progress: bool = True, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """num_samples images in [-1, 1] on the CPU, generated batch by batch from seeded noise; image i of a
    conditional model has class ``labels[i]`` (guided as the sampler says)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    starts = range(0, num_samples, batch_size)
    for start in console.progress(starts, len(starts), "sample") if progress else starts:
        x_T = torch.randn((min(batch_size, num_samples - start), *trained.image_shape), generator=generator,
                          device=device)
        y = None if labels is None else labels[start:start + len(x_T)].to(device)
        batches.append(sampler(trained.model, trained.schedule, trained.objective, x_T, y=y, generator=generator).cpu())
    return torch.cat(batches)


def make_fid_evaluator(eval_cfg: DictConfig, train_cfg: DictConfig, device: torch.device,
                       num_samples: int) -> FIDEvaluator:
    """A FID evaluator against split `eval.reference` of the checkpoint's data, with its floor at num_samples."""
    return build_evaluator(eval_cfg, functools.partial(build_dataset, train_cfg), device, num_samples,
                           progress=console.terminal())  # clean-fid's bar: no carriage returns in a redirected file


def sampler_settings(entry: DictConfig) -> Dict:
    """A sampler option's defaults from conf/sampler/<name>.yaml, updated with the entry's values (its `name` kept)."""
    path = CONF_DIR / "sampler" / f"{entry.name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"unknown sampler '{entry.name}'; known: {known}")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), entry), resolve=True)
