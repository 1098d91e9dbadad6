"""Data parallelism: torchrun's environment -> one process group, and the few collectives a run needs.

torchrun (and `cluster.py` on SLURM) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without
WORLD_SIZE (or with WORLD_SIZE=1) everything here is the single-process no-op: rank 0 of 1, and every
collective returns its input. Backend: NCCL on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Tuple

import torch
import torch.distributed as dist

from ..data.loader import shard


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the collectives over them (identity on one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # where collectives put their tensors (NCCL needs CUDA ones)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous 1/world_size of x along dim 0 (x's length divides by world_size)."""
        return shard(x, self.rank, self.world_size)

    def all_gather(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
        if not self.active:
            return [obj]
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's obj on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if not self.active:
            return value
        x = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(x)
        return x.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank (e.g. a stop signal that reached one rank first)."""
        if not self.active:
            return flag
        x = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(x)
        return bool(x.item())


def ranks_from_env() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Tuple[Ranks, torch.device]]:
    """Join the process group of the environment's ranks (if there is one and it is not joined yet) and yield
    (ranks, this rank's device): `cuda:LOCAL_RANK` on GPUs. Leaves the group again if it joined it."""
    rank, world, local_rank = ranks_from_env()
    if world == 1:
        yield Ranks(device=device), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        yield Ranks(rank, world, local_rank, device), device
    finally:
        if joined:
            dist.destroy_process_group()
