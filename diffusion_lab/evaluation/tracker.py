"""FID as the commands use it: config -> evaluator with its reference and noise floor (``build_evaluator``),
and FID during training (``FIDTracker``)."""
from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from .features import digits_classifier
from . import set_metrics
from .fid import FIDEvaluator, FIDResult
from .moments import SampleStats

log = logging.getLogger(__name__)
REFERENCES = ("test", "train")  # eval.reference: the split of the run's data that FID compares with


def build_evaluator(eval_cfg, datasets: Callable[[str], torch.utils.data.Dataset], device, num_samples: int,
                    progress: bool = True) -> FIDEvaluator:
    """The evaluator of ``eval_cfg`` with its reference (split ``eval.reference``) and the floor at ``num_samples``.

    datasets(split) -> that split of the configured data; ``auto`` picks the digits classifier for digits
    (trained on this config's train split) and Inception for everything else.
    """
    train = datasets("train")
    extractor = eval_cfg.feature_extractor
    if extractor == "auto":
        extractor = "digits" if train.name == "digits" else "inception"
    if extractor == "digits":
        if getattr(train, "labels", None) is None:
            raise ValueError(f"eval.feature_extractor=digits needs the digits data, not {train.name}")
        extractor = digits_classifier(train.images, train.labels)
    evaluator = FIDEvaluator(mode=eval_cfg.mode, feature_extractor=extractor, fallback=eval_cfg.fallback,
                             num_samples=num_samples, batch_size=eval_cfg.batch_size, device=device, progress=progress)
    if evaluator.enabled:
        reference = train if eval_cfg.reference == "train" else datasets(eval_cfg.reference)
        evaluator.set_reference(train.name, reference, resolution=train.image_size, split=eval_cfg.reference)
        evaluator.set_floor(train, num_samples)
    return evaluator


class _SingleProcess:
    """The ranks of a run without data parallelism: rank 0 of 1."""

    rank, world_size = 0, 1

    @staticmethod
    def all_gather(obj: Any) -> list:
        return [obj]


class FIDTracker:
    """FID during training: every `eval.every` steps on EMA samples, the best value and its history.

    Evaluation runs under `torch.random.fork_rng`, so switching FID on or off never changes training.
    The starting noise is the same at every evaluation, so values compare over time.
    datasets(split) -> that split of the run's images (FID's reference is split `eval.reference`); shape: of the
    starting noise x_T when it is not the images' (a latent run's latents).
    """

    def __init__(self, eval_cfg, datasets: Callable[[str], torch.utils.data.Dataset], device: torch.device, seed: int = 0,
                 shape: Optional[tuple] = None):
        self.every = int(eval_cfg.every)
        self.num_samples, self.seed = int(eval_cfg.num_samples), seed
        train = datasets("train")
        self.shape = tuple(shape or (train.channels, train.image_size, train.image_size))  # of the starting noise
        self.device = torch.device(device)
        self.history: list = []  # [(step, value)]
        self.sizes: list = []  # generated images behind each history value (None: from a checkpoint that did not say)
        self.best: Optional[float] = None
        self.label: Optional[str] = None
        self.last: Optional[FIDResult] = None
        self.resumed_final: dict = {}  # final() of the checkpoint a resumed run started from
        self.evaluator: Optional[FIDEvaluator] = None
        if self.every > 0:
            with torch.random.fork_rng(devices=[]):  # the floor's subset and clean-fid's dummy z leave training alone
                self.evaluator = build_evaluator(eval_cfg, datasets, device, self.num_samples, progress=False)
            if self.evaluator.enabled:
                ev = self.evaluator
                floor = (f"floor {ev.floor:.4f} (FID of {ev.floor_n} real training images, {ev.extractor_label})"
                         if ev.floor is not None else "no floor (not a finite positive number)")
                beside = set_metrics.describe(ev.floor_metrics, {})
                floor += f"; {beside} of the same images" if beside else "; KID and precision/recall unavailable"
                log.info(f"FID reference: {ev.reference}; {floor}")

    @property
    def enabled(self) -> bool:
        return self.evaluator is not None and self.evaluator.enabled

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def evaluate(self, sample: Callable[[torch.Tensor, int], torch.Tensor], ranks: Any = None,
                 stop: Callable[[], bool] = lambda: False) -> Optional[FIDResult]:
        """FID of `num_samples` images from sample(x_T, seed) against the reference statistics, streamed: each
        batch is generated, embedded and added to running statistics before the next is made, so memory is one
        batch of images (plus a D x D matrix and the num_samples x D features that KID and precision/recall use).

        stop() is asked before every batch; once it is true the evaluation ends and returns None (on every rank).
        ranks: a `training.distributed.Ranks` (rank, world_size, all_gather); None is a single process.
        With several ranks each generates and embeds a contiguous share of the batches; their statistics are
        gathered and merged in batch order, so all ranks hold the single-process result (to float precision)."""
        ranks = ranks or _SingleProcess()
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            parts = ranks.all_gather(self._stream(sample, ranks, stop))
        if any(stopped for _, stopped in parts):
            return None
        result = self.evaluator.score_stats(functools.reduce(SampleStats.merge, [s for s, _ in parts if s is not None]))
        self.label, self.last = result.label(), result
        return result

    def _stream(self, sample: Callable[[torch.Tensor, int], torch.Tensor], ranks: Any,
                stop: Callable[[], bool]) -> Tuple[Optional[SampleStats], bool]:
        """(this rank's statistics or None when it has no batch, whether stop() said so before a batch)."""
        stats = None
        for k, x_T in self._batches(ranks):
            if stop():
                return None, True
            batch = self.evaluator.batch_stats(sample(x_T, self.seed + k).cpu())  # the images are dropped here
            stats = batch if stats is None else stats.merge(batch)
        return stats, False

    def _batches(self, ranks: Any) -> Iterator[Tuple[int, torch.Tensor]]:
        """(k, x_T) of this rank's batches. Every rank draws all the starting noise in order, so batch k has
        the same x_T (and sampler seed seed + k) whatever the number of ranks."""
        noise = torch.Generator().manual_seed(self.seed)
        n, bs = self.num_samples, self.evaluator.even_batch_size(self.num_samples)
        sizes = [min(bs, n - start) for start in range(0, n, bs)]
        per_rank = math.ceil(len(sizes) / ranks.world_size)
        for k, b in enumerate(sizes):
            x_T = torch.randn((b, *self.shape), generator=noise)
            if k // per_rank == ranks.rank:
                yield k, x_T

    def record(self, step: int, result: FIDResult) -> bool:
        """Add a value to the history; True when it is the best so far (NaN or inf never is)."""
        self.history.append((step, result.value))
        self.sizes.append(self.num_samples)
        if math.isfinite(result.value) and (self.best is None or result.value < self.best):
            self.best = result.value
            return True
        return False

    def floors(self) -> Dict[str, float]:
        """{legend: value} of the noise floor, for plots."""
        ev = self.evaluator
        return {f"floor (real train images, n={ev.floor_n})": ev.floor} if self.enabled and ev.floor is not None else {}

    def final(self) -> dict:
        """The last evaluation's scores beside FID: final_kid, final_kid_std, final_precision, final_recall and the
        classifier scores (final_is_like, ...); those of the checkpoint resumed from, or {}, before the first."""
        if self.last is None:
            return dict(self.resumed_final)
        beside = {k: getattr(self.last, k) for k in set_metrics.KEYS}
        return {f"final_{k}": v for k, v in {**beside, **self.last.scores}.items()}

    def state_dict(self) -> dict:
        return {"history": list(self.history), "sizes": list(self.sizes), "best": self.best, "label": self.label,
                "final": self.final()}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self.label = list(state["history"]), state["best"], state["label"]
        self.sizes = list(state.get("sizes") or [None] * len(self.history))
        self.resumed_final = dict(state.get("final") or {})

    def summary(self) -> dict:
        """best_fid, final_fid, the floor beside them, the label and the history, the last KID and precision/recall
        with their floors (summary.json, W&B summary)."""
        ev = self.evaluator if self.enabled else None
        floors = ev.floors() if ev else dict.fromkeys(f"{k}_floor" for k in set_metrics.FLOOR_KEYS)
        return {"fid_history": self.history, "fid_history_n": self.sizes, "best_fid": self.best,
                "final_fid": self.history[-1][1] if self.history else None,
                "fid_floor": ev.floor if ev else None, "fid_floor_n": ev.floor_n if ev else None,
                "fid_reference": ev.reference if ev else None, "fid_label": self.label, **floors,
                **self.final()}
