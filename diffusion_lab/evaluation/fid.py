"""FID through clean-fid's own code path (Parmar et al. 2022, https://github.com/GaParmar/clean-fid).

Images in [-1, 1] are quantised to integer values in [0, 255] (like saved PNGs; grayscale is repeated
to 3 channels) and handed to ``cleanfid.fid.get_model_features`` -- clean-fid's generator path, which
resizes each image with the ``mode``'s resizer (``clean``: PIL bicubic to 299x299 in float) and runs
the feature extractor batch by batch. Statistics are ``np.mean``/``np.cov`` over the features (as in
clean-fid) and the score is ``cleanfid.fid.frechet_distance``. FID during training streams instead
(``batch_stats`` per batch, merged in ``moments.py``, then ``score_stats``): the same value to float precision,
holding one batch of images at a time (and the features, for KID and precision/recall).

Beside FID, on the same features: KID (``kid.py``) and improved precision/recall (``precision_recall.py``),
which need the reference's features themselves, so these are cached with its statistics.

Feature extractors (``features.py`` holds the download-free ones):
  inception  clean-fid's Inception (``build_feature_extractor``); its weights are downloaded on first use.
  digits     a small classifier trained on the digits train split; images keep their native 8x8.
  small      a fixed-seed, randomly initialised conv net: the last resort, and every label says so.
  auto       digits for the digits data, else inception.

Reference statistics: clean-fid's precomputed ones where they exist (cifar10 at 32px, train and test
splits, inception only; KID's reference features from clean-fid's ``_kid`` file, else KID and precision/recall
are None); otherwise computed from the split's images and cached (mu, sigma, feats) as an .npz in ``cache_dir``.
Beside every FID stands its noise floor: the FID of real training images against the same reference
at the same sample count (``set_floor``), which no generator can be expected to beat.

Offline: clean-fid downloads with ``urllib`` and no timeout. Files already in place are used without
any network access; a missing file is downloaded only if ``download`` is true, under a socket
timeout, and a failure is reported once, naming the file and where to put it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import re
import socket
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple, Union

import cleanfid
import numpy as np
import torch
import torch.nn as nn
from cleanfid import fid as cfid
from cleanfid.downloads_helper import inception_url as INCEPTION_TORCHSCRIPT_URL
from cleanfid.features import build_feature_extractor, get_reference_statistics
from cleanfid.inception_pytorch import FID_WEIGHTS_URL as INCEPTION_PYTORCH_URL

from ..files import first_line, write_atomic, write_json
from . import set_metrics
from .precision_recall import knn_radii
from .features import ClassSums, SmallFeatureExtractor, cache_root, classifier_score, digits_classifier
from .moments import Moments, SampleStats

log = logging.getLogger(__name__)

MODES = ("clean", "legacy_pytorch", "legacy_tensorflow")
EXTRACTORS = ("auto", "inception", "digits", "small")
FALLBACKS = ("small", "none")
# clean-fid's precomputed reference statistics that we use: (dataset name, resolution) -> splits
PRECOMPUTED = {("cifar10", 32): ("train", "test")}
FLOOR_SEED = 0  # which training images make up the floor
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"

Images = Union[torch.Tensor, torch.utils.data.Dataset, Iterable]

_warned: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Bound clean-fid's urllib downloads (it passes no timeout of its own)."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


# ---------------------------------------------------------------------------------------------
# where clean-fid keeps its files
# ---------------------------------------------------------------------------------------------


def inception_weights(mode: str) -> Tuple[str, str]:
    """(local path, URL) of the Inception weights clean-fid loads for ``mode``.

    clean / legacy_tensorflow: the TorchScript model, which clean-fid keeps in /tmp ("./" on Windows).
    legacy_pytorch: pytorch-fid's weights, in torch.hub's checkpoint dir ($TORCH_HOME/hub/checkpoints).
    """
    if mode == "legacy_pytorch":
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(INCEPTION_PYTORCH_URL))
        return path, INCEPTION_PYTORCH_URL
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return os.path.join(folder, "inception-2015-12-05.pt"), INCEPTION_TORCHSCRIPT_URL


def precomputed_stats(name: str, res: int, mode: str, split: str, metric: str = "FID") -> Tuple[str, str]:
    """(local path, URL) of a clean-fid precomputed statistics file (same naming as clean-fid); metric "KID":
    the file of reference features clean-fid's KID uses.

    clean-fid keeps them in ``<cleanfid package dir>/stats``; it has no setting to move that folder.
    """
    fname = f"{name}_{mode}_{split}_{res}{'_kid' if metric == 'KID' else ''}.npz".lower()
    folder = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
    return os.path.join(folder, fname), f"{CLEANFID_STATS_URL}/{fname}"


def default_cache_dir() -> str:
    """$DIFFUSION_LAB_CACHE/fid_stats, else ~/.cache/diffusion_lab/fid_stats."""
    return os.path.join(cache_root(), "fid_stats")


def stats_path(cache_dir: str, name: str, res: int, mode: str, extractor_id: str, num_images: int, fingerprint: str) -> str:
    """Cache file of custom reference statistics, e.g. ``digits_8px_clean_small-v1_n1797_1a2b3c4d.npz``.

    fingerprint: see ``fingerprint()``; it keeps two different image sets of the same name and size apart.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    return os.path.join(cache_dir, f"{safe}_{res}px_{mode}_{extractor_id}_n{num_images}_{fingerprint}.npz")


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------


def to_cleanfid_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, C, H, W] (C = 1 or 3, any device) -> CPU float32 [B, 3, H, W] holding
    integers in [0, 255], i.e. what a saved uint8 image holds; the range clean-fid's generator path expects."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def _first(item):
    """The image of a dataset item that may be an (image, label, ...) tuple."""
    return item[0] if isinstance(item, (tuple, list)) else item


def _sized(images: Images, limit: Optional[int]) -> Union[torch.Tensor, torch.utils.data.Dataset]:
    """A tensor or map-style Dataset of at most ``limit`` images (other iterables are read into a CPU tensor)."""
    if not isinstance(images, (torch.Tensor, torch.utils.data.Dataset)):
        batches, count = [], 0
        for batch in images:
            batch = _first(batch).cpu()
            batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
            batches.append(batch)
            count += batch.shape[0]
            if limit is not None and count >= limit:
                break
        images = torch.cat(batches)
    if limit is not None and len(images) > limit:
        images = images[:limit] if isinstance(images, torch.Tensor) else torch.utils.data.Subset(images, range(limit))
    return images


def fingerprint(images: Union[torch.Tensor, torch.utils.data.Dataset], count: int = 16) -> str:
    """8 hex digits hashing the first ``count`` images as uint8: cheap, and part of the cache key so a
    changed dataset, preprocessing or order under the same name does not reuse stale statistics."""
    k = min(count, len(images))
    first = images[:k] if isinstance(images, torch.Tensor) else torch.stack([_first(images[i]) for i in range(k)])
    data = to_cleanfid_range(first).to(torch.uint8).numpy()
    return hashlib.sha1(str(data.shape).encode() + data.tobytes()).hexdigest()[:8]


def _batch_reader(images: Union[torch.Tensor, torch.utils.data.Dataset], batch_size: int) -> Callable[[int], torch.Tensor]:
    """next_batch(b): the next batch of images, in order (b = batch_size except for the last batch)."""
    if isinstance(images, torch.Tensor):
        batches: Iterator = iter(images.split(batch_size))
    else:
        loader = torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False)
        batches = (_first(b) for b in loader)
    return lambda b: next(batches)


# ---------------------------------------------------------------------------------------------
# the evaluator
# ---------------------------------------------------------------------------------------------


@dataclass
class FIDResult:
    """One FID value, what it was measured with (``label()`` names all of it) and its noise floor: the FID of
    ``floor_n`` real training images against the same reference. ``scores``: the classifier score, if any.
    KID (mean and std over subsets) and improved precision/recall on the same features, each with its floor
    from the same real images; None where the reference features are unavailable (``set_metrics.py``)."""

    value: float
    mode: str
    extractor: str
    num_samples: int
    reference: str
    floor: Optional[float] = None
    floor_n: Optional[int] = None
    scores: Dict[str, float] = field(default_factory=dict)
    kid: Optional[float] = None
    kid_std: Optional[float] = None
    precision: Optional[float] = None
    recall: Optional[float] = None
    kid_floor: Optional[float] = None
    precision_floor: Optional[float] = None
    recall_floor: Optional[float] = None

    def label(self) -> str:
        return f"FID[{self.mode}, {self.extractor}, {self.num_samples} samples vs {self.reference}]"

    def metrics(self) -> Dict[str, Optional[float]]:
        """What a log point, a row or a summary records: fid, fid_floor, kid, kid_std, precision, recall, their
        floors (kid_floor, ...) and the classifier scores."""
        beside = {k: getattr(self, k) for k in set_metrics.KEYS}
        floors = {f"{k}_floor": getattr(self, f"{k}_floor") for k in set_metrics.FLOOR_KEYS}
        return {"fid": self.value, "fid_floor": self.floor, **beside, **floors, **self.scores}

    def __str__(self) -> str:
        floor = f"floor {self.floor:.4f}, n={self.floor_n}, " if self.floor is not None else ""
        scores = "".join(f", {k} {v:.3f}" for k, v in self.scores.items())
        beside = set_metrics.describe(vars(self), {k: getattr(self, f"{k}_floor") for k in set_metrics.FLOOR_KEYS})
        beside = f", {beside}" if beside else ""
        return f"FID {self.value:.4f} ({floor}vs {self.reference}) {self.label()}{scores}{beside}"


class FIDEvaluator:
    """FID of generated samples against reference statistics, through clean-fid.

    Use: ``ev = FIDEvaluator(...)``; ``ev.set_reference("digits", test_images, split="test")``;
    ``ev.set_floor(train_images)``; ``ev.compute(generate_fn)``. When the Inception weights are unavailable
    and ``fallback="none"``, ``ev.enabled`` is False and ``set_reference``/``compute`` do nothing.

    Args:
        mode: clean-fid mode: "clean", "legacy_pytorch" or "legacy_tensorflow".
        feature_extractor: "inception" (clean-fid's), "digits" (classifier trained on the default digits
            train split), "small" (random net), or an extractor module from ``features.py``.
        fallback: what to do when Inception cannot be loaded: "small" or "none" (disable FID).
        num_samples: generated samples per FID by default.
        batch_size: images per generate_fn call / per feature-extractor batch.
        cache_dir: where reference statistics and floors are cached (default: default_cache_dir()).
        device: device of the feature extractor (default: cuda if available, else cpu).
        max_ref_images: use at most this many (the first) dataset images for custom statistics (None: all).
        download: allow downloading missing clean-fid files (Inception weights, precomputed statistics).
        download_timeout: socket timeout for those downloads (seconds per blocking network call).
        progress: show clean-fid's tqdm progress bar.
    """

    def __init__(
        self,
        mode: str = "clean",
        feature_extractor: Union[str, nn.Module] = "inception",
        fallback: str = "small",
        num_samples: int = 10_000,
        batch_size: int = 250,
        cache_dir: Optional[str] = None,
        device: Optional[Union[str, torch.device]] = None,
        max_ref_images: Optional[int] = None,
        download: bool = True,
        download_timeout: float = 60.0,
        progress: bool = True,
    ):
        named = feature_extractor if isinstance(feature_extractor, str) else "digits"
        for value, known, what in ((mode, MODES, "mode"), (named, EXTRACTORS[1:], "feature_extractor"), (fallback, FALLBACKS, "fallback")):
            if value not in known:
                raise ValueError(f"unknown FID {what} '{value}'; known: {', '.join(known)}")
        self.mode = mode
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.cache_dir = os.path.expanduser(cache_dir) if cache_dir else default_cache_dir()
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.max_ref_images = max_ref_images
        self.download = download
        self.download_timeout = download_timeout
        self.progress = progress
        self.extractor_name: Optional[str] = None  # "inception" / "digits" / "small"; None = FID disabled
        self.disabled_reason: Optional[str] = None
        self.extractor = self._build_extractor(feature_extractor, fallback)
        inception = self.extractor_name == "inception"
        # the cache key, the name every label carries, and clean-fid's custom_fn_resize (None: the mode's resizer)
        self.extractor_id = "inception" if inception else getattr(self.extractor, "cache_id", None)
        self.extractor_label = "inception" if inception else getattr(self.extractor, "label", None)
        self.resize: Optional[Callable] = None if inception else getattr(self.extractor, "fn_resize", None)
        self.head: Optional[nn.Module] = getattr(self.extractor, "head", None)  # features -> class logits
        self.ref_mu: Optional[np.ndarray] = None
        self.ref_sigma: Optional[np.ndarray] = None
        self.ref_feats: Optional[np.ndarray] = None  # for KID and precision/recall; None: those are unavailable
        self.reference: Optional[str] = None  # e.g. "digits test (359 images)"
        self.reference_source: Optional[str] = None  # "precomputed", "cache" or "computed"
        self.floor: Optional[float] = None
        self.floor_n: Optional[int] = None
        self.floor_metrics: Dict[str, float] = {}  # set_metrics of the floor's real images: KID, P/R floors
        self._radii: Optional[np.ndarray] = None  # reference_radii(), and the features they are of
        self._radii_of: Optional[np.ndarray] = None

    def _build_extractor(self, choice: Union[str, nn.Module], fallback: str) -> Optional[Callable]:
        if isinstance(choice, nn.Module):
            self.extractor_name = "digits"
            return choice.to(self.device)
        if choice == "digits":
            from ..data.datasets import digits  # the default split's train images

            train = digits(split="train")
            self.extractor_name = "digits"
            return digits_classifier(train.images, train.labels).to(self.device)
        if choice == "inception":
            extractor, problem = self._build_inception()
            if extractor is not None:
                self.extractor_name = "inception"
                return extractor
            path, url = inception_weights(self.mode)
            msg = (f"FID: clean-fid's Inception weights could not be loaded ({problem}). "
                   f"clean-fid (mode '{self.mode}') needs the file {path}; download it from {url} and place it there. ")
            if fallback == "none":
                self.disabled_reason = msg + "FID is disabled (fallback: none)."
                _warn_once(self.disabled_reason)
                return None
            _warn_once(msg + "Using the 'small' random net instead: these FIDs are NOT Inception FIDs and are only "
                             "comparable with other 'small' FIDs.")
        self.extractor_name = "small"
        return SmallFeatureExtractor().to(self.device)

    @property
    def enabled(self) -> bool:
        return self.extractor is not None

    def reference_radii(self) -> Optional[np.ndarray]:
        """The reference features' k-NN radii of precision/recall, computed once per reference (the costly part
        for a large one: 50k x 50k distances for CIFAR-10's training set)."""
        if self.ref_feats is None:
            return None
        if self._radii_of is not self.ref_feats:
            self._radii, self._radii_of = knn_radii(self.ref_feats), self.ref_feats
        return self._radii

    def floors(self) -> Dict[str, Optional[float]]:
        """{kid_floor, precision_floor, recall_floor}: the scores beside FID of the floor's real images (None
        where unavailable)."""
        return {f"{k}_floor": self.floor_metrics.get(k) for k in set_metrics.FLOOR_KEYS}

    @property
    def resize_label(self) -> str:
        return self.mode if self.resize is None else "native size"

    def _build_inception(self):
        """(clean-fid's extractor, None), or (None, why not). Never downloads unless ``download``."""
        path, _ = inception_weights(self.mode)
        existed = os.path.exists(path)
        if not existed and not self.download:
            return None, f"{path} does not exist and downloads are off"
        try:
            with _socket_timeout(self.download_timeout):
                return build_feature_extractor(self.mode, self.device, use_dataparallel=False), None
        except Exception as e:  # no network, HTTP error, corrupt file, ...
            if not existed and os.path.exists(path):
                os.remove(path)  # a partial download would break every later run
            return None, f"{type(e).__name__}: {e}"

    # -- features and statistics -------------------------------------------------------------

    def _features(self, source: Union[Callable[[int], torch.Tensor], torch.Tensor, torch.utils.data.Dataset], n: int, desc: str) -> np.ndarray:
        """Features [n, D] of n images via clean-fid's get_model_features.

        source: generate_fn(b) -> [b, C, H, W] images, or a tensor / Dataset of images (read in order).
        """
        # clean-fid calls G(z) for ceil(n / bs) batches of exactly bs images and keeps the first n
        # features. Evening out bs (<= batch_size) keeps the padding of the last batch small.
        bs = self.even_batch_size(n)
        next_batch = _batch_reader(source, bs) if isinstance(source, (torch.Tensor, torch.utils.data.Dataset)) else source
        remaining = n

        def gen(z: torch.Tensor) -> torch.Tensor:
            nonlocal remaining
            b = min(bs, remaining)
            imgs = next_batch(b)
            if imgs.shape[0] != b:
                raise ValueError(f"asked for {b} images, got {imgs.shape[0]}")
            imgs = to_cleanfid_range(imgs)
            remaining -= b
            if b < bs:
                imgs = torch.cat([imgs, imgs.new_zeros(bs - b, *imgs.shape[1:])])
            return imgs

        return cfid.get_model_features(
            gen, self.extractor, mode=self.mode, z_dim=1, num_gen=n, batch_size=bs,
            device=self.device, desc=desc, verbose=self.progress, custom_fn_resize=self.resize,
        )

    def even_batch_size(self, n: int) -> int:
        """The batch size (<= batch_size) that splits n images into batches of nearly equal size."""
        return math.ceil(n / math.ceil(n / self.batch_size))

    def features(self, images: Images) -> np.ndarray:
        """Features [N, D] of [-1, 1] images (tensor [N, C, H, W], Dataset, or iterable of batches)."""
        images = _sized(images, None)
        return self._features(images, len(images), "FID features: ")

    @staticmethod
    def statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as clean-fid computes them."""
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)

    def set_reference(self, name: str, images: Optional[Images] = None, resolution: Optional[int] = None,
                      split: str = "train") -> None:
        """Load or compute the reference statistics of dataset ``name``'s ``split``.

        images: the split's [-1, 1] images without augmentation (tensor [N, C, H, W], map-style Dataset
        of images or (image, label) items, or an iterable of batches). Optional when clean-fid has
        precomputed statistics for (name, resolution, split) and they can be loaded.
        resolution: image side length; default: that of the first image.
        The cache key is (name, resolution, mode, extractor, number of images, fingerprint of the first images).
        """
        if not self.enabled:
            return
        if images is not None:
            images = _sized(images, self.max_ref_images)
            if resolution is None:
                first = images[0] if isinstance(images, torch.Tensor) else _first(images[0])
                resolution = int(first.shape[-1])
        if split in PRECOMPUTED.get((name, resolution), ()) and self.extractor_name == "inception":
            stats = self._load_precomputed(name, resolution, split, "FID", "computing custom statistics from the "
                                                                           "dataset instead")
            if stats is not None:
                self.ref_mu, self.ref_sigma = stats
                self.ref_feats = self._load_precomputed(name, resolution, split, "KID", "KID and precision/recall are "
                                                        "unavailable (None) against them")
                self.reference, self.reference_source = f"clean-fid {name} {split}", "precomputed"
                self._reference_key = f"{name}_{resolution}px_{self.mode}_{split}_precomputed"
                return
        if images is None:
            raise ValueError(f"no precomputed FID statistics for '{name}' {split} at {resolution}px: pass the images")
        n = len(images)
        path = stats_path(self.cache_dir, f"{name}_{split}", resolution, self.mode, self.extractor_id, n, fingerprint(images))
        self.reference, self._reference_key = f"{name} {split} ({n} images)", os.path.basename(path)
        cached = _cached_stats(path)
        if cached is not None:
            self.ref_mu, self.ref_sigma, self.ref_feats = cached
            self.reference_source = "cache"
            log.info("FID reference statistics loaded from cache: %s", path)
            return
        self.ref_feats = self._features(images, n, f"FID stats {name}: ")
        self.ref_mu, self.ref_sigma = self.statistics(self.ref_feats)
        self.reference_source = "computed"
        write_atomic(path, lambda f: np.savez(f, mu=self.ref_mu, sigma=self.ref_sigma, feats=self.ref_feats))
        log.info("FID reference statistics and features computed from %d images and cached: %s", n, path)

    def set_floor(self, train_images: Images, num_samples: Optional[int] = None) -> Optional[float]:
        """The noise floor: FID of ``num_samples`` real training images (a seeded random subset; all of
        them when there are fewer) against the reference. Cached beside the reference statistics."""
        if not self.enabled:
            return None
        if self.ref_mu is None:
            raise RuntimeError("FIDEvaluator.set_floor: call set_reference(...) first")
        train_images = _sized(train_images, None)
        n = min(num_samples or self.num_samples, len(train_images))
        key = f"{self._reference_key}|{self.extractor_id}|{fingerprint(train_images)}|{len(train_images)}|{n}|{FLOOR_SEED}"
        path = os.path.join(self.cache_dir, f"floor_{hashlib.sha1(key.encode()).hexdigest()[:12]}.json")
        self.floor, self.floor_metrics = _cached_floor(path, with_set_metrics=self.ref_feats is not None) or (None, {})
        if self.floor is None:
            order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(FLOOR_SEED))[:n].tolist()
            subset = torch.utils.data.Subset(train_images, order)
            feats = self._features(subset, n, "FID floor: ")
            self.floor = float(cfid.frechet_distance(*self.statistics(feats), self.ref_mu, self.ref_sigma))
            if _valid_floor(self.floor):
                self.floor_metrics = ({} if self.ref_feats is None else
                                      set_metrics.set_metrics(self.ref_feats, feats, self.reference_radii()))
                write_json(path, {"floor": self.floor, "n": n, "key": key, **self.floor_metrics})
            else:  # degenerate features: a floor that means nothing is neither cached nor shown
                log.warning("FID floor of %d training images is %r, not a finite positive number: not used", n, self.floor)
                self.floor = None
        self.floor_n = n if self.floor is not None else None
        return self.floor

    def _load_precomputed(self, name: str, res: int, split: str, metric: str, otherwise: str):
        """clean-fid's precomputed (mu, sigma) (metric "FID") or reference features (metric "KID"), or None
        with one warning line that ends saying what happens ``otherwise``."""
        path, url = precomputed_stats(name, res, self.mode, split, metric)
        existed = os.path.exists(path)
        if not existed and not self.download:
            problem = "downloads are off"
        else:
            try:
                with _socket_timeout(self.download_timeout):
                    return get_reference_statistics(name, res, mode=self.mode, split=split, metric=metric)
            except Exception as e:
                if not existed and os.path.exists(path):
                    os.remove(path)
                problem = f"{type(e).__name__}: {e}"
        what = "statistics" if metric == "FID" else "KID features"
        _warn_once(f"FID: clean-fid's precomputed {name} {split} {what} are unavailable ({problem}); "
                   f"{otherwise}. To use them, download {url} to {path}.")
        return None

    # -- scores --------------------------------------------------------------------------------

    def compute(self, generate_fn: Callable[[int], torch.Tensor], num_samples: Optional[int] = None) -> Optional[FIDResult]:
        """FID of ``num_samples`` images from generate_fn(b) -> [-1, 1] images [b, C, H, W] (any device)
        against the reference. Batches are moved to the CPU as they come. None when FID is disabled.

        Note: clean-fid draws a dummy z (torch.randn([b, 1]), global CPU RNG) per batch."""
        if not self.enabled:
            return None
        if self.ref_mu is None:
            raise RuntimeError("FIDEvaluator.compute: call set_reference(...) first")
        n = num_samples or self.num_samples
        if n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {n}")
        return self._against_reference(self._features(generate_fn, n, "FID samples: "))

    def score(self, images: Images) -> Optional[FIDResult]:
        """FID of a finished set of [-1, 1] images against the reference (None when FID is disabled)."""
        if not self.enabled:
            return None
        if self.ref_mu is None:
            raise RuntimeError("FIDEvaluator.score: call set_reference(...) first")
        return self._against_reference(self.features(images))

    def class_scores(self, feats: np.ndarray) -> Dict[str, float]:
        """The classifier score of features from an extractor with a classification ``head``, else {}."""
        if self.head is None:
            return {}
        with torch.no_grad():
            return classifier_score(self.head(torch.from_numpy(feats).float().to(self.device)).cpu())

    def score_features(self, feats: np.ndarray) -> Optional[FIDResult]:
        """FID of already extracted features [N, D] (e.g. gathered from several ranks) against the reference."""
        return self._against_reference(feats) if self.enabled else None

    def batch_stats(self, images: torch.Tensor) -> SampleStats:
        """The running statistics of one batch of [-1, 1] images: streamed FID adds them up (``SampleStats.merge``)
        and drops the images and features, so memory does not grow with the number of samples."""
        feats = self._features(images, len(images), "FID samples: ")
        classes = None
        if self.head is not None:
            with torch.no_grad():
                classes = ClassSums.of(self.head(torch.from_numpy(feats).float().to(self.device)).cpu())
        return SampleStats(Moments.of(feats), classes, feats)

    def score_stats(self, stats: SampleStats) -> FIDResult:
        """FID of streamed statistics against the reference: ``score_features`` of the same features, to float
        precision."""
        moments = stats.moments
        value = float(cfid.frechet_distance(moments.mean, moments.covariance(), self.ref_mu, self.ref_sigma))
        return self._result(value, moments.n, stats.features, stats.classes.scores() if stats.classes else {})

    def _against_reference(self, feats: np.ndarray) -> FIDResult:
        value = float(cfid.frechet_distance(*self.statistics(feats), self.ref_mu, self.ref_sigma))
        return self._result(value, len(feats), feats, self.class_scores(feats))

    def _result(self, value: float, n: int, feats: Optional[np.ndarray], scores: Dict[str, float],
                real: Optional[np.ndarray] = None, reference: Optional[str] = None) -> FIDResult:
        """The FIDResult of n generated features ``feats``: against the reference with its floors, or (given
        ``reference``, a name) against the ``real`` features without floors. KID and precision/recall are None
        where either feature set is missing."""
        real = self.ref_feats if reference is None else real
        radii = self.reference_radii() if reference is None else None
        beside = set_metrics.set_metrics(real, feats, radii) if real is not None and feats is not None else {}
        floors = {} if reference is not None else self.floors()
        floor = (self.floor, self.floor_n) if reference is None else (None, None)
        return FIDResult(value, self.resize_label, self.extractor_label, n, reference or self.reference, *floor,
                         scores, **beside, **floors)

    def compare(self, images: Images, reference_images: Images, reference_name: str = "images") -> Optional[FIDResult]:
        """FID between two image sets ([-1, 1]; tensors, Datasets or iterables of batches); nothing is cached."""
        if not self.enabled:
            return None
        feats = self.features(images)
        ref = self.features(reference_images)
        value = float(cfid.frechet_distance(*self.statistics(feats), *self.statistics(ref)))
        return self._result(value, len(feats), feats, self.class_scores(feats), ref,
                            f"{reference_name} ({len(ref)} images)")


def _bad_cache(path: str, why: str) -> None:
    log.warning("FID cache file %s is unusable (%s): recomputing it and writing it anew", path, why)


def _cached_stats(path: str) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(mu, sigma, feats) from a cache file; None when there is none or it is unusable (zero-byte, truncated, wrong
    shapes, non-finite values: warned, naming the file, and then rewritten by the caller). A file written before
    the features were kept is rebuilt too (logged, not warned)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            mu, sigma, feats = f["mu"], f["sigma"], f["feats"] if "feats" in f.files else None
    except Exception as error:  # EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError: all mean "rebuild"
        _bad_cache(path, first_line(error))
        return None
    if not all(np.issubdtype(a.dtype, np.floating) for a in (mu, sigma)) or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        _bad_cache(path, f"mu {mu.shape} and sigma {sigma.shape} are not a finite mean and covariance")
        return None
    if feats is None:
        log.info("FID cache file %s holds no reference features (written by an older version): recomputing it", path)
        return None
    if not np.issubdtype(feats.dtype, np.floating) or feats.ndim != 2 or feats.shape[1] != len(mu) or not np.isfinite(feats).all():
        _bad_cache(path, f"feats {feats.shape} are not finite features of dimension {len(mu)}")
        return None
    return mu, sigma, feats


def _valid_floor(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _cached_floor(path: str, with_set_metrics: bool) -> Optional[Tuple[float, Dict[str, float]]]:
    """(FID floor, set_metrics of the same images: {} unless ``with_set_metrics``) from a cache file; None when
    there is none or it is unusable (not JSON, not a finite positive FID, set metrics asked for and missing or
    not finite: warned, naming the file, and then recomputed)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
        value = saved["floor"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        _bad_cache(path, first_line(error))
        return None
    if not _valid_floor(value):
        _bad_cache(path, f"floor {value!r} is not a finite positive number")
        return None
    if with_set_metrics and not set_metrics.valid(saved):
        if not any(k in saved for k in set_metrics.KEYS):
            log.info("FID floor cache file %s holds no KID or precision/recall floors (written by an older "
                     "version): recomputing it", path)
        else:
            _bad_cache(path, f"it holds no finite {', '.join(set_metrics.KEYS)} floors")
        return None
    return float(value), {k: float(saved[k]) for k in set_metrics.KEYS} if with_set_metrics else {}
