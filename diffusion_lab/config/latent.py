"""`latent=`: the latent space a run diffuses in, built from the config (training) or from what a checkpoint
recorded (resume, `sample`, `evaluate`), with the codec's content hash checked every time."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from ..latent import diffusers_vae, pca, trained_autoencoder  # noqa: F401  (register the latent spaces)
from ..latent.space import LatentSpace, cached_latents, channel_stats, latent_dataset
from ..registry import LATENT_SPACES
from ..training.checkpoint import CheckpointError

PREFIXED = ("pca", "diffusers")  # latent=pca, latent=diffusers:DIR; anything else is an autoencoder run dir


def parse(spec: str) -> Tuple[str, str]:
    """`latent=` -> (kind, argument): pca -> (pca, ""), diffusers:DIR -> (diffusers, DIR), DIR -> (autoencoder, DIR)."""
    kind, sep, arg = spec.partition(":")
    if kind in PREFIXED and (sep or kind == "pca"):
        return kind, arg
    return "autoencoder", spec


def spec_of(cfg: DictConfig) -> Optional[str]:
    spec = OmegaConf.select(cfg, "latent", default=None)
    return None if spec in (None, "", "null") else str(spec)


def check_same(saved: Optional[Dict[str, Any]], identity: Dict[str, Any], what: str) -> None:
    """CheckpointError unless the codec now at the recorded place is the one the run was trained with."""
    if saved is None:
        return
    before = saved["identity"]
    if before["kind"] != identity["kind"] or before["sha256"] != identity["sha256"]:
        where = before.get("path") or before["kind"]
        raise CheckpointError(f"{what}: the run was trained in the latent space of {where} (sha256 "
                              f"{before['sha256'][:12]}), but it now holds another one (sha256 "
                              f"{identity['sha256'][:12]}); use the {before['kind']} it was trained with")


def build_latent(cfg: DictConfig, pixels, device: torch.device, saved: Optional[Dict[str, Any]] = None,
                 write_cache: bool = True) -> Optional[Tuple[LatentSpace, Any]]:
    """(latent space, latent train dataset) of `latent=`, or None in pixel space. `saved`: the checkpoint's
    record when resuming (PCA and the scaling are then taken from it; a codec's hash must match it)."""
    spec = spec_of(cfg)
    if spec is None:
        if saved is not None:
            raise CheckpointError("train.resume: that run diffused in a latent space; set latent= as it was")
        return None
    kind, arg = parse(spec)
    options = cfg.latent_space
    builder = LATENT_SPACES.get(kind)
    codec = (builder.restore(saved["identity"], saved["tensors"], device, pixels.channels)
             if saved is not None and kind == "pca" else builder.from_config(arg, device, pixels, options))
    check_same(saved, codec.identity, "train.resume")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    raw = cached_latents(codec, pixels, data, device, options.cache_dir, write=write_cache)
    mean, std = (saved["mean"], saved["std"]) if saved is not None else channel_stats(raw)
    space = LatentSpace(codec, mean, std, float(options.std), (pixels.channels, pixels.image_size, pixels.image_size))
    return space, latent_dataset(space, raw, pixels)


def restore_latent(record: Optional[Dict[str, Any]], device: torch.device, what: str = "checkpoint") -> Optional[LatentSpace]:
    """The latent space a checkpoint recorded (None: pixel space), its codec checked against the recorded hash."""
    if not record:
        return None
    identity, pixel_shape = record["identity"], tuple(int(v) for v in record["pixel_shape"])
    codec = LATENT_SPACES.get(identity["kind"]).restore(identity, record.get("tensors", {}), device, pixel_shape[0])
    check_same(record, codec.identity, what)
    return LatentSpace(codec, record["mean"], record["std"], float(record["target_std"]), pixel_shape)
