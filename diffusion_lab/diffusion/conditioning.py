"""Class labels for class-conditional models: how many classes, label dropout in training, which labels to sample.

A conditional U-Net (``model.num_classes`` = K) embeds labels 0..K-1 and one extra null class, index K, that
stands for "no label". Training replaces each label by the null class with probability ``train.cond_drop_prob``
(Ho & Salimans 2022), so one network learns both p(x | y) and p(x); ``guidance.py`` combines the two at sampling.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

AUTO = "auto"  # model.num_classes=auto: the dataset's class count


def resolve_num_classes(value: Any, data_classes: Optional[int]) -> Optional[int]:
    """``model.num_classes`` as a count or None; ``auto`` -> ``data_classes`` (the dataset's, None if unlabelled)."""
    if value == AUTO:
        if data_classes is None:
            raise ValueError("model.num_classes=auto needs labelled data (this dataset has no labels)")
        return int(data_classes)
    if value is not None and (isinstance(value, (bool, str)) or int(value) != value or value < 1):
        raise ValueError(f"model.num_classes={value!r} must be null, auto or a positive number of classes")
    return None if value is None else int(value)


def check_data(num_classes: Optional[int], data_classes: Optional[int], data_name: str) -> None:
    """A conditional model trains on labelled data whose labels it can embed."""
    if num_classes is None:
        return
    if data_classes is None:
        raise ValueError(f"model.num_classes={num_classes} needs labelled data, but {data_name} has no labels "
                         f"(a folder dataset is labelled by one subfolder per class)")
    if data_classes > num_classes:
        raise ValueError(f"model.num_classes={num_classes} is fewer than the {data_classes} classes of {data_name} "
                         f"(use model.num_classes=auto)")


def drop_labels(y: torch.Tensor, num_classes: int, drop_prob: float,
                generator: Optional[torch.Generator] = None, ranks: Any = None) -> torch.Tensor:
    """``y`` with each label replaced by the null class ``num_classes`` with probability ``drop_prob``.
    Under data parallelism (``ranks``: distributed.Ranks) the draws are made for the global batch and sliced,
    so every rank's copy of the shared generator stays in step."""
    u = torch.rand(y.shape[0] * (ranks.world_size if ranks else 1), generator=generator, device=y.device)
    drop = (ranks.shard(u) if ranks else u) < drop_prob
    return torch.where(drop, torch.full_like(y, num_classes), y)


def training_labels(model: torch.nn.Module, y: Optional[torch.Tensor], drop_prob: float,
                    generator: Optional[torch.Generator] = None, ranks: Any = None) -> Dict[str, torch.Tensor]:
    """Keyword arguments of a training forward pass: ``{"y": labels after dropout}`` for a conditional model
    (drawn from ``generator``, so a seeded run stays reproducible), ``{}`` for an unconditional one."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return {}
    if y is None:
        raise ValueError("a conditional model needs labelled batches")
    return {"y": drop_labels(y, num_classes, drop_prob, generator, ranks)}


def balanced_labels(model: torch.nn.Module, n: int, device: Any = "cpu") -> Optional[torch.Tensor]:
    """Labels 0, 1, .., K-1, 0, 1, .. for n samples of a conditional model (FID on every class); None if unconditional."""
    num_classes = getattr(model, "num_classes", None)
    return None if num_classes is None else torch.arange(n, device=device) % num_classes


def class_grid(model: torch.nn.Module, n: int, device: Any = "cpu") -> Tuple[Optional[torch.Tensor], Optional[int]]:
    """Labels of a sample grid of at most n images with one row per class (per class shown), and the row length:
    (labels [K * per_class] = 0,..,0, 1,..,1, .., per_class); (None, None) for an unconditional model."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        return None, None
    per_class = max(1, n // num_classes)
    classes = torch.arange(min(num_classes, n), device=device)  # fewer images than classes: the first n classes
    return classes.repeat_interleave(per_class), per_class
