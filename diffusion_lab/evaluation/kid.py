"""KID, the kernel inception distance (Binkowski et al. 2018, "Demystifying MMD GANs"), as clean-fid computes it.

KID is the unbiased estimate of MMD^2 between real and generated features under the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over ``num_subsets`` random subsets of m = min(n_real, n_fake,
max_subset_size) features of each set. Unlike FID it is unbiased in the sample count (its mean does not
grow as n shrinks) and can be slightly negative. clean-fid's ``kernel_distance`` returns only the mean;
here the per-subset values are kept too, drawn in clean-fid's order (generated subset, then real subset, per
subset) from a seeded ``RandomState``, so the mean equals ``kernel_distance`` under ``np.random.seed(seed)``
and the standard deviation over subsets comes with it.

Cost: when the three kernel matrices of the whole sets fit in ``max_kernel_entries`` they are computed once and
every subset's sums come from them by matrix products (1000 x 359 digits features, 100 subsets: about 0.1 s);
otherwise each subset computes its own kernel matrices, as clean-fid does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NUM_SUBSETS = 100
MAX_SUBSET_SIZE = 1000
MAX_KERNEL_ENTRIES = 1 << 24  # 128 MiB of float64 for the three whole-set kernel matrices


@dataclass(frozen=True)
class KID:
    """KID's mean and standard deviation (ddof 0, as torch-fidelity reports it) over ``num_subsets`` subsets of
    ``subset_size`` features of each set."""

    mean: float
    std: float
    num_subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x_i, y_j) = (x_i.y_j / d + 1)^3 for every pair: [len(x), len(y)]."""
    k = x @ y.T
    k /= x.shape[1]
    k += 1.0
    return k * k * k


def mmd2_unbiased(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    """The unbiased MMD^2 of two sets of m points from their kernel matrices: the diagonals (a point with
    itself) left out of the within-set means."""
    m = len(k_xx)
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float((within / (m - 1) - 2.0 * k_xy.sum() / m) / m)


def _indicators(indices: list, n: int) -> np.ndarray:
    """[n, S]: column s is 1 at subset s's points, else 0."""
    v = np.zeros((n, len(indices)))
    for s, idx in enumerate(indices):
        v[idx, s] = 1.0
    return v


def _mmd2_from_whole_kernels(real: np.ndarray, fake: np.ndarray, pairs: list, m: int) -> np.ndarray:
    """mmd2_unbiased of every subset pair from the kernel matrices of the whole sets, computed once: with the
    subsets' 0/1 indicators v, a subset's kernel sum is v^T K v and its trace diag(K).v (a few matrix products
    for all subsets together, where indexing 100 submatrices out would cost ten times more)."""
    v_f, v_r = _indicators([f for f, _ in pairs], len(fake)), _indicators([r for _, r in pairs], len(real))
    sums = {}
    for name, (a, v_a, b, v_b) in {"ff": (fake, v_f, fake, v_f), "rr": (real, v_r, real, v_r),
                                   "fr": (fake, v_f, real, v_r)}.items():
        k = polynomial_kernel(a, b)
        sums[name] = (v_a * (k @ v_b)).sum(axis=0)
        if name != "fr":
            sums[name] -= np.diagonal(k) @ v_a  # a point with itself is left out
    return ((sums["ff"] + sums["rr"]) / (m - 1) - 2.0 * sums["fr"] / m) / m


def subset_indices(n_real: int, n_fake: int, num_subsets: int, m: int, seed: int):
    """(fake indices, real indices) of each subset, drawn as clean-fid's ``kernel_distance`` draws them."""
    rng = np.random.RandomState(seed)
    for _ in range(num_subsets):
        fake = rng.choice(n_fake, m, replace=False)
        yield fake, rng.choice(n_real, m, replace=False)


def kid_subsets(real: np.ndarray, fake: np.ndarray, num_subsets: int = NUM_SUBSETS,
                max_subset_size: int = MAX_SUBSET_SIZE, seed: int = 0,
                max_kernel_entries: int = MAX_KERNEL_ENTRIES) -> np.ndarray:
    """The unbiased MMD^2 of each of ``num_subsets`` subset pairs [num_subsets] (float64)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 features in each set, got {len(real)} real and {len(fake)} generated")
    pairs = list(subset_indices(len(real), len(fake), num_subsets, m, seed))
    if (len(real) + len(fake)) ** 2 <= max_kernel_entries:  # every kernel value once
        return _mmd2_from_whole_kernels(real, fake, pairs, m)
    return np.asarray([mmd2_unbiased(polynomial_kernel(fake[f], fake[f]), polynomial_kernel(real[r], real[r]),
                                     polynomial_kernel(fake[f], real[r])) for f, r in pairs])


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = NUM_SUBSETS, max_subset_size: int = MAX_SUBSET_SIZE,
        seed: int = 0) -> KID:
    """KID of generated features ``fake`` [N, D] against real features ``real`` [M, D]."""
    values = kid_subsets(real, fake, num_subsets, max_subset_size, seed)
    return KID(float(values.mean()), float(values.std()), num_subsets, min(len(real), len(fake), max_subset_size))
