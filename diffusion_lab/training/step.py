"""One optimisation step, shared by the training loop and the reference classes.

Owns what is the same for every model: optimizer, learning-rate warm-up and decay, mixed precision
with a gradient scaler, gradient clipping and the EMA update.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Tuple

import torch

from ..registry import LR_SCHEDULES
from .ema import EMA


@LR_SCHEDULES.register("constant")
def constant(progress: float) -> float:
    """The peak learning rate throughout (the DDPM recipe)."""
    return 1.0


@LR_SCHEDULES.register("cosine")
def cosine(progress: float) -> float:
    """Half a cosine from the peak towards 0 (Loshchilov & Hutter 2017, without restarts)."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@LR_SCHEDULES.register("linear")
def linear(progress: float) -> float:
    """A straight line from the peak towards 0."""
    return 1.0 - progress


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay: Callable[[float], float]) -> float:
    """Fraction of the peak lr for optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then `decay` of the progress through the remaining steps (0 at the first, < 1 at the last)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return decay((step - warmup_steps) / max(1, total_steps - warmup_steps))


OPTIMIZERS = ("adam", "adamw")  # train.optimizer
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision
MAX_WARMUP_FRACTION = 0.2  # a short run warms up over at most this fraction of its steps


def clipped_warmup(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of `total_steps` gets: train.warmup_steps, but at most MAX_WARMUP_FRACTION of the run,
    so the peak learning rate is reached early also in a short run (train.steps=100 with the default 100)."""
    return min(int(warmup_steps), int(MAX_WARMUP_FRACTION * int(total_steps)))


def warmup_note(t) -> str:
    """The run's start line on the learning rate (config node `train`), saying when the warm-up was clipped."""
    used = clipped_warmup(t.warmup_steps, t.steps)
    clipped = (f" (train.warmup_steps={t.warmup_steps} clipped to {MAX_WARMUP_FRACTION:.0%} of train.steps={t.steps})"
               if used != t.warmup_steps else "")
    return f"lr: warm-up {used} steps{clipped} to {t.lr:g}, then {t.lr_schedule} to step {t.steps}"


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    lr: float = 2e-4,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    device: Optional[torch.device] = None,
) -> torch.optim.Optimizer:
    """Adam or AdamW, with the fused kernel on CPU and CUDA (one kernel for all parameters)."""
    classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{name}'; known: {', '.join(OPTIMIZERS)}")
    fused = device is not None and torch.device(device).type in ("cpu", "cuda")
    return classes[name](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `precision` on `device` (None = full fp32). Mixed precision is GPU-only."""
    if torch.device(device).type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def micro_batch_size(batch_size: int, grad_accum_steps: int) -> int:
    """Images per forward pass when `batch_size` images make one optimizer step in `grad_accum_steps` parts."""
    if grad_accum_steps < 1 or batch_size % grad_accum_steps:
        raise ValueError(f"train.batch_size={batch_size} must be a multiple of train.grad_accum_steps={grad_accum_steps}")
    return batch_size // grad_accum_steps


class TrainStep:
    """loss_fn() under autocast -> (scaled) backward, `grad_accum_steps` times -> unscale -> clip -> optimizer step
    -> lr schedule -> EMA. Each backward takes loss / k, so the summed gradient is that of the mean loss over the
    k micro-batches: exactly one step on a k times larger batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str = "auto",
        grad_clip: float = 0.0,
        warmup_steps: int = 0,
        ema: Optional[EMA] = None,
        lr_schedule: str = "constant",
        total_steps: int = 0,
        grad_accum_steps: int = 1,
    ):
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        self.grad_accum_steps = grad_accum_steps
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.device = torch.device(device)
        self.dtype = autocast_dtype(precision, self.device)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.grad_clip = grad_clip
        self.skipped = False  # whether the last call skipped its update (non-finite loss or gradient)
        self.last_lr: Optional[float] = None  # the learning rate of the last call
        decay = LR_SCHEDULES.get(lr_schedule)
        self.warmup_steps = warmup_steps  # saved: a resume with another train.steps keeps the run's (clipped) warm-up
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, self.warmup_steps, total_steps, decay)
        )

    def __call__(self, loss_fn: Callable[[], torch.Tensor]) -> Tuple[float, float]:
        """Run one optimizer step on `grad_accum_steps` calls of loss_fn (each draws its own micro-batch);
        returns (mean loss, gradient norm before clipping).

        A non-finite loss or gradient in any micro-batch skips the update (optimizer, warm-up and EMA stay put,
        `skipped` is True); with fp16 the gradient scaler lowers its scale.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.last_lr = self.lr  # what this step uses (logged; `lr` moves on to the next step's)
        losses = []
        for _ in range(self.grad_accum_steps):
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                micro_loss = loss_fn()
            self.scaler.scale(micro_loss / self.grad_accum_steps).backward()  # grads add up to those of the mean
            losses.append(micro_loss.detach().float())
        loss = torch.stack(losses).mean()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        loss_value, grad_norm_value = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one sync
        self.skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm_value))
        if not self.skipped:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # after an inf/NaN gradient this lowers the fp16 scale
        if not self.skipped:
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
        return loss_value, grad_norm_value

    @property
    def lr(self) -> float:
        """The learning rate the next step will use."""
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.warmup_steps = state.get("warmup_steps", self.warmup_steps)  # absent: saved before warm-up was clipped
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
