"""Moving averages of model weights, used for sampling: the classic exponential one (`EMA`, train.ema=standard)
and EDM2's power-function one (`PowerEMA`, train.ema=power), which tracks several lengths and snapshots them for
`posthoc_ema`.

The average lives in its own eval-mode module (``ema.module``), so sampling from it never touches the training
weights; ``swap_into`` (built on ``store`` / ``copy_to`` / ``restore``) temporarily loads it into the training
model instead, restoring the original weights bit for bit.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..registry import EMAS
from .posthoc_ema import flat_tensors, power_beta, sigma_rel_to_gamma

__all__ = ["EMA", "PowerEMA", "EMAS"]


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


class Average:
    """A shadow copy of a model in eval mode (``module``) that ``update`` folds the model's weights into; buffers
    are copied, not averaged."""

    snapshots = False  # whether the run writes snapshots of it (``snapshot``) for post-hoc reconstruction

    def __init__(self, model: nn.Module):
        self.num_updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None  # deepcopy carries gradients along; the shadow never needs them
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())
        self._backup: Optional[List[torch.Tensor]] = None

    def _model_tensors(self, model: nn.Module):
        model = _unwrap(model)
        params, buffers = list(model.parameters()), list(model.buffers())
        if len(params) != len(self._params) or len(buffers) != len(self._buffers):
            raise ValueError(f"model has {len(params)} parameters / {len(buffers)} buffers but the EMA tracks "
                             f"{len(self._params)} / {len(self._buffers)}: not the model the EMA was built from")
        return params, buffers

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


class EMA(Average):
    """Shadow weights: ema = decay_t * ema + (1 - decay_t) * param after each ``update``.

    decay_t = min(decay, (1 + n) / (10 + n)) with ``warmup`` (n = updates so far), else ``decay``; the warmup keeps
    early averages from being dominated by the random initialisation. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(model)
        self.decay = float(decay)
        self.warmup = bool(warmup)

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

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

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


class PowerEMA(Average):
    """EDM2's power-function EMA (Karras et al. 2024, Sec. 3): one average per relative std in `stds`, each
    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1) (t = 1, 2, ...
    updates: the first copies the weights). ``module`` holds the average of ``stds[0]``; ``snapshot`` gives all of
    them, from which `posthoc_ema` reconstructs any other length after training."""

    snapshots = True

    def __init__(self, model: nn.Module, stds: Sequence[float] = (0.05, 0.10)):
        super().__init__(model)
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.stds)
        self._names = [name for name, _ in self.module.named_parameters()]
        self._averages = [self._params] + [[p.detach().clone() for p in self._params] for _ in self.stds[1:]]

    def current_decay(self) -> float:
        """The decay beta_t the next ``update`` gives ``module``'s average."""
        return power_beta(self.num_updates + 1, self.gammas[0])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into every average (one fused lerp per average)."""
        params, buffers = self._model_tensors(model)
        t, weights = self.num_updates + 1, [p.detach() for p in params]
        for average, gamma in zip(self._averages, self.gammas):
            if average:
                # theta_hat_t = theta_hat_{t-1} + (1 - beta_t) (theta_t - theta_hat_{t-1})
                torch._foreach_lerp_(average, weights, 1.0 - power_beta(t, gamma))
        if self._buffers:
            torch._foreach_copy_(self._buffers, buffers)
        self.num_updates = t

    def averages(self) -> List[Dict[str, torch.Tensor]]:
        """Each average's parameters by name (live tensors)."""
        return [dict(zip(self._names, average)) for average in self._averages]

    def snapshot(self, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
        """Every average's parameters as `dtype` and the module's buffers, flat, on the CPU (a snapshot file)."""
        state = self.module.state_dict()
        return flat_tensors(self.averages(), {k: v for k, v in state.items() if k not in self._names}, dtype)

    def state_dict(self) -> Dict[str, Any]:
        """``module`` (the first average, as every reader of ``EMA`` expects) and all averages (the first shares
        its storage with ``module`` in the saved file)."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "stds": list(self.stds),
                "gammas": list(self.gammas),
                "averages": [{k: v.detach() for k, v in a.items()} for a in self.averages()]}

    @torch.no_grad()
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if [float(s) for s in state.get("stds", [])] != list(self.stds):
            raise ValueError(f"the checkpoint's EMA tracks sigma_rel {state.get('stds')}, this run {list(self.stds)}")
        self.module.load_state_dict(state["module"])
        for average, saved in zip(self._averages[1:], state["averages"][1:]):
            torch._foreach_copy_(average, [saved[name] for name in self._names])
        self.num_updates = int(state["num_updates"])


@EMAS.register("standard")
def standard(model: nn.Module, train: Any) -> EMA:
    """train.ema=standard: decay train.ema_decay, with train.ema_warmup."""
    return EMA(model, decay=train.ema_decay, warmup=train.ema_warmup)


@EMAS.register("power")
def power(model: nn.Module, train: Any) -> PowerEMA:
    """train.ema=power: one power EMA per sigma_rel in train.ema_stds."""
    return PowerEMA(model, stds=list(train.ema_stds))
