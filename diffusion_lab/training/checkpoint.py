"""Checkpoints are data: written atomically and durably, read without running code, checked before use.

A checkpoint holds tensors and plain Python values only, so `torch.load(weights_only=True)` reads it:
a file whose pickle asks for any other global (e.g. `os.system`) is refused with one line. Every
problem with a checkpoint is a `CheckpointError` whose message is one line naming the file.
"""
from __future__ import annotations

import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .. import files
from ..errors import ConfigError

log = logging.getLogger("diffusion_lab")

# Keys that may differ between a run and its continuation (the rhythm of the run, not what it trains).
RESUME_FREE_KEYS = ("train.steps", "train.resume", "train.log_every", "train.sample_every",
                    "train.checkpoint_every", "train.max_bad_steps", "eval", "logger", "device", "run_name",
                    "latent_space.cache_dir")
REQUIRED_KEYS = ("step", "model", "train_step", "config", "image_shape")
# Keys added after checkpoints were first written, with the value that reproduces the runs saved before them
# (unconditional, unguided): a saved config without such a key compares as if it held this value.
ADDED_KEYS = {"model.num_classes": None, "train.cond_drop_prob": 0.1, "sampler.guidance_scale": 1.0,
              "sampler.guidance_interval": None, "sampler.guidance_rescale": 0.0, "latent": None,
              "latent_space.std": 1.0, "latent_space.pca_channels": 4, "latent_space.pca_factor": 4,
              "train.ema": "standard", "train.ema_stds": [0.05, 0.10], "train.ema_snapshot_every": 50,
              "train.ema_snapshot_dtype": "float16"}

# Checkpoints written before RNG states were stored as tensors hold numpy's MT19937 state as an
# ndarray. These are exactly the numpy globals that unpickling a uint32 ndarray needs; the
# weights-only unpickler still refuses everything else.
_LEGACY_NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType,
                         (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]

class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------------
# Writing


def save(path: Path, state: Dict[str, Any]) -> None:
    """Write `state` atomically and durably (files.write_atomic): readers see the old file or the new one,
    never half of one, also with several concurrent writers; after a node crash the rename is on disk."""
    try:
        files.write_atomic(Path(path), lambda f: torch.save(state, f))
    except files.WriteError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error.reason}") from error


# ------------------------------------------------------------------------------------------------
# Reading


def load(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint as data only (`weights_only=True`); CheckpointError (one line) if it cannot be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_GLOBALS):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        asks = f"it asks for {found.group(1)}" if found else files.first_line(error)
        raise CheckpointError(f"refusing to load {path}: a checkpoint must be plain data, but {asks}; it was not "
                              f"loaded (a diffusion_lab checkpoint never needs code to load)") from error
    except Exception as error:  # truncated, empty or not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: {files.first_line(error)}") from error
    if not isinstance(state, dict) or not all(key in state for key in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a diffusion_lab checkpoint (it lacks {', '.join(REQUIRED_KEYS)})")
    return state


def ema_weights(path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
    """The EMA weights (train_step.ema.module) that a trained run samples or encodes with; CheckpointError if the
    checkpoint holds none."""
    ema = state["train_step"].get("ema") if isinstance(state["train_step"], dict) else None
    weights = ema.get("module") if isinstance(ema, dict) else None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no EMA weights (train_step.ema.module) to sample from")
    return weights


def non_finite(state: Dict[str, Any]) -> List[str]:
    """Names of the model, EMA and optimizer tensors of a checkpoint that hold NaN or inf."""
    train_step = state["train_step"]
    groups = {"model": state["model"], "ema": (train_step.get("ema") or {}).get("module", {}),
              "optimizer": {f"{i}.{k}": v for i, s in train_step["optimizer"]["state"].items() for k, v in s.items()}}
    return [f"{group}.{name}" for group, tensors in groups.items() for name, value in tensors.items()
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]


def _size(tensors: Dict[str, Any]) -> int:
    return sum(value.numel() for value in tensors.values() if torch.is_tensor(value))


def architecture_differences(described: Dict[str, torch.Tensor], weights: Dict[str, Any]) -> List[str]:
    """Why `weights` cannot load into a model whose state dict is `described` (its keys and shapes, e.g. from
    a model built on the meta device): keys missing or unknown, shapes that differ; empty if they fit."""
    def shape(value: Any) -> Any:
        return list(value.shape) if torch.is_tensor(value) else type(value).__name__

    missing = [k for k in described if k not in weights]
    unknown = [k for k in weights if k not in described]
    differ = [f"{k} is {shape(weights[k])} where the config has {shape(v)}" for k, v in described.items()
              if k in weights and shape(weights[k]) != shape(v)]
    return ([f"{len(missing)} weights missing (first {missing[0]})"] if missing else []) + \
           ([f"{len(unknown)} unknown weights (first {unknown[0]})"] if unknown else []) + \
           ([f"{len(differ)} of another shape (first {differ[0]})"] if differ else [])


def check_architecture(path: Path, described: Dict[str, torch.Tensor], weights: Dict[str, Any]) -> None:
    """CheckpointError (one line) unless `weights` fit the `described` model key for key and shape: a config
    edited after training, a foreign network or an implausibly large model is refused before it is built."""
    differences = architecture_differences(described, weights)
    if differences:
        raise CheckpointError(f"{path} does not hold the model its saved config describes ({_size(described):,} "
                              f"values there, {_size(weights):,} in the checkpoint): {'; '.join(differences)}")


def load_for_resume(path: Path, cfg: DictConfig, map_location: Any = "cpu") -> Dict[str, Any]:
    """A checkpoint that this config may continue: same run config (rhythm keys aside), finite weights."""
    state = load(path, map_location)
    if "posthoc_ema" in state:
        raise CheckpointError(f"train.resume={path}: a post-hoc EMA reconstruction (sigma_rel "
                              f"{state['posthoc_ema'].get('sigma_rel')}), whose EMA is no longer the run's; resume "
                              f"from the run's checkpoints/last.pt")
    differences = config_differences(state["config"], OmegaConf.to_container(cfg, resolve=True))
    if differences:
        raise CheckpointError(f"train.resume={path} was trained with a different config: {'; '.join(differences)} "
                              f"(only {', '.join(RESUME_FREE_KEYS)} may change when resuming)")
    bad = non_finite(state)
    if bad:
        raise CheckpointError(f"{path} holds non-finite values ({bad[0]} and {len(bad) - 1} more): the run had "
                              f"diverged; resume from an earlier checkpoint")
    return state


# ------------------------------------------------------------------------------------------------
# Random number generators, stored as tensors and plain values


def rng_states() -> Dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)),
    }


def set_rng_states(states: Dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    random.setstate(states["python"])
    kind, keys, *rest = states["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys  # tensors since this format; ndarrays before
    np.random.set_state((kind, keys.astype(np.uint32), *rest))


# ------------------------------------------------------------------------------------------------
# Which runs a config may continue


def _comparable(config: Dict[str, Any]) -> Dict[str, Any]:
    cfg = OmegaConf.create(config)
    for key in RESUME_FREE_KEYS:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and leaf in node:
            node.pop(leaf)
    return OmegaConf.to_container(cfg, resolve=True)


def _flat(config: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    return {k: v for key, value in config.items() for k, v in _flat(value, f"{prefix}{key}.").items()} or {prefix: {}}


def config_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """`key: saved -> current` for every value (rhythm keys aside) that differs between two configs."""
    old, new = _flat(_comparable(saved)), _flat(_comparable(current))
    for key, value in ADDED_KEYS.items():
        if key + "." in new:
            old.setdefault(key + ".", value)
    missing = "<unset>"
    return [f"{key.rstrip('.')}: {old.get(key, missing)} -> {new.get(key, missing)}"
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)]


def _in_sweep(run_dir: Path, root: Path) -> bool:
    """Whether a run dir is a sweep job: Hydra writes multirun.yaml into the sweep dir above it."""
    return any((parent / "multirun.yaml").is_file() for parent in run_dir.parents
               if parent == root or root in parent.parents)


def _saved_config(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The resolved config.yaml beside checkpoints/, or None (with a warning naming it) when it cannot be read."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = OmegaConf.to_container(OmegaConf.load(path))
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
        return config
    except Exception as error:  # a corrupt file never breaks the search; it is skipped and named
        log.warning(f"train.resume=auto: skipping {path}: cannot read it ({type(error).__name__}: "
                    f"{files.first_line(error)})")
        return None


def resumable_runs(cfg: DictConfig, roots: Iterable[Path]) -> List[Path]:
    """Every checkpoints/last.pt under `roots` whose run had the same config (rhythm keys aside), in the order
    train.resume=auto picks them: single runs before sweep jobs (a sweep's job is rarely the run one means),
    each newest written first. A config.yaml that cannot be read is skipped with a warning."""
    wanted = OmegaConf.to_container(cfg, resolve=True)
    found = []
    for root in (Path(r) for r in roots if Path(r).is_dir()):
        for path in root.rglob("checkpoints/last.pt"):
            saved = _saved_config(path.parent.parent)
            if saved is not None and not config_differences(saved, wanted):
                found.append((_in_sweep(path.parent.parent, root), -path.stat().st_mtime, str(path), path))
    return [path for *_, path in sorted(found)]


def find_resumable(cfg: DictConfig, roots: Iterable[Path]) -> Optional[Path]:
    """The checkpoint train.resume=auto continues: the first of `resumable_runs`, or None."""
    runs = resumable_runs(cfg, roots)
    return runs[0] if runs else None
