"""PCA as an exact linear latent space: the train split's top principal components, whitened, laid out as a
[C, h, w] "image" for the U-Net. What diffusion gains or loses in an autoencoder's latents, against this
baseline, is the autoencoder's own doing (its loss, its non-linearity), not the change of coordinates."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch

from ..registry import LATENT_SPACES
from .hashing import tensor_hash

# Components whose std is below this fraction of the first one's are not whitened: whitening a direction the data
# does not vary along (rank-deficient data, e.g. upsampled 8x8 digits at 32x32 have only ~61 components that vary)
# would blow float rounding up to unit-variance noise that diffusion would then have to learn.
MIN_RELATIVE_STD = 1e-3


@LATENT_SPACES.register("pca")
class PCACodec:
    """z = W^T (x - mu) / s (the first k = C*h*w components, each scaled to unit variance, those with almost no
    variance left near 0); x = W (s z) + mu."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scales: torch.Tensor, latent_shape: Sequence[int],
                 image_shape: Sequence[int]):
        self.mean, self.components, self.scales = mean.float(), components.float(), scales.float()
        self.latent_shape, self.image_shape = tuple(int(v) for v in latent_shape), tuple(int(v) for v in image_shape)
        self.identity = {"kind": "pca", "path": None, "sha256": tensor_hash(self.tensors())}

    @classmethod
    def fit(cls, images: torch.Tensor, channels: int, factor: int) -> "PCACodec":
        """Principal components of images [N, C, H, W] (SVD in float64), k = channels * (H/factor)^2 of them."""
        n, _, size, _ = images.shape
        if size % factor:
            raise ValueError(f"latent=pca: latent_space.pca_factor={factor} does not divide the image size {size}")
        shape = (channels, size // factor, size // factor)
        k, d = math.prod(shape), math.prod(images.shape[1:])
        if k > min(n, d):
            raise ValueError(f"latent=pca: {k} components ({'x'.join(map(str, shape))}) exceed what {n} images of "
                             f"{d} pixels have; lower latent_space.pca_channels or raise latent_space.pca_factor")
        x = images.flatten(1).double()
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        std = s[:k] / math.sqrt(n - 1)  # of each component along the train split
        scales = std.clamp_min(float(std[0]) * MIN_RELATIVE_STD)  # directions the data does not vary along stay ~0
        return cls(mean, vh[:k], scales, shape, images.shape[1:])

    @classmethod
    def from_config(cls, arg: str, device, pixels, options) -> "PCACodec":
        """`latent=pca`: fitted on every image of the train split `pixels`."""
        images = pixels.images if isinstance(getattr(pixels, "images", None), torch.Tensor) else \
            torch.stack([pixels[i] for i in range(len(pixels))])
        return cls.fit(images, int(options.pca_channels), int(options.pca_factor)).to(device)

    @classmethod
    def restore(cls, identity: Dict[str, Any], tensors: Dict[str, torch.Tensor], device, channels: int) -> "PCACodec":
        codec = cls(tensors["mean"], tensors["components"], tensors["scales"], tensors["latent_shape"].tolist(),
                    tensors["image_shape"].tolist())
        return codec.to(device)

    def to(self, device) -> "PCACodec":
        self.mean, self.components, self.scales = (v.to(device) for v in (self.mean, self.components, self.scales))
        return self

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"mean": self.mean.cpu(), "components": self.components.cpu(), "scales": self.scales.cpu(),
                "latent_shape": torch.tensor(self.latent_shape), "image_shape": torch.tensor(self.image_shape)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        coords = (x.flatten(1).float() - self.mean) @ self.components.T / self.scales
        return coords.view(-1, *self.latent_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        pixels = (z.flatten(1).float() * self.scales) @ self.components + self.mean
        return pixels.view(-1, *self.image_shape)
