"""Noise schedules: betas and every quantity derived from them (DDPM, Ho et al. 2020).

Committed schedules are never changed in place: add a new one instead, so old runs stay comparable.

The registered (app) builders are safe at any T: linear betas scale with 1000/T (improved-diffusion), a schedule
that leaves more than ``max_terminal_signal`` of sqrt(alpha_bar) at t = T-1 is refused (every sampler starts from
pure N(0, I)), and ``zero_terminal_snr`` rescales to alpha_bar_{T-1} = 0 (Lin et al. 2024). The reference classes
build ``NoiseSchedule(linear_betas(...))`` directly and keep the literal formula.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..registry import SCHEDULES
from .processes import CLEAN, NoiseProcess


def extract(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] shaped [B, 1, ..., 1] to broadcast against x, in x's dtype and device."""
    out = values.to(x.device)[t.to(x.device)]
    return out.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


class NoiseSchedule(NoiseProcess):
    """All per-timestep constants of a discrete-time variance-preserving diffusion: the discrete noise process.

    Computed in float64 from ``betas`` and stored as float32. Index t runs over 0..T-1 and is the network's
    noise-level input as it is (c_noise(t) = t), so discrete runs feed the U-Net the same values as always.
    """

    discrete = True
    variance_preserving = True

    def __init__(self, betas: torch.Tensor):
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not bool(((betas > 0) & (betas < 1)).all() or _zero_terminal(betas)):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1) (the last may be 1: zero terminal SNR)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance)   (DDPM eq. 6-7)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        f64 = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            # posterior_variance[0] is 0; log uses the t=1 value there (as in improved-diffusion)
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            # SNR(t) = alpha_bar_t / (1 - alpha_bar_t)
            "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        }
        for name, value in f64.items():
            setattr(self, name, value.to(torch.float32))
        self.num_timesteps = int(betas.shape[0])
        self.t_min, self.t_max = 0, self.num_timesteps - 1

    # -- the process interface, on integer t ------------------------------------------------------
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._log_ab64(t).mul(0.5).exp()

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(self._log_ab64(t)))

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        return log_snr(self)[torch.as_tensor(t, dtype=torch.long).cpu()]

    def _log_ab64(self, t) -> torch.Tensor:
        return log_alphas_cumprod(self)[torch.as_tensor(t, dtype=torch.long).cpu()]

    def t_of_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The timestep whose logSNR is nearest to lam (lambda decreases in t)."""
        table = log_snr(self).to(lam.device)
        return (table[None, :] - lam.to(torch.float64)[:, None]).abs().argmin(dim=1)

    def from_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        return self.t_of_log_snr(lam)

    def c_noise(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def coefficients(self, t: torch.Tensor, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return extract(self.sqrt_alphas_cumprod, t, x), extract(self.sqrt_one_minus_alphas_cumprod, t, x)

    def time_tensor(self, t, n: int, device) -> torch.Tensor:
        return torch.full((n,), int(t), device=device, dtype=torch.long)

    def points(self) -> "DiscretePoints":
        return DiscretePoints(self)

    def end_is_clean(self, t) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "NoiseSchedule":
        """Move every constant to ``device`` (in place) and return self."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    def sample_timesteps(self, batch_size: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t ~ Uniform{0, ..., T-1}."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)


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


class DiscretePoints:
    """alpha, sigma, lambda of a schedule's timesteps in float64; index CLEAN (-1) is clean data."""

    variance_preserving = True

    def __init__(self, schedule: NoiseSchedule):
        self.log_ab_table = log_alphas_cumprod(schedule).tolist()

    def log_ab(self, t: int) -> float:
        return 0.0 if t == CLEAN else self.log_ab_table[t]

    def alpha(self, t: int) -> float:
        return 1.0 if t == CLEAN else math.exp(0.5 * self.log_ab_table[t])

    def sigma(self, t: int) -> float:
        return 0.0 if t == CLEAN else math.sqrt(-math.expm1(self.log_ab_table[t]))

    def lam(self, t: int) -> float:
        ab = self.log_ab_table[t] if t != CLEAN else None
        return math.inf if t == CLEAN else 0.5 * (ab - math.log(-math.expm1(ab)))


def _zero_terminal(betas: torch.Tensor) -> bool:
    return betas.dim() == 1 and bool(((betas[:-1] > 0) & (betas[:-1] < 1)).all()) and betas[-1].item() == 1.0


def terminal_signal(schedule: NoiseSchedule) -> float:
    """sqrt(alpha_bar_{T-1}): how much of x0 is left in the x_T every sampler replaces by pure noise."""
    return schedule.sqrt_alphas_cumprod[-1].item()


def checked(schedule: NoiseSchedule, max_terminal_signal: float) -> NoiseSchedule:
    """The schedule, or a one-line ValueError when its terminal signal exceeds ``max_terminal_signal``."""
    signal = terminal_signal(schedule)
    if signal > max_terminal_signal:
        raise ValueError(f"schedule leaves sqrt(alpha_bar) = {signal:.3g} > max_terminal_signal = "
                         f"{max_terminal_signal:g} at t = T-1 = {schedule.num_timesteps - 1}, but sampling starts "
                         f"from pure noise; raise noise_steps or set schedule.max_terminal_signal to allow it")
    return schedule


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(alpha_bar) so that it is 0 at t = T-1 and unchanged at t = 0.

    The last beta becomes 1 (x_{T-1} is pure noise), so an eps-predictor cannot recover x0 there: use objective=v.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_ab[0].item(), sqrt_ab[-1].item()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)  # eq. in Algorithm 1: shift, then scale
    ab = sqrt_ab**2
    return 1.0 - torch.cat([ab[:1], ab[1:] / ab[:-1]])


def linear_betas(noise_steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """DDPM's linear schedule: torch.linspace(beta_start, beta_end, T), in float64."""
    return torch.linspace(beta_start, beta_end, noise_steps, dtype=torch.float64)


def cosine_betas(noise_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) * pi/2).

    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at max_beta to avoid a singularity at t = T.
    """
    steps = torch.arange(noise_steps + 1, dtype=torch.float64) / noise_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def _build(betas: torch.Tensor, zero_terminal_snr: bool, max_terminal_signal: float) -> NoiseSchedule:
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return checked(NoiseSchedule(betas), max_terminal_signal)


@SCHEDULES.register("linear")
def linear(noise_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, zero_terminal_snr: bool = False,
           max_terminal_signal: float = 0.01) -> NoiseSchedule:
    """DDPM's linear betas given for T = 1000, scaled by 1000/T (improved-diffusion) so any T ends in noise."""
    scale = 1000.0 / noise_steps
    if beta_end * scale >= 1:
        raise ValueError(f"linear schedule: beta_end * 1000/T = {beta_end * scale:g} >= 1; use more noise_steps")
    return _build(linear_betas(noise_steps, beta_start * scale, beta_end * scale), zero_terminal_snr,
                  max_terminal_signal)


@SCHEDULES.register("cosine")
def cosine(noise_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999, zero_terminal_snr: bool = False,
           max_terminal_signal: float = 0.01) -> NoiseSchedule:
    return _build(cosine_betas(noise_steps, s, max_beta), zero_terminal_snr, max_terminal_signal)
