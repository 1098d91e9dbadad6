"""Config -> registry builds -> components: the one place that turns the data, model, schedule,
objective and sampler config nodes into objects."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from omegaconf import DictConfig, OmegaConf

from . import data, models, objectives, samplers, schedules  # noqa: F401  (registers components)
from .objectives import Objective
from .registry import MODELS, OBJECTIVES, SCHEDULES
from .schedules import NoiseSchedule


def params(node: DictConfig) -> Dict[str, Any]:
    """A config node as builder keyword arguments (everything except its `name`)."""
    values = OmegaConf.to_container(node, resolve=True)
    values.pop("name", None)
    return values


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; a device that is not there is a one-line ValueError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from error
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device={name!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} is not available here")
    return device


def build_schedule(cfg: DictConfig) -> NoiseSchedule:
    return SCHEDULES.build(cfg.schedule.name, **params(cfg.schedule))


def build_objective(cfg: DictConfig) -> Objective:
    return OBJECTIVES.build(cfg.objective.name, **params(cfg.objective))


def build_model(cfg: DictConfig, image_size: int, channels: int) -> torch.nn.Module:
    return MODELS.build(cfg.model.name, image_size=image_size, channels=channels, **params(cfg.model))


def build_sampler(cfg: DictConfig) -> Callable[..., torch.Tensor]:
    return samplers.build_sampler(cfg.sampler.name, **params(cfg.sampler))


@dataclass
class Components:
    """Everything a run is made of, built from the config."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    objective: Objective
    sampler: Callable[..., torch.Tensor]
    image_shape: tuple  # (channels, image_size, image_size)


def build_components(cfg: DictConfig, device: torch.device, image_size: int, channels: int) -> Components:
    """Model, schedule, objective and sampler for images of (channels, image_size, image_size)."""
    return Components(
        model=build_model(cfg, image_size, channels).to(device),
        schedule=build_schedule(cfg).to(device),
        objective=build_objective(cfg),
        sampler=build_sampler(cfg),
        image_shape=(channels, image_size, image_size),
    )


def build_dataset(cfg: DictConfig, split: str = "train"):
    """The configured dataset's ``split``: ``train`` (what training reads; only its first
    ``train.overfit_batches`` batches when that is set) or ``test`` (held out)."""
    dataset = data.build_dataset(cfg.data.name, split=split, **params(cfg.data))
    overfit_batches = OmegaConf.select(cfg, "train.overfit_batches", default=0)
    if split == "train" and overfit_batches:
        return data.FirstImages(dataset, overfit_batches * cfg.train.batch_size)
    return dataset
