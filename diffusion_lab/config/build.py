"""Config -> registry builds -> components: the one place that turns the data, model, schedule,
objective and sampler config nodes into objects."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .. import models  # noqa: F401  (registers the models)
from ..data import datasets as data
from ..diffusion import conditioning, consistency, objectives, processes, samplers, schedules  # noqa: F401  (registers components)
from ..diffusion.losses import RECIPES
from ..diffusion.objectives import Objective
from ..registry import MODELS, OBJECTIVES, SCHEDULES
from ..training.loop import Components


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


def build_schedule(cfg: DictConfig):
    """The noise process (`schedule=`): a discrete schedule or a continuous process."""
    return SCHEDULES.build(cfg.schedule.name, **params(cfg.schedule))


def recipe_class(objective_name: str):
    """The loss class that trains objective `objective_name` (its `recipe`, from losses.RECIPES)."""
    return RECIPES.get(OBJECTIVES.get(objective_name).recipe)


def build_objective(cfg: DictConfig) -> Objective:
    """The parameterisation (`objective=`), from its own keys (the recipe keys belong to the loss)."""
    keys = recipe_class(cfg.objective.name).KEYS
    values = {k: v for k, v in params(cfg.objective).items() if k not in keys}
    return OBJECTIVES.build(cfg.objective.name, **values)


def build_loss(cfg: DictConfig, process, objective: Objective):
    """The training recipe (a diffusion or consistency loss) from the objective node's recipe keys."""
    return RECIPES.get(objective.recipe).from_config(process, objective, params(cfg.objective))


def build_model(cfg: DictConfig, image_size: int, channels: int, data_classes: Optional[int] = None) -> torch.nn.Module:
    """The configured model; ``model.num_classes=auto`` becomes ``data_classes`` (the dataset's class count)."""
    values = params(cfg.model)
    if "num_classes" in values:  # configs saved before class conditioning have no such key
        values["num_classes"] = conditioning.resolve_num_classes(values["num_classes"], data_classes)
    return MODELS.build(cfg.model.name, image_size=image_size, channels=channels, **values)


def build_sampler(cfg: DictConfig) -> Callable[..., torch.Tensor]:
    return samplers.build_sampler(cfg.sampler.name, **params(cfg.sampler))


def build_components(cfg: DictConfig, device: torch.device, image_size: int, channels: int,
                     data_classes: Optional[int] = None, latent=None) -> Components:
    """Model, schedule, objective and sampler for images (or latents: `latent` is their space) of
    (channels, image_size, image_size) whose data has ``data_classes`` classes (None: unlabelled); a conditional
    model must be able to embed every label."""
    model = build_model(cfg, image_size, channels, data_classes)
    conditioning.check_data(getattr(model, "num_classes", None), data_classes, cfg.data.name)
    process, objective = build_schedule(cfg).to(device), build_objective(cfg)
    return Components(
        model=model.to(device),
        schedule=process,
        objective=objective,
        sampler=build_sampler(cfg),
        image_shape=(channels, image_size, image_size),
        loss=build_loss(cfg, process, objective),
        latent=latent,
    )


def build_dataset(cfg: DictConfig, split: str = "train"):
    """The configured dataset's ``split``: ``train`` (what training reads; only its first
    ``train.overfit_batches`` batches when that is set) or ``test`` (held out)."""
    dataset = data.build_dataset(cfg.data.name, split=split, **params(cfg.data))
    overfit_batches = OmegaConf.select(cfg, "train.overfit_batches", default=0)
    if split == "train" and overfit_batches:
        return data.FirstImages(dataset, overfit_batches * cfg.train.batch_size)
    return dataset
