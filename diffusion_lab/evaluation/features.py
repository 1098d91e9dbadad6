"""Download-free feature extractors for FID, in clean-fid's input convention ([B, 3, H, W] floats in [0, 255]).

digits  A small CNN trained on the digits *train* split (seeded, a few seconds on a CPU, cached). Its
        penultimate layer gives FID features; its softmax gives a classifier score. It sees images at their
        native 8x8 (``fn_resize`` keeps clean-fid from upsampling them to 299x299).
small   A fixed-seed, randomly initialised conv net: the last resort for data without Inception weights.
        Its FIDs have no scale of their own and are only comparable with other "small" FIDs.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..files import first_line, write_atomic

log = logging.getLogger(__name__)


def cache_root() -> str:
    """$DIFFUSION_LAB_CACHE, else ~/.cache/diffusion_lab: reference statistics, floors, trained extractors."""
    return os.environ.get("DIFFUSION_LAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "diffusion_lab")


def _to_unit(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 255] (grayscale repeated) -> [B, 1 or 3, size, size] in [-1, 1], area-averaged."""
    x = x.float() / 127.5 - 1.0
    return F.adaptive_avg_pool2d(x, size) if x.shape[-1] != size else x


class SmallFeatureExtractor(nn.Module):
    """A fixed-seed, randomly initialised conv net: [B, 3, H, W] in [0, 255] -> [B, 128] features.

    Deterministic and download-free, but NOT a trained network: ``label`` says so wherever its FID is shown.
    ``VERSION`` is part of the cache key; bump it when changing anything here.
    """

    VERSION = 1
    SEED, WIDTH, POOL = 0, 16, 32
    label = "small random net (no scale; compare only with itself)"
    fn_resize = None  # clean-fid's resizer for the mode

    def __init__(self):
        super().__init__()
        w = self.WIDTH
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, w, 3, padding=1), nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)]
        )
        gen = torch.Generator().manual_seed(self.SEED)  # leaves the global RNG alone
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    @property
    def cache_id(self) -> str:
        return f"small-v{self.VERSION}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _to_unit(x, self.POOL)  # 299x299 (clean) -> 32x32
        for conv in self.convs:
            x = F.relu(conv(x))
        return F.adaptive_avg_pool2d(x, 2).flatten(1)  # 2*WIDTH channels x 2x2


def _keep_native(image: np.ndarray) -> np.ndarray:
    """clean-fid ``custom_fn_resize``: leave the image at its own size (the classifier pools to 8x8 itself)."""
    return image


class DigitsClassifier(nn.Module):
    """8x8 digit classifier. ``forward``: [B, 3, H, W] in [0, 255] -> penultimate features [B, 128] (before
    their ReLU, so no feature is constantly zero); ``head`` maps features to the 10 class logits. Train it with ``digits_classifier()``."""

    VERSION = 1
    SIZE, FEATURES = 8, 128
    label = "digits classifier"
    fn_resize = staticmethod(_keep_native)

    def __init__(self, fingerprint: str = ""):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, self.FEATURES),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.FEATURES, 10))  # features are taken before the ReLU
        self.fingerprint = fingerprint

    @property
    def cache_id(self) -> str:
        return f"digits-v{self.VERSION}-{self.fingerprint}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(_to_unit(x, self.SIZE).mean(1, keepdim=True))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of [-1, 1] images [B, 1, H, W]."""
        return self.head(self.body(F.adaptive_avg_pool2d(images.float(), self.SIZE)))


def _fit(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam on cross-entropy, batches of 64 in a seeded order; one thread so the result is bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=gen).split(64):
                loss = F.cross_entropy(model.logits(images[idx]), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)


def _cached_state(model: nn.Module, path: str) -> Optional[Dict[str, torch.Tensor]]:
    """The cached weights at ``path`` when they fit ``model``; None when there are none, or when the file is
    unusable (zero-byte, truncated, other keys or shapes, non-finite weights: warned, naming the file, then
    retrained and rewritten). Weights only, never code (``weights_only=True``)."""
    if not os.path.exists(path):
        return None
    expected = model.state_dict()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or set(state) != set(expected) or any(
                not isinstance(v, torch.Tensor) or v.shape != expected[k].shape for k, v in state.items()):
            raise ValueError("not this classifier's weights")
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise ValueError("non-finite weights")
        return state
    except Exception as error:  # EOFError, RuntimeError (bad zip), UnpicklingError, ValueError: all mean "retrain"
        log.warning("cached digits classifier %s is unusable (%s): training it anew", path, first_line(error))
        return None


def digits_classifier(train_images: torch.Tensor, train_labels: torch.Tensor, cache_dir: Optional[str] = None,
                      epochs: int = 15, seed: int = 0) -> DigitsClassifier:
    """The classifier trained on ([-1, 1] images [N, 1, 8, 8], labels [N]), loaded from ``cache_dir``
    (default ``cache_root()/extractors``) when it was trained before on the same data and settings."""
    key = hashlib.sha1(train_images.numpy().tobytes() + train_labels.numpy().tobytes()
                       + f"{epochs},{seed}".encode()).hexdigest()[:8]
    path = os.path.join(cache_dir or os.path.join(cache_root(), "extractors"), f"digits-v{DigitsClassifier.VERSION}-{key}.pt")
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone
        torch.manual_seed(seed)  # the initial weights
        model = DigitsClassifier(fingerprint=key)
        state = _cached_state(model, path)
        if state is not None:
            model.load_state_dict(state)
            return model.requires_grad_(False).eval()
        _fit(model, train_images, train_labels, epochs, seed)
    write_atomic(path, lambda f: torch.save(model.state_dict(), f))  # parallel runs may share the cache
    log.info("digits classifier trained on %d images and cached: %s", len(train_images), path)
    return model.requires_grad_(False).eval()


@dataclass
class ClassSums:
    """Sums over samples of p(y|x) [K] and of sum_y p log p (float64): what ``classifier_score`` needs, so it
    can be added up batch by batch (``+``) without keeping the logits."""

    n: int
    p: torch.Tensor
    p_log_p: float

    @classmethod
    def of(cls, logits: torch.Tensor) -> "ClassSums":
        log_p = F.log_softmax(logits.double(), dim=1)
        p = log_p.exp()
        return cls(len(logits), p.sum(0), float((p * log_p).sum()))

    def __add__(self, other: "ClassSums") -> "ClassSums":
        return ClassSums(self.n + other.n, self.p + other.p, self.p_log_p + other.p_log_p)

    def scores(self) -> Dict[str, float]:
        """See ``classifier_score``; E_x KL(p(y|x) || p(y)) = H(p(y)) - E_x H(p(y|x)), so sums suffice."""
        marginal = self.p / self.n
        label_entropy = -self.p_log_p / self.n
        class_entropy = float(-(marginal * marginal.clamp_min(1e-300).log()).sum())
        return {"label_entropy": label_entropy, "class_entropy": class_entropy,
                "is_like": math.exp(class_entropy - label_entropy)}


def classifier_score(logits: torch.Tensor) -> Dict[str, float]:
    """From class logits [N, K]: ``label_entropy`` E_x H(p(y|x)) (low: confident), ``class_entropy`` H(p(y))
    (high: all classes present) and ``is_like`` = exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016; at most K)."""
    return ClassSums.of(logits).scores()


def class_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of [-1, 1] images [N, 1, H, W] that ``classifier`` assigns to their asked ``labels`` [N]."""
    device = next(classifier.parameters()).device
    with torch.no_grad():
        predicted = torch.cat([classifier.logits(x.to(device)).argmax(1).cpu() for x in images.split(batch_size)])
    return float((predicted == labels.cpu()).double().mean())
