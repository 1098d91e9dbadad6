"""The state of a training run: what a checkpoint saves and a resume restores, in one place."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..data.loader import ResumableLoader
from ..evaluation.tracker import FIDTracker
from . import checkpoint
from .distributed import Ranks
from .step import TrainStep


@dataclass
class RunState:
    """The run's position and every part that changes while it trains (weights, optimizer, EMA, data position,
    generators, FID history). `state_dict()` is exactly what a checkpoint holds; `load_state_dict()` is the one
    place a checkpoint is read into. With several ranks, `state_dict()` is a collective (it gathers each
    rank's global RNG states) and must be called on every rank."""

    model: torch.nn.Module  # the bare model, never the DDP or compiled wrapper
    step_fn: TrainStep
    loader: ResumableLoader
    fid: FIDTracker
    noise_generator: torch.Generator  # timesteps and noise; the same on every rank
    ranks: Ranks
    info: Dict[str, Any]  # written for readers of the checkpoint (config, sizes), never read back here
    step: int = 0
    elapsed_before: float = 0.0  # seconds of the runs this one continues
    loss_history: List[Tuple[int, float]] = field(default_factory=list)
    wandb_run_id: Optional[str] = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed_s(self) -> float:
        """Wall time of the whole run, earlier runs it continues included."""
        return self.elapsed_before + time.perf_counter() - self.started

    def state_dict(self) -> Dict[str, Any]:
        rng = self.ranks.all_gather(checkpoint.rng_states())
        return {
            "step": self.step, "model": self.model.state_dict(), "train_step": self.step_fn.state_dict(),
            "data": self.loader.state_dict(), "fid": self.fid.state_dict(), "loss_history": self.loss_history,
            "rng": {**rng[0], "noise_generator": self.noise_generator.get_state()},
            **({"rank_rng": rng} if self.ranks.active else {}),
            "elapsed_s": self.elapsed_s, "wandb_run_id": self.wandb_run_id, **self.info,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore everything `state_dict()` saved. A run continued with another number of ranks gets rank 0's
        global RNG states on every rank."""
        self.model.load_state_dict(state["model"])
        self.step_fn.load_state_dict(state["train_step"])
        self.loader.load_state_dict(state["data"])
        self.noise_generator.set_state(state["rng"]["noise_generator"].cpu())
        per_rank = state.get("rank_rng") or []
        checkpoint.set_rng_states(per_rank[self.ranks.rank] if len(per_rank) == self.ranks.world_size else state["rng"])
        self.fid.load_state_dict(state["fid"])
        self.step, self.elapsed_before = state["step"], state["elapsed_s"]
        self.wandb_run_id, self.loss_history = state.get("wandb_run_id"), state["loss_history"]
