"""Samplers: turn a trained model into images, one free function per algorithm (k-diffusion style).

Every sampler has the same call::

    sampler(model, process, objective, x_T, *, steps=..., grid=..., clip_x0=..., clamp_final=True,
            generator=None, progress=False, callback=None, <its own options>) -> x_0

``model(x_t, t)`` is any callable in the process's coordinates (t: the [B] tensor of one grid time, LongTensor for
a discrete schedule; ``objective.network(net, process)`` makes one of a network, ``guidance.GuidedModel`` one of
a class-conditional model, so no sampler knows about labels, guidance or preconditioning); the objective turns its
prediction into (x0_pred, eps_pred), so samplers never care how the model was parameterised. ``process``
(``processes.py``; a discrete schedule is one) gives alpha, sigma and lambda at grid times through ``points()``;
no sampler asks which process it holds. x_T is unit noise; a sampler starts from ``prior_std`` times it.
``grid`` picks the times (``grids.py``: a registered name, ``{name: ..., **options}``, or a list).
DDIM and pc evaluate every grid point and then step to clean data; the other solvers end at sigma = 0, so
they never evaluate at t = 0 of a discrete schedule: a grid ending there is redrawn with one more point and t = 0
dropped (diffusers' ``final_sigmas_type="zero"``), keeping ``steps`` points. On a continuous process a grid point
with sigma = 0 (the flow path's t = 0) is clean data for every sampler and dropped the same way.
Each sampler carries its own cost (``evaluations``: model evaluations per run as a function of steps) and whether
its grid ends before sigma = 0 (``to_zero``), set where it is registered.
``callback(i, t, x_t, x0_pred)`` runs after every model evaluation (see ``Trajectory``).

Notation: alpha, sigma of x_t = alpha x0 + sigma eps, lambda = log(alpha / sigma); clean data is alpha = 1,
sigma = 0; sigma~ = sigma / alpha and y = x / alpha are the EDM coordinates. Scalar coefficients are float64 Python
floats cast to x_T's dtype when applied.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from ..registry import SAMPLERS
from . import grids, guidance
from .objectives import boundary_sigma
from .processes import CLEAN

RUNTIME_ARGS = ("generator", "callback")  # passed at call time, never bound from a config
CONTINUOUS_DDPM_STEPS = 1000  # ddpm's steps on a continuous process when none are given


def register(name: str, evaluations: Callable[[int], int] = lambda steps: steps, to_zero: bool = False):
    """Register a sampler under ``name`` (run in inference mode) with its cost and grid end (module doc)."""
    def decorator(fn: Callable) -> Callable:
        wrapped = torch.inference_mode()(fn)
        wrapped.evaluations, wrapped.to_zero = evaluations, to_zero
        return SAMPLERS.register(name)(wrapped)
    return decorator


def denoise(model: Callable, process, objective, x_t: torch.Tensor, t, clip_x0: bool = False
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One model evaluation at grid time t -> (x0_pred, eps_pred), in x_t's dtype.

    With clip_x0, x0_pred is clamped to [-1, 1] and eps_pred re-derived from it: eps = (x_t - alpha x0) / sigma.
    """
    t_batch = process.time_tensor(t, x_t.shape[0], x_t.device)
    x0_pred, eps_pred = objective.to_x0_eps(model(x_t, t_batch), x_t, process, t_batch)
    x0_pred, eps_pred = x0_pred.to(x_t.dtype), eps_pred.to(x_t.dtype)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
        a, b = process.coefficients(t_batch, x_t)
        eps_pred = (x_t - a * x0_pred) / b
    return x0_pred, eps_pred


class Trajectory:
    """A callback that keeps CPU clones of x_t and x0_pred at chosen step indices (all when None).

    traj = Trajectory(at=[0, 10, 49]); ddim(..., callback=traj); traj.x0_pred -> list of tensors.
    """

    def __init__(self, at: Optional[Sequence[int]] = None):
        self.at = None if at is None else set(int(i) for i in at)
        self.steps: List[int] = []
        self.timesteps: List[int] = []
        self.x_t: List[torch.Tensor] = []
        self.x0_pred: List[torch.Tensor] = []

    def __call__(self, i: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if self.at is None or i in self.at:
            self.steps.append(i)
            self.timesteps.append(t)
            self.x_t.append(x_t.detach().cpu().clone())
            self.x0_pred.append(x0_pred.detach().cpu().clone())

    def __len__(self) -> int:
        return len(self.steps)


def _evaluate(model, process, objective, x_t, i, t, clip_x0, callback):
    x0_pred, eps_pred = denoise(model, process, objective, x_t, t, clip_x0)
    if callback is not None:
        callback(i, t, x_t, x0_pred)
    return x0_pred, eps_pred


def _grid(process, grid, steps: int, to_zero: bool) -> List:
    """The times a sampler evaluates: the grid without a last point that needs no evaluation (module doc)."""
    ts = grids.resolve(grid, process, steps).tolist()
    last_is_clean = process.end_is_clean(ts[-1]) if not process.discrete else (to_zero and ts[-1] == 0)
    if not last_is_clean:
        return ts
    if grids.is_list(grid):
        return ts[:-1] or ts
    if process.discrete and steps + 1 > process.num_timesteps:
        return ts  # every timestep is already on the grid
    return grids.resolve(grid, process, steps + 1).tolist()[:-1]


def _start(process, t, x_T: torch.Tensor) -> torch.Tensor:
    """The sampler's first x_t: unit noise times the process's prior std at the first grid time."""
    std = process.prior_std(t)
    return x_T if std == 1.0 else std * x_T


def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _float64(values: torch.Tensor) -> List[float]:
    return values.detach().to("cpu", torch.float64).tolist()


def _mean_norm(v: torch.Tensor) -> float:
    """Per-sample L2 norm, averaged over the batch (Song et al.'s Langevin corrector uses the batch mean)."""
    return v.flatten(1).norm(dim=1).mean().item()


def _finish(x: torch.Tensor, clamp_final: bool) -> torch.Tensor:
    return x.clamp(-1.0, 1.0) if clamp_final else x


def _ddim_step(p, t, t_next, x0_pred, eps_pred, eta: float, generator):
    """Song et al. 2020, eq. 12: x_next = alpha_next x0 + sqrt(sigma_next^2 - s^2) eps + s z, with s = eta times the
    std of q(x_next | x_t, x0): (sigma_next / sigma) sqrt(1 - alpha_bar / alpha_bar_next) when alpha^2 + sigma^2 = 1,
    in general (sigma_next / sigma) sqrt(sigma^2 - (alpha / alpha_next)^2 sigma_next^2)."""
    s = 0.0
    if eta > 0 and t_next != CLEAN:
        if p.variance_preserving:
            s = eta * p.sigma(t_next) / p.sigma(t) * math.sqrt(-math.expm1(p.log_ab(t) - p.log_ab(t_next)))
        else:
            ratio = p.alpha(t) / p.alpha(t_next)
            s = eta * p.sigma(t_next) / p.sigma(t) * math.sqrt(max(p.sigma(t) ** 2 - (ratio * p.sigma(t_next)) ** 2, 0))
    x = p.alpha(t_next) * x0_pred + math.sqrt(max(p.sigma(t_next) ** 2 - s**2, 0.0)) * eps_pred
    return x + s * _noise(x, generator) if s > 0 else x


DDPM_VARIANCES = ("fixed_small", "fixed_large")  # sampler.variance


@register("ddpm")
def ddpm(model, process, objective, x_T, *, steps=None, variance="fixed_small", clip_x0=True, clamp_final=True,
         generator=None, progress=False, callback=None):
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2; improved-diffusion's p_sample).

    x0_pred from the model (clamped when clip_x0), then x_{t-1} ~ N(coef1 x0_pred + coef2 x_t, var_t),
    var_t = posterior_variance ("fixed_small") or beta_t ("fixed_large"); no noise at t = 0. On a continuous
    process: the same posterior q(x_s | x_t, x0_pred) over ``steps`` times uniform in logSNR (default 1000; uniform t
    would put almost every step at high noise on the edm path), i.e. DDIM with eta = 1 (Song et al. 2020, eq. 16);
    "fixed_large" needs the discrete betas.
    """
    if not process.discrete:
        if variance != "fixed_small":
            raise ValueError("ddpm variance=fixed_large needs a discrete schedule's betas; use fixed_small")
        return ddim(model, process, objective, x_T, steps=steps or CONTINUOUS_DDPM_STEPS, eta=1.0, grid="logsnr",
                    clip_x0=clip_x0, clamp_final=clamp_final, generator=generator, progress=progress,
                    callback=callback)
    T = process.num_timesteps
    if steps is not None and steps != T:
        raise ValueError(f"ddpm runs all T = {T} steps; got steps={steps} (use ddim or dpm_solver for fewer)")
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown ddpm variance '{variance}'; known: {', '.join(DDPM_VARIANCES)}")
    coef1, coef2 = _float64(process.posterior_mean_coef1), _float64(process.posterior_mean_coef2)
    var = _float64(process.posterior_variance if variance == "fixed_small" else process.betas)
    x_t = x_T
    for i, t in enumerate(tqdm(range(T - 1, -1, -1), disable=not progress)):
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        mean = coef1[t] * x0_pred + coef2[t] * x_t  # posterior mean of q(x_{t-1} | x_t, x0_pred)
        x_t = mean + math.sqrt(var[t]) * _noise(x_t, generator) if t > 0 else mean
    return _finish(x_t, clamp_final)


@register("ddim")
def ddim(model, process, objective, x_T, *, steps=50, eta=0.0, grid="linspace", clip_x0=False,
         clamp_final=True, generator=None, progress=False, callback=None):
    """DDIM (Song et al. 2020, eq. 12) over the grid's timesteps; eta=0 deterministic, 1 ~ DDPM.

    Each step goes from t to the next listed timestep; after the last one to clean (alpha_bar = 1),
    so the result is the last x0_pred.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim eta must be in [0, 1], got {eta}")
    ts = _grid(process, grid, steps, False)
    p, x_t = process.points(), _start(process, ts[0], x_T)
    for i, t in enumerate(tqdm(ts, disable=not progress)):
        x0_pred, eps_pred = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        x_t = _ddim_step(p, t, ts[i + 1] if i + 1 < len(ts) else CLEAN, x0_pred, eps_pred, eta, generator)
    return _finish(x_t, clamp_final)


@register("dpm_solver", to_zero=True)
def dpm_solver(model, process, objective, x_T, *, steps=20, grid="logsnr", clip_x0=False, clamp_final=True,
               generator=None, progress=False, callback=None):
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    One model evaluation per grid point, none at t = 0. The first step and the last (to sigma = 0, where the
    update is x = x0_pred) are first order (diffusers' lower_order_final). ``generator`` is unused (the
    solver is deterministic) but kept for the shared signature.
    """
    ts = _grid(process, grid, steps, True) + [CLEAN]
    p, x_t, x0_prev, h_last = process.points(), _start(process, ts[0], x_T), None, None
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        t_next = ts[i + 1]
        if t_next == CLEAN:
            x_t = x0_pred
            break
        h = p.lam(t_next) - p.lam(t)
        D = x0_pred
        if x0_prev is not None:
            r = h_last / h  # D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_prev
            D = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_prev
        x_t = (p.sigma(t_next) / p.sigma(t)) * x_t - (p.alpha(t_next) * math.expm1(-h)) * D
        x0_prev, h_last = x0_pred, h
    return _finish(x_t, clamp_final)


@register("dpm_solver_3m", to_zero=True)
def dpm_solver_3m(model, process, objective, x_T, *, steps=20, grid="logsnr", clip_x0=False, clamp_final=True,
                  generator=None, progress=False, callback=None):
    """DPM-Solver++(3M), data prediction, multistep (Lu et al. 2022, Appendix B; k-diffusion's dpmpp_3m_sde, eta=0).

    x_next = (sigma_next/sigma) x - alpha_next (e^-h - 1) D0 + alpha_next phi2 D1 - alpha_next phi3 D2,
    phi2 = (e^-h - 1)/h + 1, phi3 = phi2/h - 1/2, D1, D2 from the last three x0_pred. Order min(3, steps so far,
    steps left): first order on the first and last step, at most second order on the one before.
    """
    ts = _grid(process, grid, steps, True) + [CLEAN]
    p, x_t, history = process.points(), _start(process, ts[0], x_T), []  # history: (x0_pred, h of the step that followed it)
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        t_next = ts[i + 1]
        if t_next == CLEAN:
            x_t = x0_pred
            break
        h = p.lam(t_next) - p.lam(t)
        order = min(3, len(history) + 1, len(ts) - 1 - i)
        x_t = (p.sigma(t_next) / p.sigma(t)) * x_t - (p.alpha(t_next) * math.expm1(-h)) * x0_pred
        phi2 = math.expm1(-h) / h + 1
        if order >= 2:
            (m1, h1) = history[-1]
            d1_0 = (x0_pred - m1) * (h / h1)  # (m0 - m1) / r0, r0 = h1 / h
            if order == 2:
                x_t = x_t + p.alpha(t_next) * phi2 * d1_0
            else:
                (m2, h2) = history[-2]
                r0, r1 = h1 / h, h2 / h
                d1_1 = (m1 - m2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x_t = x_t + p.alpha(t_next) * (phi2 * d1 - (phi2 / h - 0.5) * d2)
        history = (history + [(x0_pred, h)])[-2:]
    return _finish(x_t, clamp_final)


def _pf_ode_step(model, process, objective, p, x_t, x0_pred, t, t_next, n: int, heun: bool, clip_x0, callback):
    """One step of the probability-flow ODE in EDM's coordinates (Karras et al. 2022, Algorithm 1, lines 4-8):
    y = x / alpha, sigma~ = sigma / alpha, dy/dsigma~ = (y - x0_pred) / sigma~ = d; Euler to sigma~_next, then with
    ``heun`` the trapezoid correction with d' there. A step to sigma = 0, or from alpha = 0, is Euler alone.
    Returns (x_next, model evaluations used)."""
    if t_next == CLEAN or p.alpha(t) == 0.0:
        return _ddim_step(p, t, t_next, x0_pred, (x_t - p.alpha(t) * x0_pred) / p.sigma(t), 0.0, None), 0
    s, s_next = p.sigma(t) / p.alpha(t), p.sigma(t_next) / p.alpha(t_next)
    y = x_t / p.alpha(t)
    d = (y - x0_pred) / s
    y_euler = y + (s_next - s) * d  # Algorithm 1, line 5
    if not heun:
        return p.alpha(t_next) * y_euler, 0
    x0_next, _ = _evaluate(model, process, objective, p.alpha(t_next) * y_euler, n, t_next, clip_x0, callback)
    d_next = (y_euler - x0_next) / s_next  # line 7
    return p.alpha(t_next) * (y + (s_next - s) * 0.5 * (d + d_next)), 1  # line 8


@register("heun", evaluations=lambda steps: 2 * steps - 1, to_zero=True)
def heun(model, process, objective, x_T, *, steps=10, grid="karras", clip_x0=False, clamp_final=True,
         generator=None, progress=False, callback=None):
    """Heun's 2nd-order ODE solver (Karras et al. 2022, "EDM", Algorithm 1) on any process (``_pf_ode_step``);
    the last step, to sigma = 0, is Euler alone. 2 * steps - 1 model evaluations. It is ``edm`` without churn."""
    return edm(model, process, objective, x_T, steps=steps, grid=grid, S_churn=0.0, clip_x0=clip_x0,
               clamp_final=clamp_final, generator=generator, progress=progress, callback=callback)


@register("euler", to_zero=True)
def euler(model, process, objective, x_T, *, steps=20, grid="karras", clip_x0=False, clamp_final=True,
          generator=None, progress=False, callback=None):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the correction;
    k-diffusion's sample_euler). On the flow path it is the rectified-flow Euler step x += (t_next - t) u.
    One model evaluation per step."""
    ts = _grid(process, grid, steps, True) + [CLEAN]
    p, x_t = process.points(), _start(process, ts[0], x_T)
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        x_t, _ = _pf_ode_step(model, process, objective, p, x_t, x0_pred, t, ts[i + 1], i + 1, False, clip_x0, None)
    return _finish(x_t, clamp_final)


def _churn(process, p, t, x_t, gamma: float, s_noise: float, generator):
    """EDM's noise increase (Algorithm 2, lines 5-6): sigma~_hat = (1 + gamma) sigma~ at the time t_hat of that
    noise level (the nearest timestep not below t on a discrete schedule); x_hat = x + alpha_hat sqrt(s_hat^2 -
    s^2) S_noise z in y = x / alpha."""
    s = p.sigma(t) / p.alpha(t)
    t_hat = process.t_of_log_snr(torch.tensor([-math.log(s * (1 + gamma))], dtype=torch.float64))
    t_hat = max(int(t_hat.item()), t) if process.discrete else min(float(t_hat.item()), process.t_max)
    s_hat = p.sigma(t_hat) / p.alpha(t_hat)
    y_hat = x_t / p.alpha(t) + math.sqrt(max(s_hat**2 - s**2, 0.0)) * s_noise * _noise(x_t, generator)
    return t_hat, p.alpha(t_hat) * y_hat


@register("edm", evaluations=lambda steps: 2 * steps - 1, to_zero=True)
def edm(model, process, objective, x_T, *, steps=18, grid="karras", S_churn=0.0, S_tmin=0.0, S_tmax=float("inf"),
        S_noise=1.0, clip_x0=False, clamp_final=True, generator=None, progress=False, callback=None):
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): at each sigma~ in [S_tmin, S_tmax] raise the
    noise by gamma = min(S_churn / steps, sqrt(2) - 1) (``_churn``), then one Heun step from there. S_churn = 0 is
    Algorithm 1 (``heun``). 2 * steps - 1 model evaluations."""
    if S_churn < 0 or S_noise <= 0:
        raise ValueError(f"edm needs S_churn >= 0 and S_noise > 0, got {S_churn}, {S_noise}")
    ts = _grid(process, grid, steps, True) + [CLEAN]
    p, x_t, n = process.points(), _start(process, ts[0], x_T), 0
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        s = p.sigma(t) / p.alpha(t) if p.alpha(t) > 0 else math.inf
        gamma = min(S_churn / (len(ts) - 1), math.sqrt(2) - 1) if S_tmin <= s <= S_tmax and p.alpha(t) > 0 else 0.0
        if gamma > 0:
            t, x_t = _churn(process, p, t, x_t, gamma, S_noise, generator)
        x0_pred, _ = _evaluate(model, process, objective, x_t, n, t, clip_x0, callback)
        x_t, extra = _pf_ode_step(model, process, objective, p, x_t, x0_pred, t, ts[i + 1], n + 1, True, clip_x0,
                                  callback)
        n += 1 + extra
    return _finish(x_t, clamp_final)


@register("euler_ancestral", to_zero=True)
def euler_ancestral(model, process, objective, x_T, *, steps=20, grid="karras", eta=1.0, clip_x0=False,
                    clamp_final=True, generator=None, progress=False, callback=None):
    """Euler-ancestral (k-diffusion's sample_euler_ancestral; Karras et al. 2022, ancestral step of Song et al.).

    In sigma_ve = exp(-lambda): sigma_up = min(s_next, eta s_next sqrt(1 - s_next^2/s^2)), sigma_down =
    sqrt(s_next^2 - sigma_up^2); an Euler step to sigma_down, then noise of std sigma_up. With eta = 1 this is
    DDIM with eta = 1 on the same grid (a test checks it).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"euler_ancestral eta must be in [0, 1], got {eta}")
    ts = _grid(process, grid, steps, True) + [CLEAN]
    p, x_t = process.points(), _start(process, ts[0], x_T)
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
        t_next = ts[i + 1]
        ratio = math.exp(p.lam(t) - p.lam(t_next))  # s_next / s in [0, 1); 0 at sigma = 0 or from alpha = 0
        up = min(1.0, eta * math.sqrt(1.0 - ratio**2))  # sigma_up / s_next
        down = math.sqrt(1.0 - up**2)  # sigma_down / s_next
        # y_down = y + (sigma_down - s) d = (sigma_down/s) y + (1 - sigma_down/s) x0_pred; x = alpha y
        # and alpha_next (sigma_down / s) / alpha = down sigma_next / sigma
        x_t = (down * p.sigma(t_next) / p.sigma(t)) * x_t + p.alpha(t_next) * (1 - down * ratio) * x0_pred
        if up > 0 and t_next != CLEAN:
            x_t = x_t + (up * p.sigma(t_next)) * _noise(x_t, generator)
    return _finish(x_t, clamp_final)


@register("pc", evaluations=lambda steps: 2 * steps)
def pc(model, process, objective, x_T, *, steps=20, grid="linspace", snr=0.16, clip_x0=False, clamp_final=True,
       generator=None, progress=False, callback=None):
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Algorithms
    2-3, VP): at each grid point one Langevin corrector step, x += e g + sqrt(2 e) z with score g = -eps_pred / sigma
    and step e = 2 (alpha_bar / alpha_bar_next) (snr ||z|| / ||g||)^2 (norms averaged over the batch, as in the
    paper's code), then the ancestral predictor
    (DDIM eta = 1) to the next point; to sigma = 0 the predictor returns x0_pred. 2 * steps model evaluations.
    Like the reference (which runs to t = eps and returns the last predictor mean) it evaluates every grid point,
    t = 0 included: ending at t = T/S instead makes the last step a jump to the posterior mean, too narrow, and
    its error grew with NFE (cosine lab: spread error 0.16 at 20 NFE, 0.34 at 50).
    """
    if snr < 0:
        raise ValueError(f"pc snr must be >= 0, got {snr}")
    ts = _grid(process, grid, steps, False) + [CLEAN]
    p, x_t = process.points(), _start(process, ts[0], x_T)
    for i, t in enumerate(tqdm(ts[:-1], disable=not progress)):
        _, eps_pred = _evaluate(model, process, objective, x_t, 2 * i, t, clip_x0, callback)
        z = _noise(x_t, generator)
        score = -eps_pred / p.sigma(t)
        alpha_step = math.exp(p.log_ab(t) - p.log_ab(ts[i + 1]))
        e = 2 * alpha_step * (snr * _mean_norm(z) / max(_mean_norm(score), 1e-12)) ** 2  # Algorithm 3 (VP), corrector
        x_t = x_t + e * score + math.sqrt(2 * e) * z
        x0_pred, eps_pred = _evaluate(model, process, objective, x_t, 2 * i + 1, t, clip_x0, callback)
        x_t = _ddim_step(p, t, ts[i + 1], x0_pred, eps_pred, 1.0, generator)  # predictor: ancestral step
    return _finish(x_t, clamp_final)


@register("consistency")
def consistency(model, process, objective, x_T, *, steps=1, grid="karras", clip_x0=False, clamp_final=True,
                generator=None, progress=False, callback=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): x0 = f(x, t_0) from noise at the first
    time; at each further time t_i, x = alpha_i (x0 + sqrt(s_i^2 - s_min^2) z) (s = sigma / alpha, s_min the
    boundary) and x0 = f(x, t_i). ``steps`` model evaluations, at the first ``steps`` times of the grid with
    steps + 1 points (its last, the boundary, needs none), or at every time of an explicit list. With a diffusion
    model's objective, f is its denoiser (one step is then the mean, a blurred image: a baseline). A named grid
    starts where the consistency objective's training did (its ``sigma_max``)."""
    grid = objective.grid(grid) if isinstance(grid, str) else grid
    ts = grids.resolve(grid, process, len(grid) if grids.is_list(grid) else steps + 1).tolist()
    ts = ts if grids.is_list(grid) else ts[:-1]
    p, x_t, s_min = process.points(), _start(process, ts[0], x_T), boundary_sigma(process)
    for i, t in enumerate(tqdm(ts, disable=not progress)):
        if i:
            s = p.sigma(t) / p.alpha(t)
            x_t = p.alpha(t) * (x0_pred + math.sqrt(max(s**2 - s_min**2, 0.0)) * _noise(x0_pred, generator))
        x0_pred, _ = _evaluate(model, process, objective, x_t, i, t, clip_x0, callback)
    return _finish(x0_pred, clamp_final)


def _options(fn: Callable) -> Dict[str, inspect.Parameter]:
    """The keyword-only parameters of a sampler that a config may set."""
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in RUNTIME_ARGS
    }


def _check_params(name: str, fn: Callable, params: Dict[str, Any]) -> Dict[str, inspect.Parameter]:
    options = _options(fn)
    for key in params:
        if key not in options and key not in guidance.KEYS:
            raise ValueError(f"sampler '{name}' does not take '{key}'; it takes: {', '.join(options)}")
    return options


def build_sampler(name: str, **params: Any) -> Callable[..., torch.Tensor]:
    """SAMPLERS[name] with ``params`` bound: call it as f(model, process, objective, x_T, *, y, generator,
    progress, callback); with class labels ``y`` a conditional model is sampled with classifier-free guidance
    (``guidance_*`` params, see guidance.py). Raises the registry's error for an unknown name and ValueError for
    a parameter the sampler does not take."""
    fn = SAMPLERS.get(name)
    _check_params(name, fn, params)
    params = dict(params)
    settings = guidance.Guidance.pop(params)
    return guidance.GuidedSampler(functools.partial(fn, **params), settings)


def num_steps(name: str, params: Dict[str, Any], process) -> int:
    """Steps of one sampling run: T for ddpm on a discrete schedule; else ``steps`` (or the points an explicit grid
    list leaves)."""
    fn = SAMPLERS.get(name)
    options = _check_params(name, fn, params)
    if name == "ddpm":
        return process.num_timesteps if process.discrete else int(params.get("steps") or CONTINUOUS_DDPM_STEPS)
    grid = params.get("grid", options["grid"].default)
    if grids.is_list(grid):
        return len(_grid(process, grid, len(grid), fn.to_zero))
    return int(params.get("steps", options["steps"].default))


def num_evaluations(name: str, params: Dict[str, Any], process) -> int:
    """Model evaluations (NFE) of one sampling run, from the sampler's own cost of its steps."""
    return SAMPLERS.get(name).evaluations(num_steps(name, params, process))


def setting_label(name: str, params: Dict[str, Any], process) -> str:
    """What a sampling run was: `heun, 10 steps, 19 NFE` (and `, w 2` when guided)."""
    w = params.get("guidance_scale")
    return (f"{name}, {num_steps(name, params, process)} steps, {num_evaluations(name, params, process)} NFE"
            + (f", w {w:g}" if w is not None else ""))


def steps_for(name: str, nfe: int) -> int:
    """The most ``steps`` whose run costs at most ``nfe`` model evaluations (at least 1 step)."""
    count = SAMPLERS.get(name).evaluations
    steps = 1
    while count(steps + 1) <= nfe:
        steps += 1
    return steps
