"""Seed statistics for comparisons: Welch's t-test and a t-interval of a mean over seeds."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided p-value of Welch's t-test (unequal variances); None when a side has fewer than two values."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    p = stats.ttest_ind(np.asarray(a, dtype=float), np.asarray(b, dtype=float), equal_var=False).pvalue
    return None if math.isnan(p) else float(p)


def interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, Optional[float]]:
    """(mean, half-width of the two-sided t-interval of the mean at `level`); the width is None below two
    values: mean +- t_{n-1} s / sqrt(n)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), None
    half = stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)
