"""Running statistics of features that arrive batch by batch: what FID (mean, covariance) and the classifier
score need, without holding the images. Memory is one batch of images, a D x D matrix and the n x D features.

Batches are merged with the pairwise update of Chan, Golub and LeVeque (1979), in float64: the mean and the
scatter (sum of outer products of deviations from the mean) of two parts give those of their union, so the
result equals ``np.mean`` / ``np.cov`` of all features to float precision, and parts made on several ranks
merge the same way. The features themselves are kept too (not the images): KID and precision/recall need them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .features import ClassSums


@dataclass
class Moments:
    """Count, mean [D] and scatter [D, D] (float64) of the features seen so far."""

    n: int = 0
    mean: Optional[np.ndarray] = None
    scatter: Optional[np.ndarray] = None

    @classmethod
    def of(cls, feats: np.ndarray) -> "Moments":
        x = np.asarray(feats, dtype=np.float64)
        mean = x.mean(axis=0)
        deviations = x - mean
        return cls(len(x), mean, deviations.T @ deviations)

    def merge(self, other: "Moments") -> "Moments":
        """The moments of both parts together (Chan et al.: the means' difference corrects the scatter)."""
        if not other.n or not self.n:
            return self if other.n == 0 else other
        n = self.n + other.n
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * (other.n / n),
                       self.scatter + other.scatter + np.outer(delta, delta) * (self.n * other.n / n))

    def covariance(self) -> np.ndarray:
        """The unbiased covariance, as ``np.cov(feats, rowvar=False)`` computes it."""
        return self.scatter / (self.n - 1)


@dataclass
class SampleStats:
    """What one FID needs of its samples: feature moments and, for an extractor with a classifier head,
    the class sums; and the features themselves [n, D], in batch order, for KID and precision/recall (which
    need the points, not their moments: n x D is small beside the images, 1000 x 128 for digits)."""

    moments: Moments
    classes: Optional[ClassSums] = None
    features: Optional[np.ndarray] = None

    def merge(self, other: "SampleStats") -> "SampleStats":
        classes = None if self.classes is None else self.classes + other.classes  # one extractor: both or neither
        features = None if self.features is None else np.concatenate([self.features, other.features])
        return SampleStats(self.moments.merge(other.moments), classes, features)
