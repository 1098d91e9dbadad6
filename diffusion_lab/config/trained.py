"""A trained checkpoint rebuilt from its saved config: the EMA model with its schedule and objective, ready to
sample from any sampler; and the sampler settings that `evaluate` and `sampler_lab` read from `conf/sampler/`."""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from .. import console
from ..diffusion.objectives import Objective
from ..errors import error_line
from ..evaluation.fid import FIDEvaluator
from ..evaluation.tracker import build_evaluator
from ..interop import diffusers_unet
from ..training import checkpoint
from ..training import run_dir as run_dirs
from . import CONF_DIR
from ..latent.space import LatentSpace
from .build import build_dataset, build_model, build_objective, build_schedule
from .latent import restore_latent


@dataclass
class Trained:
    """A checkpoint's EMA model with the schedule and objective it was trained with."""

    model: torch.nn.Module
    schedule: Any  # the noise process (a discrete schedule or a continuous process)
    objective: Objective
    config: DictConfig
    image_shape: tuple
    step: int
    source: dict  # the W&B run that trained it: {"run": id, "group": group} (None values without W&B)
    latent: Optional[LatentSpace] = None  # the latent space it diffuses in (its codec's hash checked); None: pixels

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.latent is None else self.latent.decode(x)


def load_trained(path, device: torch.device, data: Optional[DictConfig] = None) -> Trained:
    """The EMA model, schedule and objective of a checkpoint (a file or a run dir), its weights checked
    against the architecture its saved config describes before that model is built; ``diffusers:DIR`` is a
    diffusers UNet2DModel folder, whose FID reference is ``data`` (a run's checkpoint has its own data)."""
    if str(path).startswith(diffusers_unet.PREFIX):
        return load_diffusers(str(path)[len(diffusers_unet.PREFIX):], device, data)
    if data is not None:
        raise ValueError(f"data={data.name} names the FID data of a checkpoint=diffusers:DIR; the checkpoint {path} "
                         f"has its own (drop data=)")
    path = run_dirs.checkpoint_file(Path(path))
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = checkpoint.load(path, map_location=device)
    cfg = OmegaConf.create(state["config"])
    model = checked_model(path, state, cfg, device)
    model.eval()
    return Trained(model, build_schedule(cfg).to(device), build_objective(cfg), cfg,
                   tuple(state["image_shape"]), state["step"],
                   {"run": state.get("wandb_run_id"), "group": wandb_group(path)},
                   restore_latent(state.get("latent"), device, what=str(path)))


def load_diffusers(folder: str, device: torch.device, data: Optional[DictConfig]) -> Trained:
    """A diffusers folder as a Trained: step 0, no W&B run, `data` (or none) as the data its FID compares with."""
    loaded = diffusers_unet.load_folder(folder, device)
    if data is not None and OmegaConf.select(data, "image_size") not in (None, loaded.image_shape[1]):
        raise ValueError(f"data={data.name} has data.image_size={data.image_size}, the diffusers UNet makes "
                         f"{loaded.image_shape[1]}x{loaded.image_shape[2]} images: set data.image_size")
    cfg = OmegaConf.create({"checkpoint": diffusers_unet.PREFIX + folder, "logger": {"name": "none"},
                            "model": {"name": "diffusers", "num_classes": loaded.network.num_classes,
                                      "channels": loaded.image_shape[0]},
                            "schedule": {"name": "diffusers", "noise_steps": loaded.schedule.num_timesteps},
                            "objective": {"name": loaded.objective.name}})
    if data is not None:
        cfg.data = data
    return Trained(loaded.network, loaded.schedule.to(device), loaded.objective, cfg, loaded.image_shape, 0,
                   {"run": None, "group": None})


def checked_model(path: Path, state: dict, cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """The model of `cfg` holding the checkpoint's EMA weights. The architecture is first built on the meta
    device (no memory) and its keys and shapes compared with the weights, so a saved config that does not
    describe them (edited, foreign, huge) is refused with one line before any real allocation."""
    weights = checkpoint.ema_weights(path, state)
    channels, image_size, _ = state["image_shape"]
    embedding = weights.get("label_emb.weight")  # resolves model.num_classes=auto: K + 1 rows
    classes = embedding.shape[0] - 1 if torch.is_tensor(embedding) else None
    try:
        with torch.device("meta"):
            described = build_model(cfg, image_size, channels, classes).state_dict()
    except Exception as error:  # e.g. shapes too large to describe at all
        raise checkpoint.CheckpointError(f"{path}: its saved config describes a model that cannot be built: "
                                         f"{error_line(error)}") from error
    checkpoint.check_architecture(path, described, weights)
    model = build_model(cfg, image_size, channels, classes).to(device)
    model.load_state_dict(weights)
    return model


def wandb_group(path: Path) -> Optional[str]:
    """The W&B group named in the run's summary.json (<run dir>/checkpoints/<name>.pt), else None. The file is
    read for this name only, so a damaged one is ignored with a warning line rather than blocking the command."""
    run_summary = path.parent.parent / "summary.json"
    if not run_summary.is_file():
        return None
    try:
        group = json.loads(run_summary.read_text()).get("group")
    except (OSError, ValueError, AttributeError) as error:  # unreadable, not JSON, not an object
        print(f"warning: ignoring {run_summary} (only read for the W&B group): {error_line(error)}", file=sys.stderr)
        return None
    return group if isinstance(group, str) else None


def sampler_notice(trained: Trained, name: str) -> Optional[str]:
    """One line when a consistency model is sampled with an ODE or SDE sampler (which uses f as a denoiser at
    every step) instead of its own; None otherwise."""
    if trained.objective.name != "consistency" or name == "consistency":
        return None
    return (f"note: this checkpoint is a consistency model; sampler={name} uses it as a denoiser at every step: "
            f"its own sampler is sampler=consistency (sampler.steps=1, 2, ...)")


def check_steps(settings: dict, trained: Trained) -> None:
    """A sampler cannot take more steps than the checkpoint's schedule has timesteps."""
    if not trained.schedule.discrete:
        return
    steps, T = settings.get("steps"), trained.schedule.num_timesteps
    if steps is not None and steps > T:
        raise ValueError(f"sampler.steps={steps} ({settings.get('name')}) must be <= the checkpoint's "
                         f"schedule.noise_steps={T}")


def generate(trained: Trained, sampler: Callable, num_samples: int, batch_size: int, seed: int,
             device: torch.device, progress: bool = True, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """num_samples images in [-1, 1] on the CPU, generated batch by batch from seeded noise (latents decoded);
    image i of a conditional model has class ``labels[i]`` (guided as the sampler says)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = []
    starts = range(0, num_samples, batch_size)
    for start in console.progress(starts, len(starts), "sample") if progress else starts:
        x_T = torch.randn((min(batch_size, num_samples - start), *trained.image_shape), generator=generator,
                          device=device)
        y = None if labels is None else labels[start:start + len(x_T)].to(device)
        model = trained.objective.network(trained.model, trained.schedule)
        x_0 = sampler(model, trained.schedule, trained.objective, x_T, y=y, generator=generator,
                      **(trained.latent.sampler_options if trained.latent else {}))
        batches.append(trained.to_pixels(x_0).cpu())
    return torch.cat(batches)


def make_fid_evaluator(eval_cfg: DictConfig, train_cfg: DictConfig, device: torch.device,
                       num_samples: int) -> FIDEvaluator:
    """A FID evaluator against split `eval.reference` of the checkpoint's data, with its floor at num_samples."""
    if OmegaConf.select(train_cfg, "data") is None:
        raise ValueError(f"FID needs reference data: add data=digits, data=cifar10 or data=folder "
                         f"(checkpoint={OmegaConf.select(train_cfg, 'checkpoint')} names none)")
    return build_evaluator(eval_cfg, functools.partial(reference_data, train_cfg), device, num_samples,
                           progress=console.terminal())  # clean-fid's bar: no carriage returns in a redirected file


def reference_data(train_cfg: DictConfig, split: str):
    """Split `split` of the checkpoint's data; for a diffusers UNet, named by data=, refused with one line when its
    channels are not the UNet's (a run's data is its own)."""
    dataset = build_dataset(train_cfg, split)
    channels = OmegaConf.select(train_cfg, "model.channels") if train_cfg.model.name == "diffusers" else None
    if channels is not None and dataset.channels != channels:
        raise ValueError(f"data={dataset.name} has {dataset.channels} channel(s), the diffusers UNet makes {channels}: "
                         f"name the data it was trained on")
    return dataset


def sampler_settings(entry: DictConfig) -> Dict:
    """A sampler option's defaults from conf/sampler/<name>.yaml, updated with the entry's values (its `name` kept)."""
    path = CONF_DIR / "sampler" / f"{entry.name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"unknown sampler '{entry.name}'; known: {known}")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), entry), resolve=True)
