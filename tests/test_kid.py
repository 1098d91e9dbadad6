"""KID (evaluation/kid.py): its mean is clean-fid's kernel_distance on the same features and seed, each subset's
value is the unbiased MMD^2 written out pair by pair, and it sees a shifted distribution."""
import itertools

import numpy as np
import pytest
from cleanfid import fid as cfid

from diffusion_lab.evaluation import kid


def features(n, d=16, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


@pytest.mark.parametrize("n_real, n_fake, max_subset_size", [(60, 90, 1000), (90, 60, 40)])
def test_mean_equals_clean_fid_kernel_distance(n_real, n_fake, max_subset_size):
    real, fake = features(n_real), features(n_fake, shift=0.3, seed=1)
    np.random.seed(7)
    clean = cfid.kernel_distance(real, fake, num_subsets=20, max_subset_size=max_subset_size)
    ours = kid.kid(real, fake, num_subsets=20, max_subset_size=max_subset_size, seed=7)
    assert ours.mean == pytest.approx(clean, rel=1e-9, abs=1e-12)
    assert ours.subset_size == min(n_real, n_fake, max_subset_size) and ours.std > 0


def test_each_subset_is_the_unbiased_mmd2_pair_by_pair():
    real, fake = features(12, d=5), features(15, d=5, shift=0.5, seed=1)
    values = kid.kid_subsets(real, fake, num_subsets=3, max_subset_size=8, seed=3)
    k = lambda a, b: (a @ b / len(a) + 1) ** 3  # noqa: E731
    for value, (f, r) in zip(values, kid.subset_indices(12, 15, 3, 8, 3)):
        x, y, m = fake[f], real[r], 8
        within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
        across = sum(k(x[i], y[j]) for i, j in itertools.product(range(m), repeat=2))
        assert value == pytest.approx(within / (m * (m - 1)) - 2 * across / m ** 2, rel=1e-10)


def test_whole_set_kernels_and_per_subset_kernels_agree():
    real, fake = features(50), features(70, shift=0.2, seed=1)
    whole = kid.kid_subsets(real, fake, num_subsets=10, max_subset_size=30, seed=0)
    per_subset = kid.kid_subsets(real, fake, num_subsets=10, max_subset_size=30, seed=0, max_kernel_entries=0)
    np.testing.assert_allclose(whole, per_subset, rtol=1e-10)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    real = features(400)
    same = kid.kid(real, features(400, seed=1), num_subsets=50, max_subset_size=100)
    shifted = kid.kid(real, features(400, shift=0.5, seed=1), num_subsets=50, max_subset_size=100)
    # E[MMD^2] = 0 for one distribution: the mean lies within one subset std of 0 (the subsets' mean varies less)
    assert abs(same.mean) < same.std
    assert shifted.mean > 50 * abs(same.mean) and shifted.mean > 3 * shifted.std


def test_too_few_features_is_refused():
    with pytest.raises(ValueError, match="at least 2 features"):
        kid.kid(features(1), features(10))
