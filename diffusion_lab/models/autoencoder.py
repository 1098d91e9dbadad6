"""A small KL-regularised convolutional autoencoder (Rombach et al. 2022, Sec. 3.1 and Appendix G): images
[B,C,H,W] in [-1, 1] <-> latents [B,latent_channels,H/f,W/f], the encoder giving a diagonal Gaussian posterior.

Encoder: conv -> (ResBlock, stride-2 conv) per halving -> ResBlock -> GroupNorm, SiLU, conv to 2 x latent channels
(mean, log-variance). Decoder: the mirror, with nearest-neighbour upsampling. No attention and no time input; the
perceptual and adversarial losses of the paper are left out (their networks cannot be downloaded here).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .unet import conv3x3, group_norm


class PlainResBlock(nn.Module):
    """GroupNorm -> SiLU -> Conv3x3, twice, plus the skip (a 1x1 conv when the channel count changes)."""

    def __init__(self, in_ch: int, out_ch: int, norm_groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(norm_groups, in_ch, f"autoencoder block ({in_ch}->{out_ch}) input"), nn.SiLU(),
            conv3x3(in_ch, out_ch),
            group_norm(norm_groups, out_ch, f"autoencoder block ({in_ch}->{out_ch}) output"), nn.SiLU(),
            conv3x3(out_ch, out_ch))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def level_widths(width: int, factor: int) -> List[int]:
    """Channels at each resolution, finest first: width, then 2 x width at every coarser level."""
    if factor < 1 or factor & (factor - 1):
        raise ValueError(f"autoencoder.factor={factor} must be a power of two (1, 2, 4, 8)")
    return [width * min(2 ** i, 2) for i in range(int(math.log2(factor)) + 1)]


class KLAutoencoder(nn.Module):
    """encode(x) -> (mean, logvar) of q(z|x); decode(z) -> x_rec; forward(x, generator) samples z from q."""

    def __init__(self, channels: int = 1, latent_channels: int = 4, factor: int = 4, width: int = 32,
                 norm_groups: int = 8, **_ignored):
        super().__init__()
        widths = level_widths(width, factor)
        self.channels, self.latent_channels, self.factor = channels, latent_channels, factor
        down: List[nn.Module] = [conv3x3(channels, widths[0])]
        for w_in, w_out in zip(widths, widths[1:]):
            down += [PlainResBlock(w_in, w_out, norm_groups), nn.Conv2d(w_out, w_out, 3, stride=2, padding=1)]
        down += [PlainResBlock(widths[-1], widths[-1], norm_groups),
                 group_norm(norm_groups, widths[-1], "autoencoder encoder output"), nn.SiLU(),
                 conv3x3(widths[-1], 2 * latent_channels)]
        self.encoder = nn.Sequential(*down)
        up: List[nn.Module] = [conv3x3(latent_channels, widths[-1]), PlainResBlock(widths[-1], widths[-1], norm_groups)]
        for w_in, w_out in zip(widths[::-1], widths[::-1][1:]):
            up += [nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(w_in, w_in), PlainResBlock(w_in, w_out, norm_groups)]
        up += [group_norm(norm_groups, widths[0], "autoencoder decoder output"), nn.SiLU(), conv3x3(widths[0], channels)]
        self.decoder = nn.Sequential(*up)

    def latent_shape(self, image_size: int) -> Tuple[int, int, int]:
        if image_size % self.factor:
            raise ValueError(f"image size {image_size} is not divisible by autoencoder.factor={self.factor}")
        return self.latent_channels, image_size // self.factor, image_size // self.factor

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of the posterior q(z|x), log-variance clamped to [-30, 20] as in Rombach's code."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """decode(posterior mean of encode(x)) of [-1, 1] images, batch by batch on the model's device, on the CPU."""
        device = next(self.parameters()).device
        return torch.cat([self.decode(self.encode(x.to(device))[0]).cpu() for x in images.split(batch_size)])

    def forward(self, x: torch.Tensor, generator: torch.Generator = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_rec, mean, logvar) with z = mean + exp(logvar / 2) * noise (the reparameterisation trick)."""
        mean, logvar = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + (0.5 * logvar).exp() * noise), mean, logvar


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per image, summed over latent elements: 0.5 sum(mean^2 + var - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Absolute error per image, summed over pixels: the paper's L1 term, in the units its KL weight (1e-6) is for."""
    return F.l1_loss(x_rec, x, reduction="none").flatten(1).sum(1)
