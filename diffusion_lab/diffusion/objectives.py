"""Training objectives: what the network predicts, and how any prediction becomes (x0_pred, eps_pred).

With x_t = a x0 + b eps (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t), a^2 + b^2 = 1):
  eps: the network predicts eps           (Ho et al. 2020)
  x0:  the network predicts x0
  v:   the network predicts v = a eps - b x0   (Salimans & Ho 2022)

Loss weighting is explicit, so a sweep over objectives compares objectives, not hidden weightings.
Written as a weight on ||x0 - x0_pred||^2 (SNR = a^2 / b^2):
  uniform: plain MSE on the target -> eps weights x0-error by SNR, x0 by 1, v by SNR + 1.
  min_snr: Hang et al. 2023 -> every objective weights x0-error by min(SNR, gamma); the per-target
           factor is min(SNR, gamma)/SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma)/(SNR + 1) for v.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..registry import OBJECTIVES
from .schedules import NoiseSchedule, extract

WEIGHTINGS = ("uniform", "min_snr")


class Objective:
    """Base class: subclasses define the target and the conversion back to (x0_pred, eps_pred)."""

    name = ""

    def __init__(self, weighting: str = "uniform", snr_gamma: float = 5.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting '{weighting}'; known: {', '.join(WEIGHTINGS)}")
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        self.weighting = weighting
        self.snr_gamma = snr_gamma

    def target(self, x0: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_x0_eps(
        self, pred: torch.Tensor, x_t: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Convert a network prediction into (x0_pred, eps_pred)."""
        raise NotImplementedError

    def snr_factor(self, snr: torch.Tensor) -> torch.Tensor:
        """min_snr weight on this objective's target MSE (see the module docstring)."""
        raise NotImplementedError

    def loss_weight(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight [B] on the target MSE."""
        if self.weighting == "uniform":
            return torch.ones(t.shape, device=t.device)
        return self.snr_factor(schedule.snr.to(t.device)[t])

    def loss(
        self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor
    ) -> torch.Tensor:
        """Weighted MSE between the prediction and this objective's target (a scalar)."""
        target = self.target(x0, eps, schedule, t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        return (self.loss_weight(schedule, t) * per_sample).mean()


def _ab(schedule: NoiseSchedule, t: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return extract(schedule.sqrt_alphas_cumprod, t, x), extract(schedule.sqrt_one_minus_alphas_cumprod, t, x)


@OBJECTIVES.register("eps")
class EpsObjective(Objective):
    name = "eps"

    def target(self, x0, eps, schedule, t):
        return eps

    def to_x0_eps(self, pred, x_t, schedule, t):
        a, b = _ab(schedule, t, x_t)
        return (x_t - b * pred) / a, pred  # x0 = (x_t - b eps) / a

    def snr_factor(self, snr):
        return snr.clamp(max=self.snr_gamma) / snr


@OBJECTIVES.register("x0")
class X0Objective(Objective):
    name = "x0"

    def target(self, x0, eps, schedule, t):
        return x0

    def to_x0_eps(self, pred, x_t, schedule, t):
        a, b = _ab(schedule, t, x_t)
        return pred, (x_t - a * pred) / b  # eps = (x_t - a x0) / b

    def snr_factor(self, snr):
        return snr.clamp(max=self.snr_gamma)


@OBJECTIVES.register("v")
class VObjective(Objective):
    name = "v"

    def target(self, x0, eps, schedule, t):
        a, b = _ab(schedule, t, x0)
        return a * eps - b * x0

    def to_x0_eps(self, pred, x_t, schedule, t):
        a, b = _ab(schedule, t, x_t)
        return a * x_t - b * pred, b * x_t + a * pred  # x0 = a x_t - b v,  eps = b x_t + a v

    def snr_factor(self, snr):
        return snr.clamp(max=self.snr_gamma) / (snr + 1.0)
