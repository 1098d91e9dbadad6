"""Improved precision and recall (evaluation/precision_recall.py, k = 3) on constructed cases with known answers,
and equal to an obvious pair-by-pair implementation on random data."""
import numpy as np
import pytest

from diffusion_lab.evaluation.precision_recall import knn_radii, precision_recall


def brute_force(real, fake, k=3):
    """The definition written out: k-th nearest other point of the same set, then ball membership."""
    def radii(points):
        return [sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)[k - 1]
                for i, p in enumerate(points)]

    def share(query, centres, r):
        return np.mean([any(np.linalg.norm(q - c) <= rc for c, rc in zip(centres, r)) for q in query])

    return share(fake, real, radii(real)), share(real, fake, radii(fake))


def cluster(n, centre, d=8, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + centre


def test_identical_sets_have_precision_and_recall_one():
    real = cluster(200, 0.0)
    result = precision_recall(real, real.copy())
    assert (result.precision, result.recall, result.k) == (1.0, 1.0, 3)


def test_far_apart_clusters_have_precision_and_recall_zero():
    result = precision_recall(cluster(150, 0.0), cluster(150, 100.0, seed=1))
    assert (result.precision, result.recall) == (0.0, 0.0)


def test_one_mode_of_two_has_full_precision_and_half_recall():
    real = np.concatenate([cluster(200, 0.0), cluster(200, 100.0, seed=1)])
    fake = real[:200][::2]  # a subset of one mode: every sample real, half the data never covered
    result = precision_recall(real, fake)
    assert result.precision == 1.0
    assert result.recall == pytest.approx(0.5, abs=0.05) and result.recall <= 0.5


@pytest.mark.parametrize("max_entries", [7, 1 << 22])  # blocks of one row, and one block for everything
def test_equal_to_the_brute_force_definition(max_entries):
    real, fake = cluster(40, 0.0, d=3), cluster(30, 0.5, d=3, seed=1)
    assert tuple(vars(precision_recall(real, fake, max_entries=max_entries)).values())[:2] == pytest.approx(
        brute_force(real, fake))


def test_radius_leaves_the_point_itself_out():
    line = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    np.testing.assert_allclose(knn_radii(line, k=1), [1, 1, 2, 4, 8])
    np.testing.assert_allclose(knn_radii(line, k=3, max_entries=2), [7, 6, 4, 7, 14])
    with pytest.raises(ValueError, match="more than 3 features"):
        knn_radii(line[:3])
