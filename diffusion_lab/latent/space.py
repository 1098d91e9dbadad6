"""A latent space: a codec (encoder/decoder) with its latents standardised per channel, and the cached latents of
a dataset, so diffusion trains on z and every picture, FID and `sample` decodes back to pixels.

Scaling: EDM2's per-channel mean and std (Karras et al. 2024, `encoders.py`), measured once on the train split's
latents, then z = (E(x) - mean_c) / std_c * target_std. Per channel rather than Rombach's one scale factor because
a small KL autoencoder's channels differ in offset and scale, and a process assumes every coordinate of the data
has the same variance. target_std defaults to 1 (Rombach's unit variance, which the VP processes assume).

Latents are the posterior mean, encoded once (not a fresh posterior sample per epoch): the cached tensor is the
whole training set, so resuming replays the same data bit for bit, and with the small KL weight the posterior's
std is tiny next to the latents' spread anyway.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Protocol

import torch

from .. import console, files
from ..data.datasets import TensorImageDataset



class Codec(Protocol):
    """What a latent space needs of an encoder/decoder (the sandbox's autoencoder run, PCA, a diffusers VAE)."""

    identity: Dict[str, Any]  # {"kind", "path", "sha256"}: which codec, where it came from, its content hash

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...  # pixels in [-1, 1] -> raw latents (posterior mean)

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...  # raw latents -> pixels

    def tensors(self) -> Dict[str, torch.Tensor]: ...  # what a checkpoint must hold to rebuild it (PCA's basis)


@dataclass
class LatentSpace:
    """z = (E(x) - mean) / std * target_std per channel, and its inverse before the decoder."""

    codec: Codec
    mean: torch.Tensor  # [C] of the raw train latents
    std: torch.Tensor  # [C]
    target_std: float = 1.0
    pixel_shape: Optional[tuple] = None  # (C, H, W) of the images it encodes
    sampler_options = {"clip_x0": False, "clamp_final": False}  # latents are not in [-1, 1]: decoded pixels are clamped

    def _view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like.device, like.dtype).view(1, -1, 1, 1)

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self._view(self.mean, raw)) / self._view(self.std, raw) * self.target_std

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.codec.encode(x))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of scaled latents z."""
        raw = z / self.target_std * self._view(self.std, z) + self._view(self.mean, z)
        return self.codec.decode(raw).float().clamp(-1.0, 1.0)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint records: the codec's identity (and tensors, for PCA) and the scaling."""
        return {"identity": dict(self.codec.identity), "mean": self.mean.cpu(), "std": self.std.cpu(),
                "target_std": float(self.target_std),
                "pixel_shape": list(self.pixel_shape or ()), "tensors": {k: v.cpu() for k, v in self.codec.tensors().items()}}

    def describe(self) -> str:
        who = self.codec.identity
        return f"{who['kind']} {who.get('path') or ''} (sha256 {who['sha256'][:12]})".replace("  ", " ")


def channel_stats(raw: torch.Tensor) -> tuple:
    """(mean [C], std [C]) of latents [N, C, h, w] over images and positions, in float64 then float32."""
    flat = raw.double().transpose(0, 1).flatten(1)
    return flat.mean(1).float(), flat.std(1).clamp_min(1e-8).float()


@torch.no_grad()
def encode_all(codec: Codec, dataset, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Raw latents of every image of `dataset` (in order), on the CPU."""
    batches = []
    starts = range(0, len(dataset), batch_size)
    for start in console.progress(starts, len(starts), "encode") if console.terminal() else starts:
        x = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batches.append(codec.encode(x.to(device)).float().cpu())
    return torch.cat(batches)


def cache_key(identity: Dict[str, Any], data: Dict[str, Any], split: str, n: int) -> str:
    """The cache file's name: a hash of the codec's content hash and the data (config, split, size)."""
    text = json.dumps({"codec": identity["sha256"], "data": data, "split": split, "n": n}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached_latents(codec: Codec, dataset, data: Dict[str, Any], device: torch.device, cache_dir: Optional[Path],
                   write: bool = True) -> torch.Tensor:
    """Raw latents of `dataset`, read from `cache_dir` when an earlier run encoded the same data with the same
    codec (safetensors: data only), else encoded now and written there atomically (`write`: rank 0 only)."""
    from safetensors.torch import load, save

    path = None if cache_dir is None else Path(cache_dir) / f"{cache_key(codec.identity, data, dataset.split, len(dataset))}.safetensors"
    if path is not None and path.is_file():
        try:
            raw = load(path.read_bytes())["latents"]
            if raw.shape[0] == len(dataset):
                console.info(f"latents: read {len(raw)} from the cache {path}")
                return raw
        except Exception as error:  # a damaged cache file is encoded again, never trusted
            console.log.warning(f"latents: ignoring the unreadable cache {path}: {files.first_line(error)}")
    raw = encode_all(codec, dataset, device)
    if path is not None and write:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = save({"latents": raw.contiguous()}, metadata={"codec": json.dumps(codec.identity), "split": dataset.split})
        files.write_atomic(path, lambda f: f.write(blob))
        console.info(f"latents: encoded {len(raw)} images once and cached them in {path}")
    return raw


def latent_dataset(space: LatentSpace, raw: torch.Tensor, pixels) -> TensorImageDataset:
    """The scaled latents as a dataset with the pixel dataset's name, split and labels (never flipped: a flip of
    z is not the latent of the flipped image)."""
    return TensorImageDataset(space.scale(raw), name=pixels.name, hflip=False, split=pixels.split,
                              labels=getattr(pixels, "labels", None), num_classes=getattr(pixels, "num_classes", None))
