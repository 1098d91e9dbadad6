"""FID through clean-fid, offline: the "small" extractor, the reference-statistics cache, and the
Inception fallback. The network is blocked for every test here (socket level), so nothing can hang."""
from __future__ import annotations

import json
import os
import socket
import time

import cleanfid
import cleanfid.fid as cfid
import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.datasets import load_digits

from diffusion_lab.evaluation import fid
from diffusion_lab.evaluation.features import SmallFeatureExtractor
from diffusion_lab.evaluation.fid import FIDEvaluator, FIDResult

SMALL = SmallFeatureExtractor.label


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network (any download fails at once), fresh warn-once memory, torch.hub kept in tmp_path."""

    def no_network(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(fid, "_warned", set())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP spin-waiting on a busy 2-core box (2-3x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """sklearn's 1797 8x8 digits in [-1, 1], [N, 1, 8, 8], in a fixed random order."""
    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]


def small_evaluator(cache_dir, **kwargs) -> FIDEvaluator:
    kwargs = {"feature_extractor": "small", "batch_size": 100, "device": "cpu", "progress": False, "download": False, **kwargs}
    return FIDEvaluator(cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)


def reader(images: torch.Tensor, calls: list = None):
    """generate_fn serving `images` in order; records the requested batch sizes."""
    pos = 0

    def generate(b: int) -> torch.Tensor:
        nonlocal pos
        if calls is not None:
            calls.append(b)
        pos += b
        return images[pos - b : pos]

    return generate


def noise_source(channels: int = 1, size: int = 8, seed: int = 1):
    """generate_fn(b) of Gaussian noise images clamped to [-1, 1] (fresh noise on every call)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda b: torch.randn(b, channels, size, size, generator=gen).clamp(-1, 1)


def noise(n: int, channels: int = 1, size: int = 8, seed: int = 1) -> torch.Tensor:
    return noise_source(channels, size, seed)(n)


def reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent FID: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via symmetric eigh."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_self_disjoint_and_noise_fid(digits, tmp_path):
    a, b = digits[:200], digits[200:400]
    ev = small_evaluator(tmp_path, batch_size=90)
    ev.set_reference("digits-a", a)
    assert ev.reference == "digits-a train (200 images)"

    calls = []
    same = ev.compute(reader(a, calls), 200)
    assert calls == [67, 67, 66]  # at most batch_size (90) per call, evened out, summing to num_samples
    disjoint = ev.compute(reader(b), 200)
    noisy = ev.compute(noise_source(), 200)
    print(f"\nself {same.value:.3e}  disjoint {disjoint.value:.4f}  noise {noisy.value:.4f}")

    # Same images in the same order -> identical features, mu and sigma: the FID is 0 up to the
    # rounding error of scipy's sqrtm (~1e-14 here), far below any real difference.
    assert abs(same.value) < 1e-6 * noisy.value
    # A disjoint sample of the same distribution only differs by sampling error.
    assert disjoint.value < 0.05 * noisy.value
    assert noisy.value > 0.5
    assert isinstance(noisy, FIDResult)
    assert noisy.label() == f"FID[clean, {SMALL}, 200 samples vs digits-a train (200 images)]"
    assert noisy.extractor == SMALL and noisy.num_samples == 200 and noisy.mode == "clean"
    assert "random net" in SMALL  # the last resort says so in every label


def test_clean_fid_code_path_and_frechet_cross_check(digits, tmp_path, monkeypatch):
    called = {"get_model_features": 0, "build_resizer": 0, "frechet_distance": 0}
    feats = []
    for name in called:
        original = getattr(cfid, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            called[_name] += 1
            out = _original(*args, **kwargs)
            if _name == "get_model_features":
                feats.append(out)
            return out

        monkeypatch.setattr(cfid, name, spy)

    ev = small_evaluator(tmp_path)
    seen_shapes = []
    extractor = ev.extractor
    ev.extractor = lambda x: (seen_shapes.append(tuple(x.shape)), extractor(x))[1]

    a, b = digits[:150], digits[150:300]
    result = ev.compare(a, b, reference_name="digits b")
    assert called == {"get_model_features": 2, "build_resizer": 2, "frechet_distance": 1}
    assert set(seen_shapes) == {(75, 3, 299, 299)}  # clean-fid's clean resize ran before the extractor
    assert result.reference == "digits b (150 images)"

    assert [f.shape for f in feats] == [(150, 128), (150, 128)]
    expected = reference_fid(*feats)
    assert result.value == pytest.approx(expected, rel=1e-6)

    # clean-fid's frechet_distance on a small explicit case
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=4), rng.normal(size=4)
    g1, g2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    s1, s2 = g1 @ g1.T + np.eye(4), g2 @ g2.T + np.eye(4)
    independent = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert cfid.frechet_distance(m1, s1, m2, s2) == pytest.approx(independent, rel=1e-9)


def test_reference_stats_cached_and_reused(digits, tmp_path, monkeypatch, caplog):
    ref = digits[:120]
    ev = small_evaluator(tmp_path, max_ref_images=100)
    ev.set_reference("digits", ref)
    path = fid.stats_path(str(tmp_path), "digits_train", 8, "clean", "small-v1", 100, fid.fingerprint(ref[:100]))
    assert os.path.basename(path).startswith("digits_train_8px_clean_small-v1_n100_")
    assert ev.reference_source == "computed" and os.path.exists(path)
    mtime = os.path.getmtime(path)

    def no_features(*args, **kwargs):
        raise AssertionError("reference features recomputed despite the cache")

    monkeypatch.setattr(cfid, "get_model_features", no_features)
    ev2 = small_evaluator(tmp_path, max_ref_images=100)
    with caplog.at_level("INFO", logger="diffusion_lab.evaluation.fid"):
        ev2.set_reference("digits", ref)
    assert ev2.reference_source == "cache" and "loaded from cache" in caplog.text
    assert os.path.getmtime(path) == mtime
    np.testing.assert_array_equal(ev2.ref_sigma, ev.ref_sigma)
    assert ev2.reference == "digits train (100 images)"

    # other images under the same name and count do not hit that cache entry
    monkeypatch.undo()
    ev3 = small_evaluator(tmp_path, max_ref_images=100)
    ev3.set_reference("digits", digits[120:240])
    assert ev3.reference_source == "computed" and len(os.listdir(tmp_path)) == 2


def damage(path, how):
    """Break a cache file the way a crash, a full disk or a hand edit would."""
    whole = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"zero-byte": b"", "truncated": whole[: len(whole) // 2], "text": b"not an npz"}[how])


@pytest.mark.parametrize("how", ["zero-byte", "truncated", "text"])
def test_a_corrupt_statistics_file_is_rebuilt_with_a_warning(digits, tmp_path, caplog, how):
    ref = digits[:100]
    small_evaluator(tmp_path).set_reference("digits", ref)
    path = fid.stats_path(str(tmp_path), "digits_train", 8, "clean", "small-v1", 100, fid.fingerprint(ref))
    good = np.load(path)["sigma"]
    damage(path, how)
    ev = small_evaluator(tmp_path)
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        ev.set_reference("digits", ref)
    assert ev.reference_source == "computed" and path in caplog.text and "unusable" in caplog.text
    np.testing.assert_array_equal(ev.ref_sigma, good)
    again = small_evaluator(tmp_path)
    again.set_reference("digits", ref)  # rewritten: the next run reads it from the cache
    assert again.reference_source == "cache" and sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


@pytest.mark.parametrize("planted", ["", "{\"floor\": -2.0}", "{\"floor\": NaN}", "{\"floor\": \"3\"}", "[1]"])
def test_a_planted_or_broken_noise_floor_is_recomputed(digits, tmp_path, caplog, planted):
    train, test = digits[:300], digits[300:500]
    ev = small_evaluator(tmp_path, num_samples=100)
    ev.set_reference("digits", test, split="test")
    floor = ev.set_floor(train)
    (path,) = [os.path.join(tmp_path, p) for p in os.listdir(tmp_path) if p.startswith("floor_")]
    with open(path, "w") as f:
        f.write(planted)
    again = small_evaluator(tmp_path, num_samples=100)
    again.set_reference("digits", test, split="test")
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        assert again.set_floor(train) == floor and floor > 0
    assert path in caplog.text and "unusable" in caplog.text
    with open(path) as f:
        assert json.load(f)["floor"] == floor  # rewritten: the next run reads the true floor


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFUSION_LAB_CACHE", str(tmp_path))
    assert fid.default_cache_dir() == os.path.join(str(tmp_path), "fid_stats")
    assert small_evaluator(None).cache_dir == os.path.join(str(tmp_path), "fid_stats")


def test_inception_missing_falls_back_to_small_once(tmp_path, monkeypatch, caplog):
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    monkeypatch.setattr(fid, "inception_weights", lambda mode: (str(missing), "https://example.invalid/inception.pt"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("tried to build Inception although its weights are missing and downloads are off")

    monkeypatch.setattr(fid, "build_feature_extractor", must_not_build)
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        ev = FIDEvaluator(feature_extractor="inception", fallback="small", download=False, device="cpu", cache_dir=str(tmp_path))
        ev2 = FIDEvaluator(feature_extractor="inception", fallback="small", download=False, device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 30  # no hang; generous for a loaded 2-core CI machine
    assert ev.enabled and ev.extractor_name == ev2.extractor_name == "small"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1  # once, not per evaluator
    assert str(missing) in warnings[0] and "https://example.invalid/inception.pt" in warnings[0]
    assert "NOT Inception FIDs" in warnings[0]


@pytest.mark.parametrize("mode", ["clean", "legacy_pytorch"])
def test_inception_download_fails_fast_offline(mode, tmp_path, caplog):
    """The real clean-fid download code runs and fails at once (no network); nothing partial is left."""
    path, url = fid.inception_weights(mode)
    if os.path.exists(path):
        pytest.skip(f"clean-fid's Inception weights are installed at {path}")
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        ev = FIDEvaluator(mode=mode, feature_extractor="inception", download=True, download_timeout=5, device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 60  # bounded by download_timeout, not the OS default; loaded-CI margin
    assert ev.extractor_name == "small"
    assert path in caplog.text and url in caplog.text
    assert not os.path.exists(path)


def test_fallback_none_disables_fid(tmp_path, monkeypatch, caplog, digits):
    missing = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setattr(fid, "inception_weights", lambda mode: (str(missing), "https://example.invalid/x.pt"))
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        ev = FIDEvaluator(feature_extractor="inception", fallback="none", download=False, device="cpu", cache_dir=str(tmp_path))
    assert not ev.enabled and ev.extractor_name is None
    assert "FID is disabled (fallback: none)" in caplog.text and str(missing) in ev.disabled_reason
    ev.set_reference("digits", digits)  # no-op
    assert ev.compute(noise_source(), 10) is None and ev.compare(digits, digits) is None
    assert not any(p.suffix == ".npz" for p in tmp_path.iterdir())


def test_cifar10_precomputed_stats_or_custom_fallback(tmp_path, monkeypatch, caplog):
    """cifar10/32px with Inception tries clean-fid's precomputed train stats, else custom stats.

    Inception itself is stood in for by the small net; clean-fid's stats folder is redirected to tmp_path.
    """
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"")
    monkeypatch.setattr(fid, "inception_weights", lambda mode: (str(weights), "https://example.invalid/x.pt"))
    monkeypatch.setattr(fid, "build_feature_extractor", lambda mode, device, use_dataparallel: fid.SmallFeatureExtractor())
    monkeypatch.setattr(cleanfid, "__file__", str(tmp_path / "cleanfid" / "__init__.py"))
    images = noise(40, channels=3, size=32)
    kwargs = {"feature_extractor": "inception", "batch_size": 20, "device": "cpu", "progress": False, "cache_dir": str(tmp_path / "cache")}

    stats_file, url = fid.precomputed_stats("cifar10", 32, "clean", "train")
    assert stats_file == str(tmp_path / "cleanfid" / "stats" / "cifar10_clean_train_32.npz")
    assert url == "https://www.cs.cmu.edu/~clean-fid/stats/cifar10_clean_train_32.npz"

    ev = FIDEvaluator(download=True, **kwargs)  # download attempted, fails (offline)
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        ev.set_reference("cifar10", images)
    assert ev.extractor_name == "inception" and ev.reference == "cifar10 train (40 images)"
    assert url in caplog.text and not os.path.exists(stats_file)

    os.makedirs(os.path.dirname(stats_file), exist_ok=True)
    np.savez(stats_file, mu=np.zeros(128), sigma=np.eye(128))  # as if downloaded
    ev = FIDEvaluator(download=False, **kwargs)
    ev.set_reference("cifar10", images)
    assert ev.reference_source == "precomputed" and ev.reference == "clean-fid cifar10 train"
    np.testing.assert_array_equal(ev.ref_sigma, np.eye(128))
    result = ev.compute(noise_source(channels=3, size=32), 30)
    assert result.label() == "FID[clean, inception, 30 samples vs clean-fid cifar10 train]"
    kid_file, kid_url = fid.precomputed_stats("cifar10", 32, "clean", "train", metric="KID")
    assert kid_file.endswith("cifar10_clean_train_32_kid.npz") and kid_url.endswith("cifar10_clean_train_32_kid.npz")
    assert (result.kid, result.precision, result.recall) == (None, None, None) and "KID" not in str(result)
    assert f"KID features are unavailable (downloads are off); KID and precision/recall are unavailable (None)" \
           f" against them. To use them, download {kid_url} to {kid_file}." in caplog.text

    ref_feats = ev.features(noise(40, channels=3, size=32, seed=5))
    np.savez(kid_file, feats=ref_feats)  # clean-fid's reference features for KID, as if downloaded
    ev = FIDEvaluator(download=False, **kwargs)
    ev.set_reference("cifar10", images)
    fake = ev.features(noise(30, channels=3, size=32))
    result = ev.score_features(fake)
    assert result.kid == pytest.approx(fid.set_metrics.set_metrics(ref_feats, fake)["kid"], rel=1e-12)


def test_one_and_three_channels_and_datasets(digits, tmp_path):
    ev = small_evaluator(tmp_path, batch_size=48)
    gray = digits[:48]
    # grayscale is repeated to 3 channels: the same images given as RGB have the same features
    np.testing.assert_allclose(ev.features(gray), ev.features(gray.repeat(1, 3, 1, 1)), rtol=0, atol=0)
    color = ev.features(noise(48, channels=3, seed=2))
    assert color.shape == (48, 128) and np.isfinite(color).all()

    # a Dataset of (image, label) items and an iterable of batches give the tensor's statistics
    dataset = torch.utils.data.TensorDataset(gray, torch.zeros(len(gray)))
    ev.set_reference("digits", dataset)
    from_dataset = ev.ref_mu
    assert abs(ev.compute(reader(gray), 48).value) < 1e-6  # 48 < 128 dims: singular sigma, sqrtm less exact
    ev.set_reference("digits-batches", [gray[:20], gray[20:]])
    np.testing.assert_array_equal(ev.ref_mu, from_dataset)

    with pytest.raises(ValueError, match="1 or 3"):
        ev.features(torch.zeros(4, 2, 8, 8))


@pytest.mark.parametrize("mode", ["legacy_pytorch", "legacy_tensorflow"])
def test_legacy_modes(mode, digits, tmp_path):
    ev = small_evaluator(tmp_path, mode=mode, batch_size=50)
    ev.set_reference("digits", digits[:50])
    result = ev.compute(noise_source(), 50)
    assert result.value > 0.1 and result.mode == mode


def test_floor_is_the_fid_of_real_training_images_and_is_cached(digits, tmp_path, monkeypatch):
    train, test = digits[:600], digits[600:900]
    ev = small_evaluator(tmp_path, num_samples=200)
    ev.set_reference("digits", test, split="test")
    floor = ev.set_floor(train)
    assert ev.floor_n == 200 and floor == ev.floor
    order = torch.randperm(600, generator=torch.Generator().manual_seed(fid.FLOOR_SEED))[:200]
    assert floor == pytest.approx(reference_fid(ev.features(train[order]), ev.features(test)), rel=1e-6)
    real = ev.features(test)
    assert ev.floor_metrics == fid.set_metrics.set_metrics(real, ev.features(train[order]))
    result = ev.compute(noise_source(), 200)
    assert (result.floor, result.floor_n) == (floor, 200) and result.value > 20 * floor
    assert str(result).startswith(f"FID {result.value:.4f} (floor {floor:.4f}, n=200, vs digits test (300 images))")
    beside = fid.set_metrics.set_metrics(real, ev.features(noise(200)))
    assert {k: getattr(result, k) for k in beside} == pytest.approx(beside, rel=1e-9)
    assert (result.kid_floor, result.precision_floor, result.recall_floor) == tuple(
        ev.floor_metrics[k] for k in ("kid", "precision", "recall"))
    assert result.kid > result.kid_floor + 10 * result.kid_std and result.precision < ev.floor_metrics["precision"]
    assert f"KID {result.kid:.4g} +- {result.kid_std:.2g} (floor {result.kid_floor:.2g}), P/R " in str(result)
    assert result.metrics().keys() >= {"fid", "fid_floor", "kid", "kid_std", "precision", "recall", "kid_floor",
                                       "precision_floor", "recall_floor"}
    floor_metrics = dict(ev.floor_metrics)
    assert ev.set_floor(train[:150]) != floor and ev.floor_n == 150  # fewer images than asked: all of them

    monkeypatch.setattr(cfid, "get_model_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    cached = small_evaluator(tmp_path, num_samples=200)
    cached.set_reference("digits", test, split="test")  # statistics, features and floors all come from the cache
    assert cached.reference_source == "cache" and cached.set_floor(train) == floor
    np.testing.assert_array_equal(cached.ref_feats, real)
    assert cached.floor_metrics == floor_metrics


def test_caches_of_an_older_version_without_features_or_kid_floors_are_rebuilt(digits, tmp_path, caplog):
    train, test = digits[:300], digits[300:500]
    ev = small_evaluator(tmp_path, num_samples=100)
    ev.set_reference("digits", test, split="test")
    ev.set_floor(train)
    stats, floor_file = (os.path.join(tmp_path, p) for p in sorted(os.listdir(tmp_path)) if p.endswith((".npz", ".json")))
    np.savez(stats, mu=ev.ref_mu, sigma=ev.ref_sigma)  # as written before the features were kept
    with open(floor_file, "w") as f:
        json.dump({"floor": ev.floor}, f)
    again = small_evaluator(tmp_path, num_samples=100)
    with caplog.at_level("INFO", logger="diffusion_lab.evaluation.fid"):
        again.set_reference("digits", test, split="test")
        again.set_floor(train)
    assert again.reference_source == "computed" and "holds no reference features" in caplog.text
    assert f"{floor_file} holds no KID or precision/recall floors (written by an older version)" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    np.testing.assert_array_equal(again.ref_feats, ev.ref_feats)
    assert again.floor_metrics == ev.floor_metrics and np.load(stats)["feats"].shape == (200, ev.ref_mu.shape[0])
    saved = json.load(open(floor_file))
    assert saved["kid"] == ev.floor_metrics["kid"]
    saved["recall"] = float("nan")  # present but broken: warned as unusable
    with open(floor_file, "w") as f:
        json.dump(saved, f)
    caplog.clear()
    with caplog.at_level("WARNING", logger="diffusion_lab.evaluation.fid"):
        assert again.set_floor(train) == ev.floor and again.floor_metrics == ev.floor_metrics
    assert floor_file in caplog.text and "no finite kid, kid_std, precision, recall floors" in caplog.text


# ---------------------------------------------------------------------------------------------
# streamed FID during training (FIDTracker): batch by batch, bounded memory, stops between batches


def tracker_and_sampler(extractor: str = "small", num_samples: int = 100):
    """An FIDTracker on the digits train split (3 uneven batches of at most 40) and a deterministic sampler."""
    from omegaconf import OmegaConf

    from diffusion_lab.data.datasets import digits as digits_data
    from diffusion_lab.evaluation.tracker import FIDTracker

    train = digits_data(split="train")
    cfg = OmegaConf.create({"every": 1, "num_samples": num_samples, "batch_size": 40, "reference": "train",
                            "mode": "clean", "feature_extractor": extractor, "fallback": "small"})

    def sample(x_T: torch.Tensor, seed: int) -> torch.Tensor:
        return torch.tanh(x_T + 0.3 * torch.randn(x_T.shape, generator=torch.Generator().manual_seed(seed)))

    return FIDTracker(cfg, lambda split: train, "cpu", seed=3), sample


def test_streamed_fid_equals_fid_of_all_features_at_once():
    from diffusion_lab.evaluation.tracker import _SingleProcess

    tracker, sample = tracker_and_sampler("digits")
    streamed = tracker.evaluate(sample)
    ev = tracker.evaluator
    images = torch.cat([sample(x_T, tracker.seed + k) for k, x_T in tracker._batches(_SingleProcess())])
    at_once = ev.score_features(ev.features(images))
    assert streamed.num_samples == at_once.num_samples == 100 and streamed.label() == at_once.label()
    assert streamed.value == pytest.approx(at_once.value, rel=1e-6)
    for key in ("kid", "kid_std", "precision", "recall"):  # the kept features are those of all at once
        assert getattr(streamed, key) == pytest.approx(getattr(at_once, key), rel=1e-6, abs=1e-9), key
    assert streamed.scores.keys() == at_once.scores.keys() == {"label_entropy", "class_entropy", "is_like"}
    for name, value in at_once.scores.items():
        assert streamed.scores[name] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_running_moments_and_class_sums_equal_those_of_all_at_once():
    from diffusion_lab.evaluation.features import ClassSums, classifier_score
    from diffusion_lab.evaluation.moments import Moments

    gen = torch.Generator().manual_seed(0)
    feats = (torch.randn(101, 16, generator=gen) * 3 + 5).numpy()
    parts = np.split(feats, [1, 40, 90])  # a part of one feature too
    moments = Moments()
    for part in parts:
        moments = moments.merge(Moments.of(part))
    assert moments.n == 101
    np.testing.assert_allclose(moments.mean, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.covariance(), np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    logits = torch.randn(101, 10, generator=gen) * 4
    sums = ClassSums.of(logits[:7]) + ClassSums.of(logits[7:])
    assert sums.scores() == pytest.approx(classifier_score(logits), rel=1e-12)


def test_streamed_fid_holds_one_batch_of_images_at_a_time():
    import gc
    import weakref

    tracker, sample = tracker_and_sampler()
    made, alive_before = [], []

    def recording(x_T: torch.Tensor, seed: int) -> torch.Tensor:
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in made))  # earlier batches still held by the tracker
        images = sample(x_T, seed)
        made.append(weakref.ref(images))
        return images

    assert tracker.evaluate(recording).num_samples == 100
    assert alive_before == [0, 0, 0]


def test_streamed_fid_stops_between_batches_and_returns_none():
    tracker, sample = tracker_and_sampler()
    seeds = []

    def sample_then_signal(x_T: torch.Tensor, seed: int) -> torch.Tensor:
        seeds.append(seed)  # the stop flag is set while the first batch is made
        return sample(x_T, seed)

    assert tracker.evaluate(sample_then_signal, stop=lambda: bool(seeds)) is None
    assert seeds == [3] and tracker.last is None and tracker.history == []


def test_tracker_summary_carries_kid_and_precision_recall_through_a_resume():
    tracker, sample = tracker_and_sampler("digits")
    result = tracker.evaluate(sample)
    tracker.record(1, result)
    summary = tracker.summary()
    assert summary["final_kid"] == result.kid and summary["final_recall"] == result.recall
    assert summary["kid_floor"] == tracker.evaluator.floor_metrics["kid"] == result.kid_floor
    assert 0 < summary["precision_floor"] <= 1 and 0 < summary["recall_floor"] <= 1
    resumed, _ = tracker_and_sampler("digits")
    resumed.load_state_dict(tracker.state_dict())  # a run resumed from this checkpoint, before its next FID
    assert resumed.summary() == summary


def test_the_reference_radii_of_precision_recall_are_computed_once_per_reference(digits, tmp_path, monkeypatch):
    """A large reference (CIFAR-10's 50k) makes its own k-NN radii the costly part: computed once, reused, and
    recomputed for a new reference; the scores are those computed from scratch."""
    calls, knn_radii = [], fid.knn_radii
    monkeypatch.setattr(fid, "knn_radii", lambda feats, *a, **k: calls.append(len(feats)) or knn_radii(feats, *a, **k))
    ev = small_evaluator(tmp_path, num_samples=100)
    ev.set_reference("digits", digits[600:800], split="test")
    images = noise(100)
    results = [ev.score(images), ev.score(noise(100, seed=2))]
    assert calls == [200]
    scratch = fid.set_metrics.set_metrics(ev.ref_feats, ev.features(images))
    assert (results[0].precision, results[0].recall) == (scratch["precision"], scratch["recall"])
    ev.set_reference("digits", digits[800:900], split="train")
    ev.score(images)
    assert calls == [200, 100]
