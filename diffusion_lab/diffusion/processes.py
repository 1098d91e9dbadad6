"""Noise processes: x_t = alpha(t) x0 + sigma(t) eps over a continuous time t (Kingma et al. 2021 notation).

A process gives alpha, sigma, their time derivatives, the logSNR lambda(t) = log(alpha / sigma) and its inverse,
all in float64, and ``c_noise(t)``: the noise-level input the network receives. The discrete DDPM schedules
(``schedules.NoiseSchedule``, integer t) are the discrete special case of the same interface. Chosen with
``schedule=``:

    vp    Song et al. 2021 (VP SDE): log alpha = -t^2 (beta_max - beta_min)/4 - t beta_min/2, sigma^2 = 1 - alpha^2
    ve    Song et al. 2021 (VE SDE, their CIFAR-10 NCSN++ range): alpha = 1, sigma = s_min (s_max/s_min)^t
    edm   Karras et al. 2022: alpha = 1, sigma = t in [0.002, 80] (the time is the noise level itself)
    flow  Liu et al. 2023 (rectified flow) / Lipman et al. 2023 (conditional OT path): alpha = 1 - t, sigma = t

Samplers read a process through ``points()`` (Python floats at grid times, index CLEAN = clean data) and never
ask which process they hold.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..registry import SCHEDULES

CLEAN = -1  # the point after a grid's last time: alpha = 1, sigma = 0 (clean data)


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class Points:
    """alpha, sigma, lambda and log alpha^2 of a process at Python-float times; CLEAN is clean data."""

    def __init__(self, process: "NoiseProcess"):
        self.process = process
        self.variance_preserving = process.variance_preserving

    def log_ab(self, t) -> float:
        """log alpha^2 (-inf where alpha = 0)."""
        return 0.0 if t == CLEAN else 2.0 * math.log(self.alpha(t)) if self.alpha(t) > 0 else -math.inf

    def alpha(self, t) -> float:
        return 1.0 if t == CLEAN else float(self.process.alpha(_f64(t)))

    def sigma(self, t) -> float:
        return 0.0 if t == CLEAN else float(self.process.sigma(_f64(t)))

    def lam(self, t) -> float:
        return math.inf if t == CLEAN else float(self.process.log_snr(_f64(t)))


class NoiseProcess:
    """Continuous-time base: subclasses give alpha, sigma, their derivatives and t_of_log_snr (float64 tensors)."""

    discrete = False
    variance_preserving = False  # alpha^2 + sigma^2 = 1: unit prior, unit network input
    t_min, t_max = 0.0, 1.0
    name = ""

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t_of_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        """The network's noise-level input (float): 999 t unless the process's paper says otherwise."""
        return 999.0 * t

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t) = log alpha - log sigma (-inf where alpha = 0, +inf where sigma = 0)."""
        t = _f64(t)
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    # -- what training and sampling use --------------------------------------------------------------
    def coefficients(self, t: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at t [B], shaped [B, 1, ..] in x's dtype."""
        shape = (-1, *([1] * (x.dim() - 1)))
        t = t.to(torch.float64)
        return self.alpha(t).to(x.dtype).view(shape), self.sigma(t).to(x.dtype).view(shape)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                  generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """x_t = alpha(t) x0 + sigma(t) eps. Returns (x_t, eps)."""
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise, noise

    def sample_timesteps(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t ~ Uniform(t_min, t_max), float64."""
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.t_min + (self.t_max - self.t_min) * u

    def clip_time(self, t: torch.Tensor) -> torch.Tensor:
        """A time drawn from a noise-level density, kept inside the process's range."""
        return t.clamp(self.t_min, self.t_max)

    def from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The process time of logSNR lam (a density's draw), inside [t_min, t_max]."""
        return self.clip_time(self.t_of_log_snr(lam.to(torch.float64)))

    def time_tensor(self, t, n: int, device) -> torch.Tensor:
        """One grid time as the [n] tensor a model is called with."""
        return torch.full((n,), float(t), device=device, dtype=torch.float64)

    def points(self) -> Points:
        return Points(self)

    def prior_std(self, t) -> float:
        """Std of the noise a sampler starts from at time t (sigma(t); 1 for a variance-preserving process)."""
        return 1.0 if self.variance_preserving else float(self.sigma(_f64(t)))

    def input_scale(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """c_in for eps / x0 / v / flow networks: 1 / sqrt(alpha^2 + sigma^2) (unit variance for unit data);
        None (no scaling) when the process is variance preserving."""
        if self.variance_preserving:
            return None
        t = t.to(torch.float64)
        return torch.rsqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def end_is_clean(self, t) -> bool:
        """A grid time with sigma = 0 is clean data: samplers do not evaluate the model there."""
        return float(self.sigma(_f64(t))) == 0.0

    def to(self, device) -> "NoiseProcess":
        return self


@SCHEDULES.register("vp")
class VPProcess(NoiseProcess):
    """The VP SDE of Song et al. 2021 (beta(t) = beta_min + t (beta_max - beta_min)); c_noise = 999 t as EDM's VP."""

    variance_preserving = True
    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3):
        if not 0 < beta_min < beta_max:
            raise ValueError(f"vp needs 0 < beta_min < beta_max, got {beta_min}, {beta_max}")
        if not 0 < t_min < 1:
            raise ValueError(f"vp t_min must be in (0, 1), got {t_min}")
        self.beta_min, self.beta_max, self.t_min = float(beta_min), float(beta_max), float(t_min)

    def log_alpha(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return torch.exp(self.log_alpha(_f64(t)))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2 * self.log_alpha(_f64(t))))  # sqrt(1 - alpha^2) at full precision

    def d_alpha(self, t):
        t = _f64(t)
        return -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * self.alpha(t)  # -beta(t)/2 alpha

    def d_sigma(self, t):
        t = _f64(t)
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)  # from alpha^2 + sigma^2 = 1

    def log_snr(self, t):
        la = self.log_alpha(_f64(t))
        return la - 0.5 * torch.log(-torch.expm1(2 * la))

    def t_of_log_snr(self, lam):
        log_alpha = 0.5 * torch.nn.functional.logsigmoid(2 * _f64(lam))  # alpha^2 = sigmoid(2 lambda)
        b, a = 0.5 * self.beta_min, 0.25 * (self.beta_max - self.beta_min)  # a t^2 + b t + log_alpha = 0
        return (-b + torch.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


class _AlphaOne(NoiseProcess):
    """alpha = 1: lambda = -log sigma."""

    def alpha(self, t):
        return torch.ones_like(_f64(t))

    def d_alpha(self, t):
        return torch.zeros_like(_f64(t))

    def log_snr(self, t):
        return -torch.log(self.sigma(t))


@SCHEDULES.register("ve")
class VEProcess(_AlphaOne):
    """The VE SDE of Song et al. 2021 with their CIFAR-10 range (sigma_min 0.01, sigma_max 50); c_noise as EDM's
    VEPrecond, log(sigma / 2)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"ve needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t):
        return self.sigma_min * torch.exp(self.log_ratio * _f64(t))

    def d_sigma(self, t):
        return self.log_ratio * self.sigma(t)

    def t_of_log_snr(self, lam):
        return (-_f64(lam) - math.log(self.sigma_min)) / self.log_ratio

    def c_noise(self, t):
        return torch.log(0.5 * self.sigma(t))


@SCHEDULES.register("edm")
class EDMProcess(_AlphaOne):
    """Karras et al. 2022: sigma(t) = t, t in [sigma_min, sigma_max]; c_noise = ln(sigma) / 4. A density's draw is
    not clipped to the range (EDM trains on every lognormal sigma)."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"edm needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)

    def sigma(self, t):
        return _f64(t)

    def d_sigma(self, t):
        return torch.ones_like(_f64(t))

    def t_of_log_snr(self, lam):
        return torch.exp(-_f64(lam))

    def clip_time(self, t):
        return t

    def c_noise(self, t):
        return 0.25 * torch.log(_f64(t))


@SCHEDULES.register("flow")
class FlowProcess(NoiseProcess):
    """Rectified flow / conditional OT (Liu et al. 2023; Lipman et al. 2023): alpha = 1 - t, sigma = t, t in [0, 1];
    SNR reaches 0 at t = 1 (x_1 = eps), so an eps-predictor cannot be used."""

    name = "flow"

    def __init__(self, t_max: float = 1.0):
        if not 0 < t_max <= 1:
            raise ValueError(f"flow t_max must be in (0, 1], got {t_max}")
        self.t_min, self.t_max = 0.0, float(t_max)

    def alpha(self, t):
        return 1.0 - _f64(t)

    def sigma(self, t):
        return _f64(t)

    def d_alpha(self, t):
        return -torch.ones_like(_f64(t))

    def d_sigma(self, t):
        return torch.ones_like(_f64(t))

    def t_of_log_snr(self, lam):
        return torch.sigmoid(-_f64(lam))  # lambda = log((1 - t) / t)

    def from_log_snr(self, lam):
        return self.t_of_log_snr(lam).clamp(max=self.t_max)


def zero_snr_end(process) -> bool:
    """Whether the process reaches alpha = 0 (SNR 0) within its range, where eps cannot give x0."""
    return float(process.alpha(_f64(process.t_max))) == 0.0
