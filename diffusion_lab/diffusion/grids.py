"""Time grids: at which times of a noise process a sampler evaluates the model (k-diffusion's ``get_sigmas_*``).

A grid is a function ``grid(process, steps, **options) -> Tensor`` of ``steps`` distinct times, descending, in
the process's own coordinate: integer timesteps in [0, T-1] for a discrete schedule (LongTensor), float t in
[t_min, t_max] for a continuous process (float64). The sampler goes from the last one to clean data. Grids shaped
in lambda or sigma map back to t through the process's inverse logSNR. A new grid is one registered function.
``resolve(grid, process, steps)`` also takes an explicit list of times, a ``{name: ..., **options}`` mapping, or
any callable with the grid signature.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from ..registry import GRIDS
from .schedules import log_snr

Grid = Union[str, Sequence[float], Mapping[str, Any], Callable[..., torch.Tensor]]
LAMBDA_MAX = -math.log(0.002)  # where lambda- and sigma-shaped grids end on a path that reaches sigma = 0 (EDM's
#                                sigma_min: Karras et al. 2022)


def _continuous_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _lambda_range(process, lambda_min_clipped: float):
    """(lambda at the grid's start, at its end) of a continuous process: t_max (or the clip), t_min (or LAMBDA_MAX)."""
    lam_max = min(float(process.log_snr(torch.tensor(float(process.t_min), dtype=torch.float64))), LAMBDA_MAX)
    lam_min = max(float(process.log_snr(torch.tensor(float(process.t_max), dtype=torch.float64))), lambda_min_clipped)
    return lam_min, lam_max


def _times(process, lam: torch.Tensor) -> torch.Tensor:
    """Continuous times of logSNR values, inside the process's range, first and last kept exact where they are
    its ends."""
    return process.t_of_log_snr(lam).clamp(process.t_min, process.t_max)


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
def linspace(schedule, steps: int) -> torch.Tensor:
    """Uniform in t: round(linspace(0, T-1, S)) (the DDIM reference) or linspace(t_max, t_min, S)."""
    if not schedule.discrete:
        _continuous_steps(steps)
        return torch.linspace(schedule.t_max, schedule.t_min, steps, dtype=torch.float64)
    T = schedule.num_timesteps
    _check_steps(T, steps)
    return torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0)


@GRIDS.register("leading")
def leading(schedule, steps: int) -> torch.Tensor:
    """arange(S) * (T // S): diffusers' "leading" without offset; ends at 0."""
    _discrete_only(schedule, "leading")
    _check_steps(schedule.num_timesteps, steps)
    return (torch.arange(steps, dtype=torch.long) * (schedule.num_timesteps // steps)).flip(0)


@GRIDS.register("trailing")
def trailing(schedule, steps: int) -> torch.Tensor:
    """round(arange(T, 0, -T/S)) - 1: diffusers' "trailing"; starts at T-1, ends at round(T/S) - 1."""
    _discrete_only(schedule, "trailing")
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


def _discrete_only(process, name: str) -> None:
    if not process.discrete:
        raise ValueError(f"grid={name} spaces integer timesteps of a discrete schedule; schedule={process.name} is "
                         f"continuous: use linspace, logsnr, karras or shift")


@GRIDS.register("logsnr")
def logsnr(schedule, steps: int, lambda_min_clipped: float = -5.1) -> torch.Tensor:
    """Uniform in lambda = log(alpha/sigma) (DPM-Solver's choice: equal solver steps h), from the clip to t = 0."""
    if not schedule.discrete:
        _continuous_steps(steps)
        return _times(schedule, torch.linspace(*_lambda_range(schedule, lambda_min_clipped), steps,
                                               dtype=torch.float64))
    lam = log_snr(schedule)
    start = _first(lam, lambda_min_clipped, steps)
    return nearest(lam, torch.linspace(lam[start].item(), lam[0].item(), steps, dtype=torch.float64).tolist())


@GRIDS.register("karras")
def karras(schedule, steps: int, rho: float = 7.0, lambda_min_clipped: float = -5.1) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(S-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    with sigma = sigma(t) / alpha(t) = exp(-lambda), from the clip (as logsnr) to t = 0 (t_min)."""
    if schedule.discrete:
        lam = log_snr(schedule)
        start = _first(lam, lambda_min_clipped, steps)
        lam_min, lam_max = lam[start].item(), lam[0].item()
    else:
        _continuous_steps(steps)
        lam_min, lam_max = _lambda_range(schedule, lambda_min_clipped)
    sigma_max, sigma_min = math.exp(-lam_min), math.exp(-lam_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return nearest(lam, (-sigmas.log()).tolist()) if schedule.discrete else _times(schedule, -sigmas.log())


@GRIDS.register("shift")
def shift(schedule, steps: int, shift: float = 3.0) -> torch.Tensor:
    """Esser et al. 2024 (SD3), eq. 23: uniform t shifted to t' = m t / (1 + (m - 1) t) on the flow path, i.e.
    lambda' = lambda - ln m (SD3's log SNR is 2 lambda: its shift 2 ln m); on any process the same logSNR shift of
    the uniform-t grid (m > 1: noisier)."""
    if shift <= 0:
        raise ValueError(f"grid shift must be > 0, got {shift}")
    t = linspace(schedule, steps)
    lam = (log_snr(schedule)[t] if schedule.discrete else schedule.log_snr(t)) - math.log(shift)
    if schedule.discrete:
        return nearest(log_snr(schedule), lam.tolist())
    return _times(schedule, lam)


def end_time(process):
    """The time where every registered grid ends: t = 0 of a discrete schedule, else t_min, or the time of
    LAMBDA_MAX where the path reaches sigma = 0 there (the flow path)."""
    if process.discrete:
        return 0
    return float(_times(process, torch.tensor([_lambda_range(process, -math.inf)[1]], dtype=torch.float64))[0])


def explicit(schedule, timesteps: Sequence[float]) -> torch.Tensor:
    """A given list of times, checked: distinct, descending, in [0, T-1] (discrete) or [t_min, t_max]."""
    if not schedule.discrete:
        ts = torch.tensor([float(t) for t in timesteps], dtype=torch.float64)
        if ts.dim() != 1 or len(ts) == 0 or bool((ts[:-1] <= ts[1:]).any()) or ts.min() < schedule.t_min \
                or ts.max() > schedule.t_max:
            raise ValueError(f"a grid list must be distinct descending times in [{schedule.t_min:g}, "
                             f"{schedule.t_max:g}], got {list(timesteps)}")
        return ts
    ts = torch.tensor([int(t) for t in timesteps], dtype=torch.long)
    T = schedule.num_timesteps
    if ts.dim() != 1 or len(ts) == 0 or bool((ts[:-1] <= ts[1:]).any()) or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"a grid list must be distinct descending timesteps in [0, {T - 1}], got {list(timesteps)}")
    return ts


def resolve(grid: Grid, schedule, steps: int) -> torch.Tensor:
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
