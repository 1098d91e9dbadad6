"""Samplers: turn a trained model into images, one free function per algorithm (k-diffusion style).

Every sampler has the same call::

    sampler(model, schedule, objective, x_T, *, steps=..., clip_x0=..., clamp_final=True,
            generator=None, progress=False, callback=None, <its own options>) -> x_0

``model(x_t, t)`` is any callable (t: LongTensor [B] of integer timesteps); the objective turns its
prediction into (x0_pred, eps_pred), so samplers never care how the model was parameterised.
Own options: ddpm ``variance``; ddim ``eta``, ``spacing``; dpm_solver ``spacing``.
``callback(i, t, x_t, x0_pred)`` runs after every model evaluation (see ``Trajectory``).

Scalar coefficients are computed in float64 (Python floats; alpha_bar via a float64 sum of log alphas, see
``_log_alphas_cumprod``) and cast to x_T's dtype when applied.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .registry import SAMPLERS
from .schedules import NoiseSchedule, extract

SPACINGS = ("linspace", "leading", "trailing", "logsnr")
RUNTIME_ARGS = ("generator", "callback")  # passed at call time, never bound from a config


def timesteps(T: int, S: int, spacing: str = "linspace", schedule: Optional[NoiseSchedule] = None) -> torch.Tensor:
    """S distinct integer timesteps in [0, T-1], descending (a LongTensor on the CPU).

    linspace: round(linspace(0, T-1, S))   (DDIM reference; ends at T-1 and 0)
    leading:  arange(S) * (T // S)          (diffusers "leading" without offset; ends at 0)
    trailing: round(arange(T, 0, -T/S)) - 1 (diffusers "trailing"; starts at T-1)
    logsnr:   uniform in lambda = log(alpha/sigma) from t=T-1 to t=0 (needs `schedule`; DPM-Solver's
              recommendation for pixel space: equal solver steps h, so the 2nd-order extrapolation stays tame)
    """
    if not 0 < S <= T:
        raise ValueError(f"steps must be in (0, T] = (0, {T}], got {S}")
    if spacing == "linspace":
        return torch.linspace(0, T - 1, S, dtype=torch.float64).round().long().flip(0)
    if spacing == "leading":
        return (torch.arange(S, dtype=torch.long) * (T // S)).flip(0)
    if spacing == "trailing":
        # == round(arange(T, 0, -T/S)) - 1 in exact integer arithmetic (round half to even, like torch):
        # float steps could give S + 1 values or misround a tie
        n = T * (S - torch.arange(S, dtype=torch.long))  # T - i T/S = n / S
        q, rem = n // S, n % S
        return q + ((2 * rem > S) | ((2 * rem == S) & (q % 2 == 1))).long() - 1
    if spacing == "logsnr":
        if schedule is None or schedule.num_timesteps != T:
            raise ValueError("logsnr spacing needs the schedule")
        log_ab = torch.tensor(_log_alphas_cumprod(schedule), dtype=torch.float64)
        lam = 0.5 * (log_ab - torch.log(-torch.expm1(log_ab)))  # lambda_t, decreasing in t
        targets = torch.linspace(lam[-1].item(), lam[0].item(), S, dtype=torch.float64)
        ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # nearest t per target
        for i in range(1, S):  # strictly descending, and room left for the remaining steps
            ts[i] = min(ts[i], ts[i - 1] - 1)
        return torch.tensor([max(t, S - 1 - i) for i, t in enumerate(ts)], dtype=torch.long)
    raise ValueError(f"unknown timestep spacing '{spacing}'; known: {', '.join(SPACINGS)}")


def denoise(
    model: Callable, schedule: NoiseSchedule, objective, x_t: torch.Tensor, t: int, clip_x0: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One model evaluation at integer timestep t -> (x0_pred, eps_pred), in x_t's dtype.

    With clip_x0, x0_pred is clamped to [-1, 1] and eps_pred re-derived from it:
    eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab).
    """
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0_pred, eps_pred = objective.to_x0_eps(model(x_t, t_batch), x_t, schedule, t_batch)
    x0_pred, eps_pred = x0_pred.to(x_t.dtype), eps_pred.to(x_t.dtype)
    if clip_x0:
        x0_pred = x0_pred.clamp(-1.0, 1.0)
        a = extract(schedule.sqrt_alphas_cumprod, t_batch, x_t)
        b = extract(schedule.sqrt_one_minus_alphas_cumprod, t_batch, x_t)
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


def _noise(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _float64(values: torch.Tensor) -> List[float]:
    return values.detach().to("cpu", torch.float64).tolist()


def _log_alphas_cumprod(schedule: NoiseSchedule) -> List[float]:
    """log alpha_bar_t = sum_{s<=t} log(1 - beta_s) in float64, so that 1 - alpha_bar = -expm1(log alpha_bar) and
    1 - alpha_bar_t / alpha_bar_prev keep full precision where alpha_bar is close to 1 (small t)."""
    betas, alphas = (v.detach().to("cpu", torch.float64) for v in (schedule.betas, schedule.alphas))
    # both are stored in float32: log1p(-beta) is exact to float32 for small beta, log(alpha) for beta near 1
    log_alphas = torch.where(betas < 0.5, torch.log1p(-betas), torch.log(alphas))
    return torch.cumsum(log_alphas, 0).tolist()


def _finish(x: torch.Tensor, clamp_final: bool) -> torch.Tensor:
    return x.clamp(-1.0, 1.0) if clamp_final else x


@SAMPLERS.register("ddpm")
@torch.inference_mode()
def ddpm(model, schedule, objective, x_T, *, steps=None, variance="fixed_small", clip_x0=True, clamp_final=True,
         generator=None, progress=False, callback=None):
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2; improved-diffusion's p_sample).

    x0_pred from the model (clamped when clip_x0), then x_{t-1} ~ N(coef1 x0_pred + coef2 x_t, var_t),
    var_t = posterior_variance ("fixed_small") or beta_t ("fixed_large"); no noise at t = 0.
    """
    T = schedule.num_timesteps
    if steps is not None and steps != T:
        raise ValueError(f"ddpm runs all T = {T} steps; got steps={steps} (use ddim or dpm_solver for fewer)")
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown ddpm variance '{variance}'; known: fixed_small, fixed_large")
    coef1, coef2 = _float64(schedule.posterior_mean_coef1), _float64(schedule.posterior_mean_coef2)
    var = _float64(schedule.posterior_variance if variance == "fixed_small" else schedule.betas)
    x_t = x_T
    for i, t in enumerate(tqdm(range(T - 1, -1, -1), disable=not progress)):
        x0_pred, _ = denoise(model, schedule, objective, x_t, t, clip_x0)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        mean = coef1[t] * x0_pred + coef2[t] * x_t  # posterior mean of q(x_{t-1} | x_t, x0_pred)
        x_t = mean + math.sqrt(var[t]) * _noise(x_t, generator) if t > 0 else mean
    return _finish(x_t, clamp_final)


@SAMPLERS.register("ddim")
@torch.inference_mode()
def ddim(model, schedule, objective, x_T, *, steps=50, eta=0.0, spacing="linspace", clip_x0=False,
         clamp_final=True, generator=None, progress=False, callback=None):
    """DDIM (Song et al. 2020, eq. 12) over ``timesteps(T, steps, spacing)``; eta=0 deterministic, 1 ~ DDPM.

    Each step goes from t to the next listed timestep; after the last one to clean (alpha_bar = 1),
    so the result is the last x0_pred.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"ddim eta must be in [0, 1], got {eta}")
    ts = timesteps(schedule.num_timesteps, steps, spacing, schedule).tolist()
    log_ab = _log_alphas_cumprod(schedule)
    x_t = x_T
    for i, t in enumerate(tqdm(ts, disable=not progress)):
        x0_pred, eps_pred = denoise(model, schedule, objective, x_t, t, clip_x0)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        log_ab_t, log_ab_prev = log_ab[t], (log_ab[ts[i + 1]] if i + 1 < len(ts) else 0.0)
        one_minus_ab_t, one_minus_ab_prev = -math.expm1(log_ab_t), -math.expm1(log_ab_prev)
        # sigma_t = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        sigma = eta * math.sqrt(one_minus_ab_prev / one_minus_ab_t * -math.expm1(log_ab_t - log_ab_prev))
        # x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
        x_t = (math.exp(0.5 * log_ab_prev) * x0_pred
               + math.sqrt(max(one_minus_ab_prev - sigma**2, 0.0)) * eps_pred)
        if sigma > 0:
            x_t = x_t + sigma * _noise(x_t, generator)
    return _finish(x_t, clamp_final)


@SAMPLERS.register("dpm_solver")
@torch.inference_mode()
def dpm_solver(model, schedule, objective, x_T, *, steps=20, spacing="logsnr", clip_x0=False, clamp_final=True,
               generator=None, progress=False, callback=None):
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    VP form: alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda = log(alpha / sigma); one model evaluation per
    listed timestep. First and last step (to clean, sigma = 0) are first order; the last returns x0_pred.
    ``generator`` is unused (the solver is deterministic) but kept for the shared signature.
    """
    ts = timesteps(schedule.num_timesteps, steps, spacing, schedule).tolist()
    log_ab = _log_alphas_cumprod(schedule)
    x_t, x0_prev, h_last = x_T, None, None
    for i, t in enumerate(tqdm(ts, disable=not progress)):
        x0_pred, _ = denoise(model, schedule, objective, x_t, t, clip_x0)
        if callback is not None:
            callback(i, t, x_t, x0_pred)
        if i + 1 == len(ts):
            x_t = x0_pred  # first order to sigma = 0: x = alpha_next * x0_pred with alpha_next = 1
            break
        log_ab_t, log_ab_next = log_ab[t], log_ab[ts[i + 1]]
        sigma, sigma_next = math.sqrt(-math.expm1(log_ab_t)), math.sqrt(-math.expm1(log_ab_next))
        alpha, alpha_next = math.exp(0.5 * log_ab_t), math.exp(0.5 * log_ab_next)
        h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)  # h = lambda_next - lambda
        if x0_prev is None:
            D = x0_pred
        else:
            r = h_last / h  # D = (1 + 1/(2r)) x0_pred - 1/(2r) x0_prev
            D = (1 + 1 / (2 * r)) * x0_pred - (1 / (2 * r)) * x0_prev
        x_t = (sigma_next / sigma) * x_t - (alpha_next * math.expm1(-h)) * D
        x0_prev, h_last = x0_pred, h
    return _finish(x_t, clamp_final)


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
        if key not in options:
            raise ValueError(f"sampler '{name}' does not take '{key}'; it takes: {', '.join(options)}")
    return options


def build_sampler(name: str, **params: Any) -> Callable[..., torch.Tensor]:
    """SAMPLERS[name] with ``params`` bound: call it as f(model, schedule, objective, x_T, *, generator,
    progress, callback). Raises the registry's error for an unknown name and ValueError for a parameter
    the sampler does not take."""
    fn = SAMPLERS.get(name)
    _check_params(name, fn, params)
    return functools.partial(fn, **params)


def num_evaluations(name: str, params: Dict[str, Any], T: int) -> int:
    """Model evaluations (NFE) of one sampling run: T for ddpm, ``steps`` for ddim and dpm_solver."""
    fn = SAMPLERS.get(name)
    options = _check_params(name, fn, params)
    steps = params.get("steps", options["steps"].default)
    return T if steps is None else int(steps)
