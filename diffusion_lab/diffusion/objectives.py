"""Parameterisations: what the network F predicts, and how any prediction becomes (x0_pred, eps_pred).

With x_t = a x0 + s eps (a = alpha(t), s = sigma(t), from any noise process; a', s' their time derivatives):
  eps:  F = eps                                     (Ho et al. 2020)
  x0:   F = x0
  v:    F = a~ eps - s~ x0, a~ = a r, s~ = s r, r = 1/sqrt(a^2 + s^2)   (Salimans & Ho 2022; r = 1 for VP)
  flow: F = dx_t/dt = a' x0 + s' eps                 (Lipman et al. 2023; Liu et al. 2023: eps - x0 on the flow path)
  edm:  x0 = c_skip x_t + c_out F(c_in x_t, c_noise)  (Karras et al. 2022, Table 1, written in x_t for any a, s:
        c_skip = a d^2 / (s^2 + a^2 d^2), c_out = s d / sqrt(s^2 + a^2 d^2), c_in = 1 / sqrt(s^2 + a^2 d^2),
        d = sigma_data; a = 1 gives EDM's own)
The network receives c_in x_t (c_in = 1 for a variance-preserving process, else 1 / sqrt(a^2 + s^2)) and the
process's c_noise(t). ``x0_factor`` says how an error in F becomes an error in x0 (||dx0||^2 = k ||dF||^2), so a
loss weighting can be written once as a weight on the x0 error (``losses.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..registry import OBJECTIVES
from .grids import end_time

Pair = Tuple[torch.Tensor, torch.Tensor]


def _shape(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _f64(process, fn, t: torch.Tensor) -> torch.Tensor:
    return getattr(process, fn)(t.to(torch.float64))


class Objective:
    """Base class: the target, the conversion back to (x0_pred, eps_pred), the input scaling and x0 factor."""

    name = ""
    recipe = "diffusion"  # the loss class that trains it (losses.RECIPES)

    def check(self, process) -> None:
        """A one-line ValueError when this parameterisation cannot work on ``process``."""

    def target(self, x0: torch.Tensor, eps: torch.Tensor, process, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, process, t: torch.Tensor) -> Pair:
        raise NotImplementedError

    def x0_factor(self, process, t: torch.Tensor) -> torch.Tensor:
        """k(t) [B] float64 with ||x0 - x0_pred||^2 = k ||target - F||^2."""
        raise NotImplementedError

    def c_in(self, process, t: torch.Tensor) -> Optional[torch.Tensor]:
        return process.input_scale(t)

    def grid(self, name: str):
        """The grid a sampler uses for grid=name (a consistency objective starts it at its sigma_max)."""
        return name

    def network(self, net, process):
        """``net`` as a model of (x_t, t[, y]) in process coordinates: what samplers and the loss call."""
        return Preconditioned(net, process, self)


class Preconditioned:
    """net(c_in x_t, c_noise(t), y) called as model(x_t, t, y): the network seen in the process's coordinates."""

    def __init__(self, net, process, objective: Objective):
        self.net, self.process, self.objective = net, process, objective
        self.num_classes = getattr(net, "num_classes", None)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        c_in = self.objective.c_in(self.process, t)
        x_in = x_t if c_in is None else _shape(c_in, x_t) * x_t
        c_noise = self.process.c_noise(t)
        return self.net(x_in, c_noise if c_noise.dtype == torch.long else c_noise.float(), *args, **kwargs)


def _snr(process, t: torch.Tensor) -> torch.Tensor:
    return torch.exp(2 * process.log_snr(t.to(torch.float64)).to(torch.float64))


@OBJECTIVES.register("eps")
class EpsObjective(Objective):
    name = "eps"

    def check(self, process):
        if not process.discrete and float(process.alpha(torch.tensor(float(process.t_max), dtype=torch.float64))) == 0:
            raise ValueError(f"objective=eps cannot be used with schedule={process.name}: alpha reaches 0 (SNR 0) at "
                             f"t = {process.t_max:g}, where eps gives no x0; use objective=flow, v or x0")

    def target(self, x0, eps, process, t):
        return eps

    def to_x0_eps(self, pred, x_t, process, t):
        a, b = process.coefficients(t, x_t)
        return (x_t - b * pred) / a, pred  # x0 = (x_t - s eps) / a

    def x0_factor(self, process, t):
        return 1.0 / _snr(process, t)


@OBJECTIVES.register("x0")
class X0Objective(Objective):
    name = "x0"

    def target(self, x0, eps, process, t):
        return x0

    def to_x0_eps(self, pred, x_t, process, t):
        a, b = process.coefficients(t, x_t)
        return pred, (x_t - a * pred) / b  # eps = (x_t - a x0) / s

    def x0_factor(self, process, t):
        return torch.ones(t.shape, dtype=torch.float64, device=t.device)


@OBJECTIVES.register("v")
class VObjective(Objective):
    name = "v"

    def _scaled(self, process, t, x):
        """(a~, s~, r) with r = None for a variance-preserving process."""
        a, b = process.coefficients(t, x)
        r = process.input_scale(t)
        return (a, b, None) if r is None else (a * _shape(r, x), b * _shape(r, x), _shape(r, x))

    def target(self, x0, eps, process, t):
        a, b, _ = self._scaled(process, t, x0)
        return a * eps - b * x0

    def to_x0_eps(self, pred, x_t, process, t):
        a, b, r = self._scaled(process, t, x_t)
        x = x_t if r is None else r * x_t
        return a * x - b * pred, b * x + a * pred  # x0 = a~ x~ - s~ v,  eps = s~ x~ + a~ v

    def x0_factor(self, process, t):
        return 1.0 / (1.0 + _snr(process, t))  # s~^2


@OBJECTIVES.register("flow")
class FlowObjective(Objective):
    """The velocity u = dx_t/dt; solve [a s; a' s'] [x0; eps] = [x_t; u] for (x0, eps)."""

    name = "flow"

    def check(self, process):
        if process.discrete:
            raise ValueError("objective=flow predicts dx_t/dt, which needs a continuous process "
                             "(schedule=flow, vp, ve or edm), not the discrete schedule=" + str(process.name or "linear/cosine"))

    def _coefs(self, process, t, x):
        a, s = process.coefficients(t, x)
        return a, s, _shape(_f64(process, "d_alpha", t), x), _shape(_f64(process, "d_sigma", t), x)

    def target(self, x0, eps, process, t):
        _, _, da, ds = self._coefs(process, t, x0)
        return da * x0 + ds * eps

    def to_x0_eps(self, pred, x_t, process, t):
        a, s, da, ds = self._coefs(process, t, x_t)
        det = a * ds - s * da
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det

    def x0_factor(self, process, t):
        t = t.to(torch.float64)
        a, s, da, ds = (getattr(process, f)(t) for f in ("alpha", "sigma", "d_alpha", "d_sigma"))
        return (s / (a * ds - s * da)) ** 2


@OBJECTIVES.register("edm")
class EDMObjective(Objective):
    """Karras et al. 2022 preconditioning (module docstring), on any process."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        if sigma_data <= 0:
            raise ValueError(f"objective.sigma_data must be > 0, got {sigma_data}")
        self.sigma_data = float(sigma_data)

    def _coefs(self, process, t: torch.Tensor):
        """(c_skip, c_out, c_in) [B] float64."""
        t = t.to(torch.float64)
        a, s, d = process.alpha(t), process.sigma(t), self.sigma_data
        norm = torch.sqrt(s**2 + (a * d) ** 2)
        return a * d**2 / norm**2, s * d / norm, 1.0 / norm

    def c_in(self, process, t):
        return self._coefs(process, t)[2]

    def target(self, x0, eps, process, t):
        c_skip, c_out, _ = self._coefs(process, t)
        a, s = process.coefficients(t, x0)
        return (x0 - _shape(c_skip, x0) * (a * x0 + s * eps)) / _shape(c_out, x0)

    def to_x0_eps(self, pred, x_t, process, t):
        c_skip, c_out, _ = self._coefs(process, t)
        a, s = process.coefficients(t, x_t)
        x0 = _shape(c_skip, x_t) * x_t + _shape(c_out, x_t) * pred
        return x0, (x_t - a * x0) / s

    def x0_factor(self, process, t):
        return self._coefs(process, t)[1] ** 2


def boundary_sigma(process) -> float:
    """s_min = sigma / alpha at the time where every grid ends (``grids.end_time``): the consistency boundary."""
    t = torch.tensor(float(end_time(process)), dtype=torch.float64)
    return float(process.sigma(t) / process.alpha(t))


@OBJECTIVES.register("consistency")
class ConsistencyObjective(Objective):
    """A consistency function f(x_t, t) with the boundary condition built in (Song et al. 2023, Appendix C):

        f = c_skip y + c_out F,  c_skip = d^2 / ((s - s_min)^2 + d^2),  c_out = d (s - s_min) / sqrt(d^2 + s^2)

    in EDM coordinates y = x_t / alpha, s = sigma / alpha (d = sigma_data, s_min = ``boundary_sigma``), so
    f(x, s_min) = y exactly. It is written through the ``base`` parameterisation's denoiser D = x0_pred, with
    c_out F = (c_out / c_out_edm)(D - c_skip_edm y) = (1 - s_min / s)(D - d^2 / (s^2 + d^2) y): base=edm is the
    paper's formula, and a network trained with any objective (eps, v, x0, flow, edm) starts out as the consistency
    function closest to its denoiser, which is how distillation and tuning initialise from a teacher.
    """

    name = "consistency"
    recipe = "consistency"

    def __init__(self, base: str = "edm", sigma_data: float = 0.5, sigma_max: Optional[float] = None):
        if base == "consistency" or base not in OBJECTIVES:
            known = ", ".join(n for n in OBJECTIVES.names() if n != "consistency")
            raise ValueError(f"objective.base must be one of {known}, got {base!r}")
        if sigma_data <= 0:
            raise ValueError(f"objective.sigma_data must be > 0, got {sigma_data}")
        self.base = OBJECTIVES.build(base, **({"sigma_data": sigma_data} if base == "edm" else {}))
        if sigma_max is not None and sigma_max <= 0:
            raise ValueError(f"objective.sigma_max must be > 0 or null, got {sigma_max}")
        self.sigma_data, self.sigma_max = float(sigma_data), sigma_max

    def grid(self, name: str):
        """A karras or logsnr grid that starts at s = sigma_max (where training and sampling start), else the name
        as it is (the grid's own start)."""
        if self.sigma_max is None or name not in ("karras", "logsnr"):
            return name
        return {"name": name, "lambda_min_clipped": -math.log(self.sigma_max)}

    def check(self, process):
        self.base.check(process)

    def c_in(self, process, t):
        return self.base.c_in(process, t)

    def coefficients(self, process, t: torch.Tensor):
        """(c_skip, c_out / c_out_edm, s) [B] float64 at times t."""
        t = t if process.discrete else t.to(torch.float64)
        s, d, s_min = process.sigma(t) / process.alpha(t), self.sigma_data, boundary_sigma(process)
        return d**2 / ((s - s_min) ** 2 + d**2), 1.0 - s_min / s, s

    def to_x0_eps(self, pred, x_t, process, t):
        x0_base, _ = self.base.to_x0_eps(pred, x_t, process, t)
        c_skip, ratio, s = self.coefficients(process, t)
        tt = t if process.discrete else t.to(torch.float64)
        a, sigma = _shape(process.alpha(tt), x_t), _shape(process.sigma(tt), x_t)  # float64 alpha: f = y exactly
        y = x_t / a
        c_skip_edm = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        x0 = _shape(c_skip, x_t) * y + _shape(ratio, x_t) * (x0_base - _shape(c_skip_edm, x_t) * y)
        return x0, (x_t - a * x0) / sigma

    def target(self, x0, eps, process, t):
        raise TypeError("a consistency function has no regression target; its loss is consistency.ConsistencyLoss")

    def x0_factor(self, process, t):
        c_skip, ratio, s = self.coefficients(process, t)
        return ratio**2 * self.base.x0_factor(process, t)
