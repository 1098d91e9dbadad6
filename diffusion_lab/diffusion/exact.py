"""An exactly known data distribution and its exact denoiser, for testing and scoring samplers.

x0 ~ sum_k w_k N(m_k, s_k^2 I_d). With x_t = a x0 + b eps on any noise process (a = alpha(t), b = sigma(t); for a
discrete schedule a = sqrt(alpha_bar_t), b = sqrt(1 - alpha_bar_t)), x_t | k ~ N(a m_k, v_k I_d) with
v_k = a^2 s_k^2 + b^2, so with responsibilities r_k(x_t):
    E[x0 | x_t]  = sum_k r_k (m_k + a s_k^2 (x_t - a m_k) / v_k)
    E[eps | x_t] = sum_k r_k  b (x_t - a m_k) / v_k
in float64 from these closed forms. The optimal output of any parameterisation is its target evaluated at these
two (every target is affine in (x0, eps) given x_t), so ``kind`` may be eps, x0, v, flow or edm.
``ConditionalDenoiser`` is the class-conditional version (E[eps | x_t, y], each class its own mixture), for
testing classifier-free guidance.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..registry import OBJECTIVES
from . import objectives  # noqa: F401  (registers the parameterisations)


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

    def component_means(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t, k], E[eps | x_t, k]) [N, K, d] for rows x [N, d] with per-row a, b [N, 1]."""
        var = (a**2 * self.stds**2 + b**2)[:, :, None]
        resid = x[:, None, :] - a[:, :, None] * self.means[None]  # x_t - a m_k
        return self.means[None] + a[:, :, None] * self.stds[None, :, None] ** 2 * resid / var, b[:, :, None] * resid / var

    def posterior_means(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E[x0 | x_t], E[eps | x_t]) for rows x [N, d] with per-row a, b [N, 1]."""
        r = self.log_responsibilities(x, a, b).exp()[:, :, None]  # [N, K, 1]
        e_x0, e_eps = self.component_means(x, a, b)
        return (r * e_x0).sum(1), (r * e_eps).sum(1)

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean row x [N, d]."""
        ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
        return self.log_responsibilities(x.to(torch.float64), ones, 0 * ones).argmax(dim=1)


class ExactDenoiser:
    """model(x_t, t) returning the exact optimal output of parameterisation ``kind`` for mixture data (float64
    inside): E[eps|x_t] for eps, E[x0|x_t] for x0, and their combination for v, flow and edm.

    Each sample of x_t [B, ...] holds numel / (B d) independent draws of the d-dimensional mixture.
    """

    def __init__(self, process, mixture: GaussianMixture, kind: str = "eps"):
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown prediction kind '{kind}'")
        self.process, self.mixture, self.kind = process, mixture, kind
        self.objective = OBJECTIVES.build(kind)
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rows, a, b = self._rows(x_t, t)
        return self._output(self.mixture.posterior_means(rows, a, b), a, b, x_t)

    def _rows(self, x_t: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_t as float64 rows [N, d] with their a, b [N, 1]."""
        assert t.dtype == (torch.long if self.process.discrete else torch.float64)
        assert t.shape == (x_t.shape[0],) and t.device == x_t.device
        self.calls += 1
        rows = x_t.to(torch.float64).reshape(-1, self.mixture.dim)
        per_sample = rows.shape[0] // x_t.shape[0]
        if self.process.discrete:
            ab = self.process.alphas_cumprod.to(torch.float64).to(x_t.device)[t]
            a, b = ab.sqrt(), (1.0 - ab).sqrt()
        else:
            a, b = self.process.alpha(t), self.process.sigma(t)
        self._t = t
        return rows, a.repeat_interleave(per_sample)[:, None], b.repeat_interleave(per_sample)[:, None]

    def _output(self, means: Tuple[torch.Tensor, torch.Tensor], a, b, x_t: torch.Tensor) -> torch.Tensor:
        e_x0, e_eps = (m.reshape(x_t.shape) for m in means)
        if self.kind == "eps":
            return e_eps.to(x_t.dtype)
        if self.kind == "x0":
            return e_x0.to(x_t.dtype)
        return self.objective.target(e_x0, e_eps, self.process, self._t).to(x_t.dtype)


class ConditionalDenoiser(ExactDenoiser):
    """model(x_t, t, y) of a class-conditional model, exactly: class y < K is ``classes[y]`` (a mixture of its own),
    the null class K (or y=None) is ``null``. ``from_mixture`` makes each component of a mixture a class and the
    whole mixture the null class: the data of a labelled Gaussian mixture."""

    def __init__(self, process, classes: Sequence[GaussianMixture], null: GaussianMixture, kind: str = "eps"):
        super().__init__(process, null, kind)
        if any(c.dim != null.dim for c in classes):
            raise ValueError("every class needs the dimension of the null class")
        self.classes, self.num_classes = list(classes), len(classes)

    @classmethod
    def from_mixture(cls, process, mixture: GaussianMixture, kind: str = "eps") -> "ConditionalDenoiser":
        components = [GaussianMixture([1.0], [m.tolist()], [s.item()]) for m, s in zip(mixture.means, mixture.stds)]
        return cls(process, components, mixture, kind)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        rows, a, b = self._rows(x_t, t)
        y = torch.full_like(t, self.num_classes) if y is None else y
        y = y.repeat_interleave(rows.shape[0] // x_t.shape[0])
        e_x0, e_eps = torch.empty_like(rows), torch.empty_like(rows)
        for k, mixture in enumerate([*self.classes, self.mixture]):  # index K: the null class
            rows_k = y == k
            if rows_k.any():
                e_x0[rows_k], e_eps[rows_k] = mixture.posterior_means(rows[rows_k], a[rows_k], b[rows_k])
        return self._output((e_x0, e_eps), a, b, x_t)


def gaussian(mean: float, std: float) -> GaussianMixture:
    """One-dimensional N(mean, std^2) as a one-component mixture."""
    return GaussianMixture([1.0], [mean], [std])
