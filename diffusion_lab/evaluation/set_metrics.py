"""The scores beside FID that need both feature sets themselves, not only their moments: KID (``kid.py``) and
improved precision/recall (``precision_recall.py``), as one dict of numbers under the keys every log, summary
and table uses.

KID's subsets are drawn from their own seeded generator, so scoring never moves the global RNG.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import numpy as np

from .kid import kid
from .precision_recall import precision_recall

KEYS = ("kid", "kid_std", "precision", "recall")
FLOOR_KEYS = ("kid", "precision", "recall")  # those that get a noise floor: ``<key>_floor``
KID_SEED = 0


def set_metrics(real: np.ndarray, fake: np.ndarray, real_radii: Optional[np.ndarray] = None) -> Dict[str, float]:
    """{kid, kid_std, precision, recall} of generated features ``fake`` against real features ``real`` (with
    their k-NN radii, when already computed)."""
    distance = kid(real, fake, seed=KID_SEED)
    pr = precision_recall(real, fake, real_radii=real_radii)
    return {"kid": distance.mean, "kid_std": distance.std, "precision": pr.precision, "recall": pr.recall}


def valid(values: object) -> bool:
    """True for a dict holding a finite number under every key (a cached floor read back, say)."""
    return isinstance(values, Mapping) and all(
        isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool) and math.isfinite(values[k])
        for k in KEYS)


def describe(values: Mapping[str, Optional[float]], floors: Mapping[str, Optional[float]]) -> str:
    """The short console text, e.g. ``KID 0.0123 +- 0.0011 (floor 0.0004), P/R 0.712/0.451 (floor 0.80/0.79)``;
    empty when there are no values."""
    if values.get("kid") is None:
        return ""
    text = f"KID {values['kid']:.4g} +- {values['kid_std']:.2g}"
    text += f" (floor {floors['kid']:.2g})" if floors.get("kid") is not None else ""
    text += f", P/R {values['precision']:.3f}/{values['recall']:.3f}"
    if floors.get("precision") is not None:
        text += f" (floor {floors['precision']:.2f}/{floors['recall']:.2f})"
    return text
