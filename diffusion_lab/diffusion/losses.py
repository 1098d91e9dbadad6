"""The training recipe as one object (as EDM's ``loss.py``): noise-level density, weighting, noising and the MSE.

    loss = E_{t ~ density, eps ~ N(0, I)} [ w(t) ||F_target - F(x_t, t)||^2 ],   x_t = alpha(t) x0 + sigma(t) eps

Densities draw the noise level (in the process's time, via logSNR lambda where they are defined on it):
  uniform       t ~ U(t_min, t_max) (integer t for a discrete schedule: DDPM)
  lognormal     ln(sigma/alpha) = -lambda ~ N(P_mean, P_std^2)            (Karras et al. 2022: -1.2, 1.2)
  logit_normal  lambda = -u, u ~ N(logit_mean, logit_std^2): t = sigmoid(u) on the flow path (Esser et al. 2024)
Weightings are written once as a weight on the x0 error, as a function of SNR = exp(2 lambda) (Kingma & Gao 2023
show every such choice is a weighted ELBO); the weight on the target MSE is that times the parameterisation's
``x0_factor``:
  uniform   plain MSE on the target (no weight; its x0 weight is 1 / x0_factor: SNR for eps, 1 for x0)
  min_snr   min(SNR, gamma)                          (Hang et al. 2023)
  edm       SNR + 1 / sigma_data^2 = (s~^2 + d^2) / (s~ d)^2, s~ = sigma/alpha   (Karras et al. 2022, lambda(sigma))
  sigmoid   SNR * sigmoid(b - lambda), i.e. sigmoid(b - lambda) on the eps error (Kingma & Gao 2023)
The weight is per drawn sample: the total weighting over lambda is density(lambda) * weight(lambda).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ..registry import Registry

RECIPES = Registry("training recipe")  # an objective's ``recipe`` names its loss class here
DENSITIES = Registry("noise-level density")
WEIGHTINGS = Registry("loss weighting")
RECIPE_KEYS = ("weighting", "snr_gamma", "sigmoid_bias", "density", "P_mean", "P_std", "logit_mean", "logit_std")


@DENSITIES.register("uniform")
def uniform(process, n: int, device, generator, loss: "DiffusionLoss") -> torch.Tensor:
    return process.sample_timesteps(n, device, generator)


@DENSITIES.register("lognormal")
def lognormal(process, n, device, generator, loss):
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return process.from_log_snr(-(loss.P_mean + loss.P_std * z))  # ln sigma~ = P_mean + P_std z


@DENSITIES.register("logit_normal")
def logit_normal(process, n, device, generator, loss):
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    return process.from_log_snr(-(loss.logit_mean + loss.logit_std * z))


@WEIGHTINGS.register("uniform")
def _uniform(lam: torch.Tensor, loss: "DiffusionLoss") -> Optional[torch.Tensor]:
    return None


@WEIGHTINGS.register("min_snr")
def _min_snr(lam, loss):
    return torch.exp(2 * lam).clamp(max=loss.snr_gamma)


@WEIGHTINGS.register("edm")
def _edm(lam, loss):
    return torch.exp(2 * lam) + 1.0 / loss.sigma_data**2


@WEIGHTINGS.register("sigmoid")
def _sigmoid(lam, loss):
    return torch.exp(2 * lam) * torch.sigmoid(loss.sigmoid_bias - lam)


@RECIPES.register("diffusion")
class DiffusionLoss:
    """The recipe: ``loss.sample_t(n, device, generator)`` draws noise levels, ``loss(model, x0, t, eps, **cond)``
    noises, predicts and returns the weighted MSE. ``model`` is the network in process coordinates
    (``objective.network(net, process)``)."""

    def __init__(self, process, objective, weighting: str = "uniform", density: str = "uniform",
                 snr_gamma: float = 5.0, sigmoid_bias: float = 2.0, P_mean: float = -1.2, P_std: float = 1.2,
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        self.weight_fn, self.density_fn = WEIGHTINGS.get(weighting), DENSITIES.get(density)
        if snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0, got {snr_gamma}")
        if P_std <= 0 or logit_std <= 0:
            raise ValueError(f"objective.P_std and objective.logit_std must be > 0, got {P_std}, {logit_std}")
        objective.check(process)
        self.process, self.objective = process, objective
        self.weighting, self.density = weighting, density
        self.snr_gamma, self.sigmoid_bias = float(snr_gamma), float(sigmoid_bias)
        self.P_mean, self.P_std, self.logit_mean, self.logit_std = float(P_mean), float(P_std), float(logit_mean), \
            float(logit_std)
        self.sigma_data = getattr(objective, "sigma_data", 0.5)

    KEYS = RECIPE_KEYS

    @classmethod
    def from_config(cls, process, objective, values: Dict) -> "DiffusionLoss":
        """The recipe from the recipe keys of an objective config node (the others belong to the objective)."""
        return cls(process, objective, **{k: v for k, v in values.items() if k in RECIPE_KEYS})

    def set_progress(self, step: int, total_steps: int) -> None:
        """A diffusion recipe does not change while training (a consistency curriculum does)."""

    def sample_t(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.density_fn(self.process, n, device, generator, self)

    def weight(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-sample weight [B] on the target MSE (None: unweighted)."""
        x0_weight = self.weight_fn(self.process.log_snr(t).to(torch.float64).to(t.device), self)
        return None if x0_weight is None else (x0_weight * self.objective.x0_factor(self.process, t)).float()

    def __call__(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 **cond) -> torch.Tensor:
        x_t, _ = self.process.add_noise(x0, t, eps)
        return self.mse(model(x_t, t, **cond), x0, eps, t)

    def mse(self, pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The weighted MSE of a prediction of x_t = alpha(t) x0 + sigma(t) eps (a scalar)."""
        target = self.objective.target(x0, eps, self.process, t)
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        weight = self.weight(t)
        return per_sample.mean() if weight is None else (weight * per_sample).mean()


def describe(loss: DiffusionLoss) -> str:
    """The recipe in one line, for the start line."""
    extra = {"min_snr": f" gamma {loss.snr_gamma:g}", "sigmoid": f" b {loss.sigmoid_bias:g}"}.get(loss.weighting, "")
    dens = {"lognormal": f" ({loss.P_mean:g}, {loss.P_std:g})",
            "logit_normal": f" ({loss.logit_mean:g}, {loss.logit_std:g})"}.get(loss.density, "")
    return f"loss: {loss.objective.name} target, {loss.weighting}{extra} weighting, {loss.density}{dens} noise levels"

