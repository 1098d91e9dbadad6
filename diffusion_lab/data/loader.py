"""An exactly resumable stream of training batches, split over data-parallel ranks."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def shard(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size of x along dim 0: how a global batch is split."""
    n = x.shape[0] // world_size
    return x[rank * n:(rank + 1) * n]


def _derived_seed(*values: int) -> int:
    """A well-mixed 64-bit seed from a tuple of ints (stable across runs and platforms)."""
    entropy = [int(v) % (1 << 64) for v in values]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


_PERM_STREAM, _FLIP_STREAM, _WORKER_STREAM = 0, 1, 2


class _PositionedBatchSampler:
    """Endless batches of indices from (epoch, index) on; the same permutations as ResumableLoader."""

    def __init__(self, loader: "ResumableLoader", epoch: int, index: int):
        self.loader, self.epoch, self.index = loader, epoch, index

    def __iter__(self) -> Iterator[List[int]]:
        epoch, index, bs = self.epoch, self.index, self.loader.batch_size
        while True:
            perm = self.loader.permutation(epoch)
            for i in range(index, self.loader.steps_per_epoch):
                yield self.loader.rank_slice(perm[i * bs : (i + 1) * bs]).tolist()
            epoch, index = epoch + 1, 0


def _collate_images(batch: List[Any]) -> torch.Tensor:
    items = [b[0] if isinstance(b, (tuple, list)) else b for b in batch]
    return torch.stack(items)


class ResumableLoader:
    """Endless stream of batches (x0 [B,C,H,W], y [B] or None) on ``device`` that resumes bit-identically.

    ``y`` holds the images' class labels (the dataset's ``labels`` at the same indices); None for unlabelled data.

    Epoch ``e`` is ``torch.randperm`` drawn from a generator seeded with (seed, e); the last
    incomplete batch is dropped. With ``hflip`` each image of batch ``i`` of epoch ``e`` is flipped
    with probability 1/2 by a generator seeded with (seed, e, i). ``state_dict()`` is the position of
    the next batch; ``load_state_dict`` jumps there. Datasets with an in-memory ``images`` tensor
    are indexed directly; any other dataset goes through a DataLoader (``num_workers`` processes).
    Data-parallel: ``batch_size`` is the global batch; every rank draws the same permutations and flips and
    yields its contiguous ``1/world_size`` of each batch, so the position (and resume) is the same on all ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        hflip: bool = False,
        num_workers: int = 0,
        device: Union[str, torch.device] = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ):
        n = len(dataset)  # type: ignore[arg-type]
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if n < batch_size:
            raise ValueError(
                f"dataset {getattr(dataset, 'name', type(dataset).__name__)} has {n} images, "
                f"fewer than batch_size={batch_size} (batches drop the incomplete last one)"
            )
        if batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} is the global batch and does not split evenly over "
                             f"{world_size} ranks")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.hflip = bool(hflip)
        self.num_workers = int(num_workers)
        self.device = torch.device(device)
        self.num_items = n
        self.steps_per_epoch = n // self.batch_size
        self.epoch = 0
        self.index = 0
        images = getattr(dataset, "images", None)
        self._images = images.to(self.device) if isinstance(images, torch.Tensor) else None
        self._labels = getattr(dataset, "labels", None)
        self._iterator: Optional[Iterator[torch.Tensor]] = None

    # position ---------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or index < 0:
            raise ValueError(f"invalid loader state {dict(state)}")
        epoch, index = epoch + index // self.steps_per_epoch, index % self.steps_per_epoch
        self.epoch, self.index = epoch, index
        self._iterator = None  # a DataLoader iterator restarts from the new position

    @property
    def epoch_fraction(self) -> float:
        """Epochs consumed so far, e.g. 2.25 = a quarter into the third epoch."""
        return self.epoch + self.index / self.steps_per_epoch

    # randomness -------------------------------------------------------------------------------
    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_derived_seed(self.seed, epoch, _PERM_STREAM))
        return torch.randperm(self.num_items, generator=g)

    def flip_mask(self, epoch: int, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_derived_seed(self.seed, epoch, index, _FLIP_STREAM))
        return torch.rand(self.batch_size, generator=g) < 0.5

    def rank_slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (all of it on one process)."""
        return shard(x, self.rank, self.world_size)

    # iteration --------------------------------------------------------------------------------
    def __iter__(self) -> "ResumableLoader":
        return self

    def __next__(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        epoch, index = self.epoch, self.index
        bs = self.batch_size
        idx = self.rank_slice(self.permutation(epoch)[index * bs : (index + 1) * bs])  # this rank's part
        y = self._labels[idx].to(self.device) if self._labels is not None else None  # same indices as the images
        if self._images is not None:
            x = self._images[idx.to(self._images.device)]
        else:
            if self._iterator is None:
                self._iterator = self._start_dataloader(epoch, index)
            x = next(self._iterator).to(self.device, non_blocking=True)
        if self.hflip:
            mask = self.rank_slice(self.flip_mask(epoch, index)).to(x.device).view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(mask, x.flip(-1), x)
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return x, y

    def _start_dataloader(self, epoch: int, index: int) -> Iterator[torch.Tensor]:
        """A DataLoader from (epoch, index). Its own generator seeds the workers: starting an iterator
        must not draw from the global torch RNG, which a resume has just restored."""
        loader = DataLoader(
            self.dataset,
            batch_sampler=_PositionedBatchSampler(self, epoch, index),  # type: ignore[arg-type]
            num_workers=self.num_workers,
            collate_fn=_collate_images,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(_derived_seed(self.seed, epoch, index, _WORKER_STREAM)),
        )
        return iter(loader)
