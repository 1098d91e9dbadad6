"""An exactly known data distribution and its exact denoiser, for testing and scoring samplers.

x0 ~ sum_k w_k N(m_k, s_k^2 I_d). With x_t = a x0 + b eps (a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t)),
x_t | k ~ N(a m_k, v_k I_d) with v_k = a^2 s_k^2 + b^2, so with responsibilities r_k(x_t):
    E[x0 | x_t]  = sum_k r_k (m_k + a s_k^2 (x_t - a m_k) / v_k)
    E[eps | x_t] = sum_k r_k  b (x_t - a m_k) / v_k
and the v-predictor is a E[eps] - b E[x0]. Everything in float64, built from these closed forms (not objectives.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


class GaussianMixture:
    """Isotropic Gaussian mixture in d dimensions; scalar means give d = 1."""

    def __init__(self, weights: Sequence[float], means: Sequence, stds: Sequence[float]):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64).reshape(len(self.weights), -1)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if abs(self.weights.sum().item() - 1) > 1e-9 or bool((self.weights <= 0).any()) or bool((self.stds <= 0).any()):
            raise ValueError("mixture weights must be positive and sum to 1, stds positive")
        if not len(self.weights) == len(self.means) == len(self.stds):
            raise ValueError("mixture needs one mean and one std per weight")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """n draws [n, d] and their component labels [n]."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[labels] + self.stds[labels, None] * noise, labels

    def log_responsibilities(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """log r_k for rows x [N, d] noised with per-row a, b [N, 1] -> [N, K]."""
        var = a**2 * self.stds**2 + b**2  # [N, K]
        dist2 = (x[:, None, :] - a[:, :, None] * self.means[None]).pow(2).sum(-1)
        logits = self.weights.log() - 0.5 * self.dim * var.log() - 0.5 * dist2 / var
        return logits - logits.logsumexp(dim=1, keepdim=True)

    def posterior_means(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for rows x [N, d] with per-row a, b [N, 1]."""
        r = self.log_responsibilities(x, a, b).exp()[:, :, None]  # [N, K, 1]
        var = (a**2 * self.stds**2 + b**2)[:, :, None]
        resid = x[:, None, :] - a[:, :, None] * self.means[None]  # x_t - a m_k
        e_x0 = (r * (self.means[None] + a[:, :, None] * self.stds[None, :, None] ** 2 * resid / var)).sum(1)
        e_eps = (r * b[:, :, None] * resid / var).sum(1)
        return e_x0, e_eps

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean row x [N, d]."""
        ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
        return self.log_responsibilities(x.to(torch.float64), ones, 0 * ones).argmax(dim=1)


class ExactDenoiser:
    """model(x_t, t) returning the exact E[eps|x_t], E[x0|x_t] or v for mixture data (float64 inside).

    Each sample of x_t [B, ...] holds numel / (B d) independent draws of the d-dimensional mixture.
    """

    def __init__(self, schedule, mixture: GaussianMixture, kind: str = "eps"):
        if kind not in ("eps", "x0", "v"):
            raise ValueError(f"unknown prediction kind '{kind}'")
        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
        self.mixture, self.kind = mixture, kind
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and t.device == x_t.device
        self.calls += 1
        d = self.mixture.dim
        rows = x_t.to(torch.float64).reshape(-1, d)
        ab = self.alphas_cumprod.to(x_t.device)[t].repeat_interleave(rows.shape[0] // x_t.shape[0])[:, None]
        a, b = ab.sqrt(), (1.0 - ab).sqrt()
        e_x0, e_eps = self.mixture.posterior_means(rows, a, b)
        out = {"eps": e_eps, "x0": e_x0, "v": a * e_eps - b * e_x0}[self.kind]
        return out.reshape(x_t.shape).to(x_t.dtype)


def gaussian(mean: float, std: float) -> GaussianMixture:
    """One-dimensional N(mean, std^2) as a one-component mixture."""
    return GaussianMixture([1.0], [mean], [std])
