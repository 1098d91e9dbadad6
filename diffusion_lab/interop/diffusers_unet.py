"""A local diffusers UNet2DModel folder (``checkpoint=diffusers:DIR``) as a network our samplers run: its weights
read with safetensors only (no pickled code), its scheduler config read for the schedule and the objective.

DIR is a pipeline folder (model_index.json, unet/, scheduler/; e.g. google/ddpm-cifar10-32 as downloaded) or a
bare UNet2DModel folder (config.json and its weights) with scheduler_config.json beside them or in scheduler/.
A UNet with ``num_class_embeds = K + 1`` is K classes plus our null class K (classifier-free guidance).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..diffusion.objectives import Objective
from ..diffusion.schedules import NoiseSchedule
from ..training.checkpoint import CheckpointError
from .scheduler_map import objective_of, schedule_of

PREFIX = "diffusers:"
TIME_EMBEDDINGS = ("positional", "learned")  # those fed integer timesteps (fourier expects continuous sigma)


class DiffusersNetwork(nn.Module):
    """``unet(x, t, class_labels=y).sample`` called as our networks are, ``model(x, t, y=None)``; a conditional
    UNet gets the null class K when y is None."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet
        embeds = unet.config.num_class_embeds
        self.num_classes: Optional[int] = int(embeds) - 1 if embeds else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.num_classes is None and y is not None:
            raise ValueError("labels given to an unconditional diffusers UNet (its num_class_embeds is null)")
        if self.num_classes is not None and y is None:
            y = torch.full(x.shape[:1], self.num_classes, dtype=torch.long, device=x.device)
        return self.unet(x, t, class_labels=y).sample


@dataclass
class DiffusersCheckpoint:
    """What a diffusers folder gives: the network, its training schedule and parameterisation, the image shape."""

    network: DiffusersNetwork
    schedule: NoiseSchedule
    objective: Objective
    image_shape: tuple
    scheduler: Dict[str, Any]  # the scheduler config as read


def folders(path: Path, where: str) -> tuple:
    """(unet folder, scheduler config file) of a pipeline folder or a bare UNet folder."""
    unet = path / "unet" if (path / "model_index.json").is_file() or (path / "unet").is_dir() else path
    candidates = [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"]
    scheduler = next((c for c in candidates if c.is_file()), None)
    if not (unet / "config.json").is_file():
        raise CheckpointError(f"{where}: no UNet2DModel there (no config.json in {unet})")
    if scheduler is None:
        raise CheckpointError(f"{where}: no scheduler config (scheduler/scheduler_config.json or scheduler_config.json)")
    if not list(unet.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in unet.glob("*.bin"))) or "none"
        raise CheckpointError(f"{where}: {unet} has no .safetensors weights (found: {found}); pickled .bin weights "
                              f"are not loaded: save them with save_pretrained(..., safe_serialization=True)")
    return unet, scheduler


def read_json(path: Path, where: str) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{where}: cannot read {path}: {str(error).splitlines()[0]}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {path} is not a JSON object")
    return value


def check_unet_config(config: Dict[str, Any], where: str) -> None:
    """What our samplers cannot run: another model class, a non-integer time embedding, labels that are not
    classes, or an output that is not one prediction per input channel (a learned variance)."""
    name = config.get("_class_name", "UNet2DModel")
    problems = [
        (name != "UNet2DModel", f"it is a {name}, not a UNet2DModel"),
        (config.get("time_embedding_type", "positional") not in TIME_EMBEDDINGS,
         f"time_embedding_type={config.get('time_embedding_type')!r} (read: {', '.join(TIME_EMBEDDINGS)})"),
        (config.get("class_embed_type") is not None, f"class_embed_type={config.get('class_embed_type')!r} "
                                                     f"(labels are read only as num_class_embeds classes)"),
        (config.get("num_class_embeds") is not None and int(config["num_class_embeds"]) < 2,
         "num_class_embeds < 2 (K classes + a null class need K + 1 >= 2)"),
        (config.get("out_channels", 3) != config.get("in_channels", 3),
         "out_channels != in_channels (a learned variance is not read)"),
    ]
    for bad, why in problems:
        if bad:
            raise CheckpointError(f"{where}: cannot be sampled here: {why}")


def load_unet(unet_dir: Path, device: torch.device, where: str) -> nn.Module:
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as error:
        raise CheckpointError(f"{where}: cannot load a UNet2DModel with safetensors weights: "
                              f"{str(error).splitlines()[0]}") from error
    return unet.to(device).eval().requires_grad_(False)


def load_folder(folder: str, device: torch.device) -> DiffusersCheckpoint:
    """The network, schedule and objective of a local diffusers folder; one-line CheckpointError otherwise."""
    where = f"checkpoint={PREFIX}{folder}"
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{where}: no such folder")
    unet_dir, scheduler_file = folders(path, where)
    unet_config, scheduler = read_json(unet_dir / "config.json", where), read_json(scheduler_file, where)
    check_unet_config(unet_config, where)
    try:
        schedule, objective = schedule_of(scheduler, where), objective_of(scheduler, where)
    except ValueError as error:
        raise CheckpointError(str(error)) from error
    network = DiffusersNetwork(load_unet(unet_dir, device, where))
    size = network.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusersCheckpoint(network, schedule, objective, (network.unet.config.in_channels, height, width),
                               scheduler)
