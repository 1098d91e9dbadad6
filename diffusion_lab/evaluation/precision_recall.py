"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"), k = 3.

Each feature vector of a set is the centre of a ball whose radius is its distance to its k-th nearest neighbour
in the same set (itself left out); the union of the balls estimates the set's manifold. Precision is the share
of generated features inside at least one real ball (fidelity: how many samples look real); recall is the share
of real features inside at least one generated ball (diversity: how much of the data the samples cover). A point
on a ball's boundary is inside, as in the paper's code.

Distances are computed in float64 blocks of rows, so memory stays at about ``max_entries`` distances whatever
the set sizes (10k x 10k included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np

K = 3
MAX_ENTRIES = 1 << 22  # distances held at once: 32 MiB of float64


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def distance_blocks(a: np.ndarray, b: np.ndarray, max_entries: int = MAX_ENTRIES) -> Iterator[Tuple[slice, np.ndarray]]:
    """(rows, Euclidean distances [rows, len(b)]) of ``a`` against ``b``, a block of rows at a time."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    b_sq = (b * b).sum(axis=1)
    rows = max(1, max_entries // max(len(b), 1))
    for start in range(0, len(a), rows):
        block = a[start:start + rows]
        squared = (block * block).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * block @ b.T
        yield slice(start, start + len(block)), np.sqrt(np.maximum(squared, 0.0))


def knn_radii(feats: np.ndarray, k: int = K, max_entries: int = MAX_ENTRIES) -> np.ndarray:
    """Distance of each feature to its k-th nearest neighbour in the same set, itself left out [N]."""
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {len(feats)}")
    radii = np.empty(len(feats))
    for rows, dist in distance_blocks(feats, feats, max_entries):
        dist[np.arange(len(dist)), np.arange(rows.start, rows.stop)] = -np.inf  # itself: never a neighbour
        radii[rows] = np.partition(dist, k, axis=1)[:, k]  # index 0 is itself (-inf), 1..k the neighbours
    return radii


def coverage(query: np.ndarray, centres: np.ndarray, radii: np.ndarray, max_entries: int = MAX_ENTRIES) -> float:
    """Share of ``query`` features inside at least one ball (centre, radius)."""
    inside = np.zeros(len(query), dtype=bool)
    for rows, dist in distance_blocks(query, centres, max_entries):
        inside[rows] = (dist <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = K, max_entries: int = MAX_ENTRIES,
                     real_radii: Optional[np.ndarray] = None) -> PrecisionRecall:
    """Improved precision and recall of generated features ``fake`` [N, D] against real features ``real`` [M, D];
    ``real_radii``: ``knn_radii(real, k)`` computed once for a fixed reference (the costly part for a large one)."""
    real_radii = knn_radii(real, k, max_entries) if real_radii is None else real_radii
    precision = coverage(fake, real, real_radii, max_entries)
    recall = coverage(real, fake, knn_radii(fake, k, max_entries), max_entries)
    return PrecisionRecall(precision, recall, k)
