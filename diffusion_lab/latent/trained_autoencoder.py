"""The sandbox's own autoencoder run (`python -m diffusion_lab.autoencoder`) as a latent codec: `latent=RUN_DIR`."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..registry import LATENT_SPACES
from ..training.checkpoint import CheckpointError


@LATENT_SPACES.register("autoencoder")
class AutoencoderCodec:
    """encode: the posterior mean of q(z|x); decode: the decoder. The weights are those of the run's checkpoint."""

    def __init__(self, path: str, device):
        from .autoencoder_run import load_autoencoder

        self.net, self.info = load_autoencoder(path, device)
        self.identity = {"kind": "autoencoder", "path": self.info["path"], "sha256": self.info["sha256"]}

    @classmethod
    def from_config(cls, arg: str, device, pixels, options) -> "AutoencoderCodec":
        codec = cls(arg, device)
        codec.check_data((pixels.channels, pixels.image_size, pixels.image_size), arg)
        return codec

    @classmethod
    def restore(cls, identity: Dict[str, Any], tensors: Dict[str, torch.Tensor], device, channels: int) -> "AutoencoderCodec":
        return cls(identity["path"], device)

    def check_data(self, image_shape: tuple, spec: str) -> None:
        """The autoencoder must have been trained on images of this run's shape."""
        trained = tuple(self.info["image_shape"])
        if trained != tuple(image_shape):
            shape = "x".join(map(str, trained))
            raise CheckpointError(f"latent={spec}: the autoencoder was trained on {shape} images, this run's data is "
                                  f"{'x'.join(map(str, image_shape))} (set data.image_size={trained[-1]})")

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z)
