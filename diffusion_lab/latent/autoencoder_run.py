"""A trained autoencoder run (`python -m diffusion_lab.autoencoder`) as the latent-diffusion side uses it:
the network of its saved config holding its EMA weights, and what identifies them (`load_autoencoder`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from ..errors import error_line
from ..models.autoencoder import KLAutoencoder
from ..training import checkpoint
from ..training import run_dir as run_dirs
from .hashing import tensor_hash

ARCHITECTURE_KEYS = ("latent_channels", "factor", "width", "norm_groups")  # conf/autoencoder/kl.yaml's network keys
WEIGHTS = "ema"  # which weights a run's FID, grids and load_autoencoder use: the EMA of the training weights


def build_autoencoder(node: Dict[str, Any], channels: int) -> KLAutoencoder:
    """The network an `autoencoder` config node describes, for images with `channels` channels."""
    return KLAutoencoder(channels=channels, **{k: node[k] for k in ARCHITECTURE_KEYS if k in node})


def autoencoder_node(path: Path, state: Dict[str, Any]) -> Dict[str, Any]:
    """The saved config's `autoencoder` node; CheckpointError when the checkpoint is not an autoencoder run's."""
    node = state["config"].get("autoencoder") if isinstance(state["config"], dict) else None
    if not isinstance(node, dict):
        raise checkpoint.CheckpointError(f"{path} is not an autoencoder run's checkpoint (its config has no "
                                         f"autoencoder node; a diffusion run?): train one with "
                                         f"python -m diffusion_lab.autoencoder")
    return node


def checked_autoencoder(path: Path, node: Dict[str, Any], channels: int,
                        weights: Dict[str, torch.Tensor]) -> KLAutoencoder:
    """The network of `node` holding `weights`, its keys and shapes first compared on the meta device (no memory),
    so weights that do not fit the saved config are one line, not a load_state_dict traceback."""
    try:
        with torch.device("meta"):
            described = build_autoencoder(node, channels).state_dict()
    except Exception as error:  # a config that describes no network (factor 3, groups that do not divide)
        raise checkpoint.CheckpointError(f"{path}: its saved config describes an autoencoder that cannot be built: "
                                         f"{error_line(error)}") from error
    checkpoint.check_architecture(path, described, weights)
    model = build_autoencoder(node, channels)
    model.load_state_dict(weights)
    return model


def load_autoencoder(path: Path, device: Any = "cpu") -> Tuple[KLAutoencoder, Dict[str, Any]]:
    """(network, info) of an autoencoder run dir or checkpoint file: its EMA weights (those of the reconstruction
    FID), in eval mode without gradients. info: kind, path (the resolved checkpoint), sha256 (`tensor_hash` of the
    weights), data (the run's data config), image_shape [C,H,W], step, latent_shape [C,h,w], weights ("ema")."""
    file = run_dirs.checkpoint_file(Path(path)).resolve()
    state = checkpoint.load(file)  # "no checkpoint at ..." for a path without one
    node = autoencoder_node(file, state)
    channels, height, width = (int(v) for v in state["image_shape"])
    weights = checkpoint.ema_weights(file, state)
    model = checked_autoencoder(file, node, channels, weights)
    try:
        latent_shape = list(model.latent_shape(height))
    except ValueError as error:
        raise checkpoint.CheckpointError(f"{file}: {error_line(error)}") from error
    model = model.to(device).eval().requires_grad_(False)
    info = {"kind": "autoencoder", "path": str(file), "sha256": tensor_hash(weights),
            "data": dict(state["config"].get("data") or {}), "image_shape": [channels, height, width],
            "step": int(state["step"]), "latent_shape": latent_shape, "weights": WEIGHTS}
    return model, info
