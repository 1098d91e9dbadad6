"""A pretrained diffusers `AutoencoderKL` folder the user already has (`latent=diffusers:DIR`): its posterior
mean as latents, its decoder back to pixels. Read with safetensors only (no pickled code); grey data is
repeated to the VAE's three channels and its RGB output averaged back."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from ..registry import LATENT_SPACES
from ..training.checkpoint import CheckpointError
from .hashing import tensor_hash


@LATENT_SPACES.register("diffusers")
class DiffusersCodec:
    """encode: vae.encode(x).latent_dist.mean; decode: vae.decode(z).sample (Rombach's scale factor is not
    used: the latent space standardises every channel itself)."""

    def __init__(self, folder: str, device, channels: int):
        try:
            from diffusers import AutoencoderKL
        except ImportError as error:
            raise CheckpointError(f"latent=diffusers:{folder} needs diffusers: pip install diffusers") from error
        path = Path(folder).expanduser()
        if not (path / "config.json").is_file():
            raise CheckpointError(f"latent=diffusers:{folder}: no diffusers AutoencoderKL folder there (no config.json)")
        try:
            self.vae = AutoencoderKL.from_pretrained(str(path), use_safetensors=True, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as error:
            raise CheckpointError(f"latent=diffusers:{folder}: cannot load an AutoencoderKL with safetensors "
                                  f"weights: {str(error).splitlines()[0]}") from error
        self.vae = self.vae.to(device).eval().requires_grad_(False)
        self.channels, self.vae_channels = int(channels), int(self.vae.config.in_channels)
        if self.channels not in (self.vae_channels, 1):
            raise CheckpointError(f"latent=diffusers:{folder}: the VAE takes {self.vae_channels} channels, the data "
                                  f"has {self.channels}")
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.identity = {"kind": "diffusers", "path": str(path.resolve()), "sha256": tensor_hash(self.vae.state_dict())}

    @classmethod
    def from_config(cls, arg: str, device, pixels, options) -> "DiffusersCodec":
        return cls(arg, device, pixels.channels)

    @classmethod
    def restore(cls, identity: Dict[str, Any], tensors: Dict[str, torch.Tensor], device, channels: int) -> "DiffusersCodec":
        return cls(identity["path"], device, channels)

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.vae_channels != self.channels:
            x = x.expand(-1, self.vae_channels, -1, -1)
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z.to(self.vae.dtype)).sample
        return x.mean(1, keepdim=True) if self.vae_channels != self.channels else x
