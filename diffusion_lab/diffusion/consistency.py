"""Consistency training recipes (one loss object, as ``losses.DiffusionLoss``) for ``objective=consistency``.

Each step draws pairs of noise levels t > r on the same noise eps, and pulls the student's f(x_t, t) towards the
stop-gradient target f(x_r, r) (the target network is the online one without gradients, mu = 0, as iCT, ECT and
Song et al. 2023's CD on CIFAR-10, Table 3; dropout shares one mask between the two passes, as ECT):

  ct   consistency training, iCT recipe (Song & Dhariwal 2023, Sec. 3-4): x_r = alpha_r x0 + sigma_r eps on
       N(k) = min(s0 2^floor(k / K'), s1) + 1 Karras levels, K' = floor(K / (log2(s1 / s0) + 1)); adjacent levels
       drawn with p(i) ~ erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std));
       weight 1 / (s_t - s_r); pseudo-Huber distance. On a discrete schedule s1 is capped at T - 1 (one level
       per timestep at most).
  cd   consistency distillation (Song et al. 2023, Algorithm 2): x_r is one step of the teacher's probability-flow
       ODE from x_t (``teacher_step``: Euler or Heun); N fixed Karras levels, pairs uniform, weight 1.
  ect  consistency tuning (Geng et al. 2024, "Consistency models made easy"): s_t lognormal, s_r = s_t (1 - q^-(j+1)
       (1 + k sigmoid(-b s_t))) in stage j = floor(stages k / K) (the gap shrinks as training goes on), x_r =
       alpha_r x0 + sigma_r eps; r below the boundary is the boundary itself (f = y there); t is kept inside the
       process's range [boundary, t_max]; weight 1 / (s_t - s_r) (0 for a t at the boundary: no gap, no signal).
s = sigma / alpha throughout (the EDM noise level); times are the process's own (integer t for a discrete one).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, Optional

import torch

from ..registry import Registry
from .losses import RECIPES
from . import grids
from .objectives import ConsistencyObjective
from .schedules import log_snr

METHODS = Registry("consistency method")
RECIPE_KEYS = ("method", "metric", "huber_c", "P_mean", "P_std", "s0", "s1", "rho", "levels", "teacher_solver",
               "ect_q", "ect_k", "ect_b", "ect_stages")
TEACHER_SOLVERS = ("euler", "heun")


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def _times(process, t: torch.Tensor) -> torch.Tensor:
    return t if process.discrete else t.to(torch.float64)


def _alpha(process, t: torch.Tensor) -> torch.Tensor:
    return process.alpha(_times(process, t)).to(t.device)


def noise_level(process, t: torch.Tensor) -> torch.Tensor:
    """s = sigma(t) / alpha(t), float64 [B]."""
    t = _times(process, t)
    return (process.sigma(t) / process.alpha(t)).to(torch.float64).to(t.device)


def denoiser(model: Callable, objective, process) -> Callable:
    """D(x_t, t, **cond) = x0_pred of a network in process coordinates (any parameterisation)."""
    def D(x_t, t, **cond):
        return objective.to_x0_eps(model(x_t, t, **cond), x_t, process, t)[0].to(x_t.dtype)
    return D


def teacher_step(D: Callable, process, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, solver: str = "heun",
                 **cond) -> torch.Tensor:
    """One probability-flow ODE step from time t to r per sample (Karras et al. 2022, Algorithm 1, lines 4-8, in
    y = x / alpha, s = sigma / alpha: dy/ds = (y - D) / s): ``euler`` (= DDIM with eta 0, one evaluation) or
    ``heun`` (the trapezoid correction at r, two). These are the steps of ``samplers.euler`` and ``samplers.heun``."""
    a_t, a_r = _col(_alpha(process, t), x_t), _col(_alpha(process, r), x_t)
    s, s_r = _col(noise_level(process, t), x_t), _col(noise_level(process, r), x_t)
    y = x_t / a_t
    d = (y - D(x_t, t, **cond)) / s
    y_euler = y + (s_r - s) * d
    if solver == "euler":
        return a_r * y_euler
    d_r = (y_euler - D(a_r * y_euler, r, **cond)) / s_r
    return a_r * (y + (s_r - s) * 0.5 * (d + d_r))


def pseudo_huber(diff: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||diff||^2 + c^2) - c per sample (Song & Dhariwal 2023, eq. 6); c = 0 is the L2 norm."""
    sq = diff.float().pow(2).flatten(1).sum(dim=1)
    return torch.sqrt(sq + c * c) - c


@RECIPES.register("consistency")
class ConsistencyLoss:
    """The consistency recipe: ``sample_t`` draws [n, 2] time pairs (t, r), ``loss(model, x0, t, eps, **cond)``
    returns the weighted distance; ``set_progress(step, total)`` moves the curriculum (a function of the step
    alone, so a resumed run continues it exactly). A ``cd`` loss needs its ``teacher`` (a denoiser D) attached."""

    def __init__(self, process, objective, method: str = "ct", metric: str = "pseudo_huber",
                 huber_c: Optional[float] = None, P_mean: float = -1.1, P_std: float = 2.0, s0: int = 10,
                 s1: int = 1280, rho: float = 7.0, levels: int = 17, teacher_solver: str = "heun",
                 ect_q: float = 2.0, ect_k: float = 8.0, ect_b: float = 1.0, ect_stages: int = 8):
        _check(process, objective, method, metric, teacher_solver, P_std, s0, s1, levels, ect_q, ect_stages)
        self.pairs = METHODS.get(method)
        self.process, self.objective, self.method, self.metric, self.huber_c = process, objective, method, metric, \
            huber_c
        if process.discrete and method == "ct":  # at most one level per timestep the grid may use
            s1 = min(int(s1), self._timesteps() - 1)
            s0 = min(int(s0), s1)
        self.P_mean, self.P_std, self.s0, self.s1, self.rho, self.levels = float(P_mean), float(P_std), int(s0), \
            int(s1), float(rho), int(levels)
        self.teacher_solver, self.ect_q, self.ect_k, self.ect_b, self.ect_stages = teacher_solver, float(ect_q), \
            float(ect_k), float(ect_b), int(ect_stages)
        self.teacher: Optional[Callable] = None
        self.step, self.total_steps = 0, 1
        self._levels: Dict[int, torch.Tensor] = {}
        most = self.s1 + 1 if method == "ct" else self.levels
        try:
            self.levels_at(most)  # a grid that cannot be built: refused now, not mid-run
        except ValueError as error:
            raise ValueError(f"objective.method={method} uses up to {most} noise levels (objective."
                             f"{'s1' if method == 'ct' else 'levels'}), which schedule={process.name or 'discrete'} "
                             f"cannot hold: {error}") from error

    KEYS = RECIPE_KEYS

    @classmethod
    def from_config(cls, process, objective, values: Dict) -> "ConsistencyLoss":
        return cls(process, objective, **{k: v for k, v in values.items() if k in RECIPE_KEYS})

    def set_progress(self, step: int, total_steps: int) -> None:
        self.step, self.total_steps = int(step), max(1, int(total_steps))

    # -- noise levels --------------------------------------------------------------------------------
    def _timesteps(self) -> int:
        """How many timesteps of a discrete schedule a Karras grid may use: those from its logSNR clip down."""
        grid = _mapping(self.objective.grid("karras"))
        default = inspect.signature(grids.karras).parameters["lambda_min_clipped"].default
        clip = grid.get("lambda_min_clipped", default)
        return int((log_snr(self.process) >= clip).sum())

    def levels_at(self, n: int) -> torch.Tensor:
        """n Karras levels (rho) as process times, descending, the last the boundary time exactly."""
        if n not in self._levels:
            ts = grids.resolve({**_mapping(self.objective.grid("karras")), "rho": self.rho}, self.process, n).clone()
            ts[-1] = grids.end_time(self.process)
            self._levels[n] = ts
        return self._levels[n]

    def num_levels(self) -> int:
        """iCT's N(k) = min(s0 2^floor(k / K'), s1) + 1 (ct); the fixed ``levels`` otherwise."""
        if self.method != "ct":
            return self.levels
        k_prime = max(1, math.floor(self.total_steps / (math.log2(self.s1 // self.s0) + 1)))
        return min(self.s0 * 2 ** (self.step // k_prime), self.s1) + 1

    def ect_stage(self) -> int:
        return min(self.ect_stages - 1, self.ect_stages * self.step // self.total_steps)

    def sample_t(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """[n, 2] pairs (t, r) of process times, t noisier than r."""
        t, r = self.pairs(self, n, device, generator)
        return torch.stack([t, r], dim=1)

    # -- the loss ------------------------------------------------------------------------------------
    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """1 / (s_t - s_r) (iCT, ECT); 1 for cd (Song et al. 2023)."""
        if self.method == "cd":
            return torch.ones(t.shape, device=t.device)
        gap = noise_level(self.process, t) - noise_level(self.process, r)
        return torch.where(gap > 0, 1.0 / gap.clamp(min=1e-300), 0.0).float()  # t at the boundary: f = y, no signal

    def __call__(self, model: Callable, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 **cond) -> torch.Tensor:
        t, r = t[:, 0], t[:, 1]  # sample_t's pairs: long for a discrete schedule, float64 otherwise
        x_t, _ = self.process.add_noise(x0, t, eps)
        f = denoiser(model, self.objective, self.process)
        with torch.no_grad():
            x_r = self.x_r(x0, eps, x_t, t, r, cond)
        state = _rng_state(x0.device)
        f_t = f(x_t, t, **cond)
        with torch.no_grad():
            _set_rng_state(x0.device, state)  # the same dropout mask for the target
            f_r = f(x_r, r, **cond)
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(x0[0].numel())
        distance = pseudo_huber(f_t - f_r, c if self.metric == "pseudo_huber" else 0.0)
        if self.metric == "l2":
            distance = distance.pow(2) / x0[0].numel()
        return (self.weight(t, r) * distance).mean()

    def x_r(self, x0, eps, x_t, t, r, cond) -> torch.Tensor:
        """The target's input: one teacher ODE step from x_t (cd), else the same noise at r."""
        if self.method != "cd":
            return self.process.add_noise(x0, r, eps)[0]
        if self.teacher is None:
            raise RuntimeError("objective.method=cd needs a teacher: train.teacher=RUN_DIR")
        return teacher_step(self.teacher, self.process, x_t, t, r, self.teacher_solver, **cond)


def _check(process, objective, method, metric, teacher_solver, P_std, s0, s1, levels, ect_q, ect_stages) -> None:
    """One-line ValueErrors for options a consistency recipe cannot use on this process."""
    if not isinstance(objective, ConsistencyObjective):
        raise ValueError(f"a consistency recipe needs objective=consistency, got objective={objective.name}")
    if metric not in ("pseudo_huber", "l2"):
        raise ValueError(f"objective.metric must be pseudo_huber or l2, got {metric!r}")
    if teacher_solver not in TEACHER_SOLVERS:
        raise ValueError(f"objective.teacher_solver must be one of {', '.join(TEACHER_SOLVERS)}, "
                         f"got {teacher_solver!r}")
    if not (P_std > 0 and 1 <= s0 <= s1 and levels >= 2 and ect_q > 1 and ect_stages >= 1):
        raise ValueError("objective needs P_std > 0, 1 <= s0 <= s1, levels >= 2, ect_q > 1 and ect_stages >= 1")
    if method == "ect" and process.discrete:
        raise ValueError("objective.method=ect draws continuous noise levels: it needs a continuous process "
                         "(schedule=edm, vp, ve or flow), not a discrete schedule")
    objective.check(process)


def _mapping(grid) -> dict:
    return {"name": grid} if isinstance(grid, str) else dict(grid)


def _rng_state(device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _adjacent(loss: ConsistencyLoss, i: torch.Tensor, n: int):
    ts = loss.levels_at(n).to(i.device)
    return ts[i], ts[i + 1]


@METHODS.register("ct")
def _ct_pairs(loss: ConsistencyLoss, n: int, device, generator):
    """iCT: adjacent levels of N(k), index drawn from the discretised lognormal (module doc)."""
    N = loss.num_levels()
    ts = loss.levels_at(N)
    log_s = noise_level(loss.process, ts).flip(0).log()  # ascending s_1 < ... < s_N
    cdf = torch.erf((log_s - loss.P_mean) / (math.sqrt(2) * loss.P_std))
    p = (cdf[1:] - cdf[:-1]).clamp(min=0)  # pair (s_i, s_{i+1}), i = 1..N-1 ascending
    i_up = torch.multinomial(p.float().to(device), n, replacement=True, generator=generator)
    i = (N - 2) - i_up  # in the descending list: pair (ts[i], ts[i + 1])
    return _adjacent(loss, i, N)


@METHODS.register("cd")
def _cd_pairs(loss: ConsistencyLoss, n: int, device, generator):
    """CD: adjacent levels of the fixed grid, uniformly (Song et al. 2023, Algorithm 2)."""
    i = torch.randint(0, loss.levels - 1, (n,), generator=generator, device=device)
    return _adjacent(loss, i, loss.levels)


@METHODS.register("ect")
def _ect_pairs(loss: ConsistencyLoss, n: int, device, generator):
    """ECT: s_t lognormal, s_r from the shrinking gap of the current stage (module doc)."""
    process = loss.process
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
    boundary = torch.full((n,), float(grids.end_time(process)), dtype=torch.float64, device=device)
    t = torch.maximum(process.from_log_snr(-(loss.P_mean + loss.P_std * z)), boundary).clamp(max=process.t_max)
    s = noise_level(process, t)
    decay = loss.ect_q ** -(loss.ect_stage() + 1) * (1 + loss.ect_k * torch.sigmoid(-loss.ect_b * s))
    s_r = s * (1 - decay)
    s_min = noise_level(process, boundary)
    r = torch.where(s_r > s_min, process.from_log_snr(-s_r.clamp(min=1e-300).log()), boundary)
    return t, torch.minimum(r, t)
