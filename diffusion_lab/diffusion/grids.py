"""Time grids: which integer timesteps a sampler evaluates the model at (k-diffusion's ``get_sigmas_*``).

A grid is a function ``grid(schedule, steps, **options) -> LongTensor`` of ``steps`` distinct timesteps in
[0, T-1], descending; the sampler goes from the last one to clean data (alpha_bar = 1). A new grid is one
registered function. ``resolve(grid, schedule, steps)`` also takes an explicit list of timesteps, a
``{name: ..., **options}`` mapping, or any callable with the grid signature.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ..registry import GRIDS
from .schedules import NoiseSchedule

Grid = Union[str, Sequence[int], Mapping[str, Any], Callable[..., torch.Tensor]]


def log_alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    """log alpha_bar_t = sum_{s<=t} log(1 - beta_s) in float64 (-inf where alpha_bar = 0: zero terminal SNR), so
    1 - alpha_bar = -expm1(log alpha_bar) keeps full precision where alpha_bar is close to 1 (small t)."""
    betas, alphas = (v.detach().to("cpu", torch.float64) for v in (schedule.betas, schedule.alphas))
    # both are stored in float32: log1p(-beta) is exact to float32 for small beta, log(alpha) for beta near 1
    return torch.cumsum(torch.where(betas < 0.5, torch.log1p(-betas), torch.log(alphas)), 0)


def log_snr(schedule: NoiseSchedule) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t) = (log alpha_bar - log(1 - alpha_bar)) / 2, decreasing in t (float64)."""
    log_ab = log_alphas_cumprod(schedule)
    return 0.5 * (log_ab - torch.log(-torch.expm1(log_ab)))


def _check_steps(T: int, steps: int) -> None:
    if not 0 < steps <= T:
        raise ValueError(f"steps must be in (0, T] = (0, {T}], got {steps}")


def nearest(values: torch.Tensor, targets: Sequence[float]) -> torch.Tensor:
    """For each target (descending in t), the timestep whose value (decreasing in t) is nearest, made strictly
    descending with room left for the remaining steps."""
    ts = (values[None, :] - torch.as_tensor(targets, dtype=torch.float64)[:, None]).abs().argmin(dim=1).tolist()
    S = len(ts)
    for i in range(1, S):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    return torch.tensor([max(t, S - 1 - i) for i, t in enumerate(ts)], dtype=torch.long)


@GRIDS.register("linspace")
def linspace(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """round(linspace(0, T-1, S)): the DDIM reference; ends at T-1 and 0."""
    T = schedule.num_timesteps
    _check_steps(T, steps)
    return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)


@GRIDS.register("leading")
def leading(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """arange(S) * (T // S): diffusers' "leading" without offset; ends at 0."""
    _check_steps(schedule.num_timesteps, steps)
    return (torch.arange(steps, dtype=torch.long) * (schedule.num_timesteps // steps)).flip(0)


@GRIDS.register("trailing")
def trailing(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """round(arange(T, 0, -T/S)) - 1: diffusers' "trailing"; starts at T-1, ends at round(T/S) - 1."""
    T, S = schedule.num_timesteps, steps
    _check_steps(T, S)
    # exact integer arithmetic with round half to even (like torch): float steps could give S + 1 values or misround
    n = T * (S - torch.arange(S, dtype=torch.long))  # T - i T/S = n / S
    q, rem = n // S, n % S
    return q + ((2 * rem > S) | ((2 * rem == S) & (q % 2 == 1))).long() - 1


def _first(lam: torch.Tensor, lambda_min_clipped: float, steps: int) -> int:
    """The largest t with lambda_t >= lambda_min_clipped (diffusers' knob): where a lambda- or sigma-shaped grid
    starts. It keeps cosine's max_beta jump at T-1 (lambda -6.5 -> -9.9) from taking steps."""
    _check_steps(len(lam), steps)
    start = int((lam >= lambda_min_clipped).sum().item()) - 1  # lambda decreases in t
    if start < steps - 1:
        raise ValueError(f"lambda_min_clipped={lambda_min_clipped} leaves {start + 1} timesteps for {steps} steps")
    return start


@GRIDS.register("logsnr")
def logsnr(schedule: NoiseSchedule, steps: int, lambda_min_clipped: float = -5.1) -> torch.Tensor:
    """Uniform in lambda = log(alpha/sigma) (DPM-Solver's choice: equal solver steps h), from the clip to t = 0."""
    lam = log_snr(schedule)
    start = _first(lam, lambda_min_clipped, steps)
    return nearest(lam, torch.linspace(lam[start].item(), lam[0].item(), steps, dtype=torch.float64).tolist())


@GRIDS.register("karras")
def karras(schedule: NoiseSchedule, steps: int, rho: float = 7.0, lambda_min_clipped: float = -5.1) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    with sigma = sqrt((1 - alpha_bar) / alpha_bar) = exp(-lambda), from the clip (as logsnr) to t = 0."""
    lam = log_snr(schedule)
    start = _first(lam, lambda_min_clipped, steps)
    sigma_max, sigma_min = math.exp(-lam[start].item()), math.exp(-lam[0].item())
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return nearest(lam, (-sigmas.log()).tolist())


def explicit(schedule: NoiseSchedule, timesteps: Sequence[int]) -> torch.Tensor:
    """A given list of timesteps, checked: distinct, descending, in [0, T-1]."""
    ts = torch.tensor([int(t) for t in timesteps], dtype=torch.long)
    T = schedule.num_timesteps
    if ts.dim() != 1 or len(ts) == 0 or bool((ts[:-1] <= ts[1:]).any()) or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"a grid list must be distinct descending timesteps in [0, {T - 1}], got {list(timesteps)}")
    return ts


def resolve(grid: Grid, schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """The timesteps of ``grid`` (a registered name, a {name, **options} mapping, a list or a callable)."""
    if isinstance(grid, str):
        return GRIDS.get(grid)(schedule, steps)
    if isinstance(grid, Mapping):
        options = dict(grid)
        return GRIDS.get(options.pop("name"))(schedule, steps, **options)
    if callable(grid):
        return explicit(schedule, grid(schedule, steps).tolist())
    return explicit(schedule, grid)


def is_list(grid: Grid) -> bool:
    """An explicit list sets its own length (the sampler's ``steps`` does not apply)."""
    return not isinstance(grid, (str, Mapping)) and not callable(grid)
