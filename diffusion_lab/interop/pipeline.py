"""A trained run as a diffusers ``DDPMPipeline`` (UNet2DModel + DDPMScheduler), or the one line why it cannot be:
what has no exact UNet2DModel / DDPMScheduler counterpart is refused, never approximated."""
from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ..models.unet import DiffusionModelCIFAR
from .scheduler_map import PREDICTION_TYPES, scheduler_config
from .unet_map import head_dim, to_unet2d_state, unet2d_config


def refusal(cfg: DictConfig, model, schedule) -> Optional[str]:
    """Why the run of config `cfg` (its built `model` and `schedule`) cannot be a DDPMPipeline, or None."""
    name, objective = cfg.model.name, cfg.objective.name
    if OmegaConf.select(cfg, "latent") is not None:
        return f"latent={cfg.latent}: a latent run needs its decoder, which a DDPMPipeline does not have"
    if name != "cifar" or not isinstance(model, DiffusionModelCIFAR):
        return (f"model={name}: only model=cifar (the DDPM U-Net) maps to UNet2DModel; the base U-Net's skip "
                f"layout and transposed-conv upsampling have no UNet2DModel equivalent")
    if OmegaConf.select(cfg, "model.resample", default="reference") != "ddpm":
        return ("model.resample=reference: its 4x4 stride-2 conv / transposed conv have no UNet2DModel equivalent; "
                "only resample=ddpm (3x3 conv down, nearest + 3x3 conv up) maps")
    if not schedule.discrete:
        return (f"schedule={cfg.schedule.name} is a continuous-time process; DDPMPipeline needs a discrete schedule "
                f"and integer timesteps")
    if objective not in PREDICTION_TYPES:
        return (f"objective={objective} has no DDPMScheduler prediction_type; exported: "
                f"{', '.join(f'{ours} ({theirs})' for ours, theirs in PREDICTION_TYPES.items())}")
    if getattr(model, "num_classes", None) is not None:
        return "a class-conditional model: DDPMPipeline passes no class labels; export an unconditional run"
    try:
        head_dim(model)
    except ValueError as error:
        return str(error)
    return None


def ddpm_pipeline(model: DiffusionModelCIFAR, schedule, objective):
    """The DDPMPipeline of the same network (its weights copied under UNet2DModel's names) and schedule."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(**unet2d_config(model))
    unet.load_state_dict(to_unet2d_state(model), strict=True)  # every weight mapped, each of the same shape
    return DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(**scheduler_config(schedule, objective)))
