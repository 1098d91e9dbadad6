"""Exponential moving average of model weights, used for sampling.

The EMA lives in its own eval-mode module (``ema.module``), so sampling from it never touches the training
weights; ``swap_into`` (built on ``store`` / ``copy_to`` / ``restore``) temporarily loads it into the training
model instead, restoring the original weights bit for bit.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["EMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (``_orig_mod``) and DataParallel/DDP (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _state_tensors(model: nn.Module) -> List[torch.Tensor]:
    """Parameters then buffers, in registration order (identical for structurally identical modules)."""
    return list(model.parameters()) + list(model.buffers())


class EMA:
    """Shadow weights: ema = decay_t * ema + (1 - decay_t) * param after each ``update``.

    decay_t = min(decay, (1 + n) / (10 + n)) with ``warmup`` (n = updates so far), else ``decay``; the warmup keeps
    early averages from being dominated by the random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None  # deepcopy carries gradients along; the shadow never needs them
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())
        self._backup: Optional[List[torch.Tensor]] = None

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    def _model_tensors(self, model: nn.Module):
        model = _unwrap(model)
        params, buffers = list(model.parameters()), list(model.buffers())
        if len(params) != len(self._params) or len(buffers) != len(self._buffers):
            raise ValueError(f"model has {len(params)} parameters / {len(buffers)} buffers but the EMA tracks "
                             f"{len(self._params)} / {len(self._buffers)}: not the model the EMA was built from")
        return params, buffers

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average (one fused lerp over all parameters)."""
        params, buffers = self._model_tensors(model)
        weight = 1.0 - self.current_decay()
        if self._params:
            torch._foreach_lerp_(self._params, [p.detach() for p in params], weight)
        if self._buffers:
            torch._foreach_copy_(self._buffers, buffers)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA's."""
        params, buffers = self._model_tensors(model)
        torch._foreach_copy_(params + buffers, self._params + self._buffers)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Save a copy of the model's parameters and buffers, to be put back by ``restore``."""
        params, buffers = self._model_tensors(model)
        self._backup = [t.detach().clone() for t in params + buffers]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put back the weights saved by ``store`` (bit-identical) and drop the copy."""
        if self._backup is None:
            raise RuntimeError("EMA.restore called without a matching EMA.store")
        params, buffers = self._model_tensors(model)
        torch._foreach_copy_(params + buffers, self._backup)
        self._backup = None

    @contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """``with ema.swap_into(model):`` the model holds the EMA weights; the training weights come back after."""
        self.store(model)
        try:
            self.copy_to(model)
            yield model
        finally:
            self.restore(model)

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
