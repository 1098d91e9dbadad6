"""Classifier-free guidance (Ho & Salimans 2022), written once as a model wrapper, so every sampler guides.

    out = out_uncond + w (out_cond - out_uncond)      w = 0: unconditional, 1: conditional, > 1: guided

Both predictions come from one batched forward pass (labels y and the null class, concatenated along the batch).
Guidance space: the model's own output, whatever the objective. Every objective's x0 and eps are affine in that
output with coefficients fixed by (x_t, t) (x0 = A x_t + B out), and the weights (1 - w) + w sum to one, so
guiding the output is exactly guiding eps (i.e. the score -eps / sigma, Ho & Salimans' eq. 6) and guiding x0, for
eps-, x0- and v-models alike; clipping x0 (``clip_x0``) acts after the combination.
Two optional refinements, off by default:
  interval  guide only where lo <= t <= hi, plain conditional elsewhere (Kynkaanniemi et al. 2024)
  rescale   phi: out <- phi * out * std(out_cond) / std(out) + (1 - phi) * out, per sample, on the model output
            (Lin et al. 2024, Algorithm 2, which guides a v-model; diffusers' guidance_rescale)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch

KEYS = ("guidance_scale", "guidance_interval", "guidance_rescale")  # sampler.* keys that are not sampler options


@dataclass(frozen=True)
class Guidance:
    """The guidance settings: scale w, an optional interval [lo, hi] of process times, the rescale factor phi."""

    scale: float = 1.0
    interval: Optional[Tuple[int, int]] = None
    rescale: float = 0.0

    def __post_init__(self):
        if self.interval is not None and (len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1]):
            raise ValueError(f"guidance_interval must be null or [lo, hi] times of the process with 0 <= lo <= hi, "
                             f"got {list(self.interval)}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.rescale}")

    @classmethod
    def pop(cls, params: Dict[str, Any]) -> "Guidance":
        """The guidance keys of a sampler config (removed from ``params``), defaults for the missing ones."""
        interval = params.pop("guidance_interval", None)
        return cls(float(params.pop("guidance_scale", 1.0)), None if interval is None else tuple(float(v) for v in interval),
                   float(params.pop("guidance_rescale", 0.0)))

    def scales(self, t: torch.Tensor) -> torch.Tensor:
        """w per sample [B]: the scale inside the interval, 1 (conditional) outside it."""
        w = torch.full(t.shape, self.scale, dtype=torch.float64, device=t.device)
        if self.interval is None:
            return w
        inside = (t >= self.interval[0]) & (t <= self.interval[1])
        return torch.where(inside, w, torch.ones_like(w))


class GuidedModel:
    """``model(x_t, t)`` for a sampler: the guided prediction of a conditional ``model`` for labels ``y`` [B]."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor, guidance: Guidance):
        self.num_classes = getattr(model, "num_classes", None)
        if self.num_classes is None:
            raise ValueError("labels (and guidance) need a class-conditional model; this one has num_classes=null")
        if bool(((y < 0) | (y >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got {sorted(set(y.tolist()))}")
        self.model, self.y, self.guidance = model, y, guidance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.y.to(x_t.device)
        null = torch.full_like(y, self.num_classes)
        w = self.guidance.scales(t)
        if bool((w == 1).all()):
            return self.model(x_t, t, y)
        if bool((w == 0).all()):
            return self.model(x_t, t, null)
        out_cond, out_uncond = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
        w = w.to(out_cond.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        out = out_uncond + w * (out_cond - out_uncond)
        if self.guidance.rescale > 0:  # Lin et al. 2024, Algorithm 2
            dims = tuple(range(1, out.dim()))
            factor = out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-12)
            out = self.guidance.rescale * factor * out + (1 - self.guidance.rescale) * out
        return out


class GuidedSampler:
    """A sampler with its options bound. Called with labels ``y`` [B] it samples a conditional model with
    guidance; without, it samples the model as it is (a conditional model then draws from its null class)."""

    def __init__(self, sampler: Callable[..., torch.Tensor], guidance: Guidance):
        self.sampler, self.guidance = sampler, guidance

    def __call__(self, model: Callable, process, objective, x_T: torch.Tensor, *, y: Optional[torch.Tensor] = None,
                 **runtime: Any) -> torch.Tensor:
        if y is not None:
            model = GuidedModel(model, y, self.guidance)
        return self.sampler(model, process, objective, x_T, **runtime)

