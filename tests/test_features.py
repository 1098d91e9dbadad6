"""The download-free FID feature extractors: the digits classifier (trained, cached, deterministic) and its
classifier score; the random net's labelling. The cache lives in a temporary dir (tests/conftest.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusion_lab.data.datasets import build_dataset
from diffusion_lab.evaluation import features
from diffusion_lab.evaluation.features import DigitsClassifier, classifier_score, digits_classifier
from diffusion_lab.evaluation.fid import FIDEvaluator


@pytest.fixture(scope="module")
def splits():
    return build_dataset("digits"), build_dataset("digits", split="test")


@pytest.fixture(scope="module")
def classifier(splits, tmp_path_factory):
    train, _ = splits
    return digits_classifier(train.images, train.labels, cache_dir=str(tmp_path_factory.mktemp("extractors")))


def test_classifier_learns_digits_and_is_cached(classifier, splits, tmp_path_factory, monkeypatch):
    _, test = splits
    with torch.no_grad():
        accuracy = (classifier.logits(test.images).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.95  # held-out digits: 98.1% measured
    cache = tmp_path_factory.getbasetemp() / "extractors0"
    assert [p.name for p in cache.iterdir()] == [f"{classifier.cache_id}.pt"]

    def no_training(*args, **kwargs):
        raise AssertionError("retrained despite the cache")

    monkeypatch.setattr(features, "_fit", no_training)
    train, _ = splits
    again = digits_classifier(train.images, train.labels, cache_dir=str(cache))
    for a, b in zip(again.state_dict().values(), classifier.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = torch.random.get_rng_state()
    digits_classifier(train.images, train.labels, cache_dir=str(cache))
    assert torch.equal(state, torch.random.get_rng_state()), "building the extractor leaves the global RNG alone"


@pytest.mark.slow
def test_classifier_training_is_deterministic(classifier, splits, tmp_path):
    train, _ = splits
    fresh = digits_classifier(train.images, train.labels, cache_dir=str(tmp_path))
    for a, b in zip(fresh.state_dict().values(), classifier.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_classifier_sees_native_size_through_clean_fid(classifier, splits, tmp_path):
    train, test = splits
    ev = FIDEvaluator(feature_extractor=classifier, device="cpu", progress=False, cache_dir=str(tmp_path))
    shapes = []
    inner = ev.extractor
    ev.extractor = lambda x: (shapes.append(tuple(x.shape)), inner(x))[1]
    ev.set_reference("digits", test.images, split="test")
    assert set(s[1:] for s in shapes) == {(3, 8, 8)}  # clean-fid's 299x299 resize was not applied
    result = ev.score(train.images[:400])
    assert result.mode == "native size" and result.extractor == "digits classifier"
    assert result.label() == "FID[native size, digits classifier, 400 samples vs digits test (359 images)]"
    assert result.scores["is_like"] > 9.0  # real digits: confident and all ten classes
    feats = ev.features(test.images)
    assert feats.shape == (359, DigitsClassifier.FEATURES)
    assert np.linalg.matrix_rank(np.cov(feats, rowvar=False)) == DigitsClassifier.FEATURES  # no dead features


def test_classifier_score_closed_forms():
    k = 10
    uniform = classifier_score(torch.zeros(50, k))  # p(y|x) = 1/K for every x
    assert uniform["label_entropy"] == pytest.approx(math.log(k))
    assert uniform["class_entropy"] == pytest.approx(math.log(k)) and uniform["is_like"] == pytest.approx(1.0)
    confident = classifier_score(100.0 * torch.eye(k).repeat(5, 1))  # sure, and every class equally often
    assert confident["label_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert confident["is_like"] == pytest.approx(k, rel=1e-6)
    collapsed = classifier_score(100.0 * torch.eye(k)[[3] * 20])  # sure, one class only
    assert collapsed["is_like"] == pytest.approx(1.0, rel=1e-6) and collapsed["class_entropy"] < 1e-9


@pytest.mark.parametrize("damage", ["zero-byte", "truncated", "other shapes"])
def test_a_corrupt_cached_classifier_is_retrained_with_a_warning(classifier, splits, tmp_path, monkeypatch, caplog,
                                                                   damage):
    train, _ = splits
    path = tmp_path / f"{classifier.cache_id}.pt"
    torch.save(classifier.state_dict(), path)
    whole = path.read_bytes()
    if damage == "other shapes":
        torch.save({"body.0.weight": torch.zeros(2, 2)}, path)
    else:
        path.write_bytes(b"" if damage == "zero-byte" else whole[: len(whole) // 2])
    fitted = []
    monkeypatch.setattr(features, "_fit", lambda model, *args: fitted.append(model))  # no real training here
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.features"):
        digits_classifier(train.images, train.labels, cache_dir=str(tmp_path))
    assert len(fitted) == 1 and str(path) in caplog.text and "unusable" in caplog.text
    state = torch.load(path, weights_only=True)  # rewritten whole: the next run loads it without a warning
    assert set(state) == set(classifier.state_dict()) and [p.name for p in tmp_path.iterdir()] == [path.name]
