"""Our discrete schedules and objectives as a diffusers scheduler config, and back.

Export: ``DDPMScheduler`` with ``trained_betas`` = our betas (so every discrete schedule maps exactly),
``num_train_timesteps`` = T, the prediction type of our objective, and our ``ddpm`` sampler's defaults
(``variance_type="fixed_small"``, ``clip_sample=True`` in [-1, 1]). Our discrete schedule feeds the network the
integer timestep itself (``NoiseSchedule.c_noise(t) = t``), as DDPMPipeline does.
Import: a scheduler config's ``trained_betas``, or ``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2 with
beta_start, beta_end and num_train_timesteps (``rescale_betas_zero_snr`` applied), as a ``NoiseSchedule``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch

from ..diffusion.objectives import Objective
from ..diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas, rescale_zero_terminal_snr
from ..registry import OBJECTIVES

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}  # our objective -> diffusers' name


def scheduler_config(schedule: NoiseSchedule, objective: Objective) -> Dict[str, Any]:
    """The DDPMScheduler config of ``schedule`` sampled as our ``ddpm`` sampler does, predicting as ``objective``."""
    return dict(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.cpu().tolist(),
                prediction_type=PREDICTION_TYPES[objective.name], variance_type="fixed_small", clip_sample=True,
                clip_sample_range=1.0, thresholding=False)


BETA_SCHEDULES: Dict[str, Callable[[int, float, float], torch.Tensor]] = {
    "linear": linear_betas,
    "scaled_linear": lambda T, start, end: linear_betas(T, math.sqrt(start), math.sqrt(end)) ** 2,
    "squaredcos_cap_v2": lambda T, start, end: cosine_betas(T, s=0.008, max_beta=0.999),
}


def betas_of(config: Dict[str, Any], where: str) -> torch.Tensor:
    """The training betas a scheduler config describes (float64); a ValueError naming what cannot be read."""
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(list(config["trained_betas"]), dtype=torch.float64)
        if betas.shape != (T,):
            raise ValueError(f"{where}: trained_betas has {betas.numel()} values, num_train_timesteps is {T}")
    else:
        kind = config.get("beta_schedule", "linear")
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"{where}: beta_schedule={kind!r} is not read; known: {', '.join(BETA_SCHEDULES)} "
                             f"or trained_betas")
        betas = BETA_SCHEDULES[kind](T, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
    return rescale_zero_terminal_snr(betas) if config.get("rescale_betas_zero_snr") else betas


def schedule_of(config: Dict[str, Any], where: str) -> NoiseSchedule:
    """The discrete schedule of a scheduler config."""
    try:
        return NoiseSchedule(betas_of(config, where))
    except (TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: cannot read its betas: {error}") from error


def objective_of(config: Dict[str, Any], where: str) -> Objective:
    """Our objective for the config's prediction_type (epsilon, v_prediction or sample)."""
    ours = {theirs: name for name, theirs in PREDICTION_TYPES.items()}
    kind = config.get("prediction_type", "epsilon")
    if kind not in ours:
        raise ValueError(f"{where}: prediction_type={kind!r} is not read; known: {', '.join(ours)}")
    return OBJECTIVES.build(ours[kind])
