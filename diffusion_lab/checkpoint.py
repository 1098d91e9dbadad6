"""Checkpoints: written atomically, holding everything needed to continue a run bit-for-bit."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

# Keys that may differ between a run and its continuation.
RESUME_FREE_KEYS = ("train.steps", "train.resume", "train.log_every", "train.sample_every",
                    "train.checkpoint_every", "eval", "logger", "device", "run_name")


def save(path: Path, state: Dict[str, Any]) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    return torch.load(Path(path).expanduser(), map_location=map_location, weights_only=False)


def rng_states() -> Dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    cfg = OmegaConf.create(config)
    for key in RESUME_FREE_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and leaf in node:
            node.pop(leaf)
    return OmegaConf.to_container(cfg, resolve=True)


def find_resumable(cfg: DictConfig, roots: Iterable[Path]) -> Optional[Path]:
    """The newest checkpoints/last.pt under `roots` whose run had the same config (rhythm keys aside)."""
    wanted = _comparable(OmegaConf.to_container(cfg, resolve=True))
    candidates = sorted(
        (p for root in roots if Path(root).is_dir() for p in Path(root).rglob("checkpoints/last.pt")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for path in candidates:
        saved = path.parent.parent / "config.yaml"  # the resolved config written beside checkpoints/
        if saved.is_file() and _comparable(OmegaConf.to_container(OmegaConf.load(saved))) == wanted:
            return path
    return None
