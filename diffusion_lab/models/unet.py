"""Pixel-space U-Nets for noise prediction: ``model(x, t)`` (class-conditional: ``model(x, t, y)``) -> tensor
shaped like ``x``.

Two models built from the same blocks:
  ``DiffusionModel``       the small reference U-Net (one ResBlock per level), MODELS "base".
  ``DiffusionModelCIFAR``  the DDPM CIFAR-10 network (Ho et al. 2020), MODELS "cifar": several ResBlocks per
                           level, dropout, attention at chosen resolutions and DDPM's skip bookkeeping.

Speed: attention goes through ``F.scaled_dot_product_attention``, nothing loops over the batch, and every block
works under ``torch.autocast`` and with ``channels_last`` inputs (the attention reshapes follow the input layout
so a channels_last model does not bounce between memory formats).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..registry import MODELS

__all__ = [
    "TimeEmbedding",
    "ResBlock",
    "SelfAttention",
    "DownBlock",
    "UpBlock",
    "Bottleneck",
    "DiffusionModel",
    "DiffusionModelCIFAR",
    "count_parameters",
    "zero_init_",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def group_norm(groups: int, channels: int, where: str) -> nn.GroupNorm:
    """GroupNorm that fails with a clear message (instead of deep inside torch) when groups do not divide channels."""
    if groups <= 0 or channels % groups != 0:
        raise ValueError(f"norm_groups={groups} does not divide the {channels} channels of {where}; "
                         f"pick norm_groups dividing every channel count (and every skip-concatenated sum)")
    return nn.GroupNorm(groups, channels)


def conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)


RESAMPLE = ("reference", "ddpm")


def _check_resample(resample: str) -> None:
    if resample not in RESAMPLE:
        raise ValueError(f"unknown resample '{resample}'; known: {', '.join(RESAMPLE)}")


def downsampler(ch: int, resample: str) -> nn.Module:
    """Halve H and W: the reference's 4x4 stride-2 conv, or DDPM's 3x3 stride-2 conv."""
    _check_resample(resample)
    if resample == "ddpm":
        return nn.Conv2d(ch, ch, kernel_size=3, stride=2, padding=1)
    return nn.Conv2d(ch, ch, kernel_size=4, stride=2, padding=1)


def upsampler(ch: int, resample: str) -> nn.Module:
    """Double H and W: the reference's 4x4 stride-2 transposed conv, or DDPM's nearest neighbour + 3x3 conv."""
    _check_resample(resample)
    if resample == "ddpm":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv3x3(ch, ch))
    return nn.ConvTranspose2d(ch, ch, kernel_size=4, stride=2, padding=1)


def zero_init_(model: nn.Module) -> nn.Module:
    """DDPM's init_scale=0 layers: the last conv of every ResBlock, every attention output projection and the
    output conv start at zero, so each residual branch starts as the identity and the network predicts 0."""
    layers = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)]
    layers += [m.proj for m in model.modules() if isinstance(m, SelfAttention)] + [model.out_conv]
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()
    return model


class TimeEmbedding(nn.Module):
    """Integer timesteps [B] -> embedding [B, out_dim]: sinusoidal(dim) -> Linear -> act -> Linear.

    Defaults give the reference block, sinusoidal(dim) -> Linear(dim, 4 dim) -> GELU -> Linear(4 dim, dim).
    DDPM uses sinusoidal(base channels) -> Linear(ch, 4 ch) -> swish -> Linear(4 ch, 4 ch): pass hidden_dim,
    out_dim and act=nn.SiLU.
    """

    def __init__(self, dim: int, hidden_dim: Optional[int] = None, out_dim: Optional[int] = None,
                 act: Type[nn.Module] = nn.GELU):
        super().__init__()
        if dim < 4:
            raise ValueError(f"TimeEmbedding dim must be >= 4, got {dim}")
        hidden_dim = hidden_dim or 4 * dim
        self.dim = dim
        self.out_dim = out_dim or dim
        half = dim // 2
        # DDPM's frequencies: exp(-log(10000) * i / (half - 1)), i = 0..half-1. Float32 and not in the
        # state_dict: a constant, kept in full precision even if the module is cast to bf16.
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), act(), nn.Linear(hidden_dim, self.out_dim))

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        """[B] timesteps -> [B, dim] = [sin(t f), cos(t f)] (zero-padded when dim is odd), in float32."""
        args = t.reshape(-1, 1).float() * self.freqs.float()
        emb = torch.cat([args.sin(), args.cos()], dim=1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on the time embedding (DDPM's resnet_block).

    GroupNorm -> SiLU -> Conv3x3, + SiLU -> Linear(time_emb), GroupNorm -> SiLU -> [Dropout] -> Conv3x3,
    plus a 1x1 conv on the skip path when the channel count changes.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float = 0.0, norm_groups: int = 8):
        super().__init__()
        self.norm1 = group_norm(norm_groups, in_ch, f"ResBlock({in_ch}->{out_ch}) input")
        self.conv1 = conv3x3(in_ch, out_ch)
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_ch))
        self.norm2 = group_norm(norm_groups, out_ch, f"ResBlock({in_ch}->{out_ch}) output")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, kernel_size=1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection.

    GroupNorm -> qkv (1x1 conv; output channels laid out as (3, heads, head_dim)) -> SDPA -> 1x1 projection -> + x.
    """

    def __init__(self, ch: int, num_heads: int = 4, norm_groups: int = 8):
        super().__init__()
        if num_heads <= 0 or ch % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} does not divide the {ch} channels of SelfAttention")
        self.num_heads = num_heads
        self.norm = group_norm(norm_groups, ch, f"SelfAttention({ch})")
        self.qkv = nn.Conv2d(ch, 3 * ch, kernel_size=1)
        self.proj = nn.Conv2d(ch, ch, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        qkv = self.qkv(self.norm(x))
        # Both rearranges are views (no copy) for channels_last input: q, k, v get a unit-stride head_dim.
        q, k, v = rearrange(qkv, "b (three h d) x y -> three b h (x y) d", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)
        if qkv.is_contiguous(memory_format=torch.channels_last):
            out = rearrange(out, "b h (x y) d -> b x y (h d)", x=height).permute(0, 3, 1, 2)
        else:
            out = rearrange(out, "b h (x y) d -> b (h d) x y", x=height)
        return x + self.proj(out)


def _attention_or_identity(use: bool, ch: int, num_heads: int, norm_groups: int) -> nn.Module:
    return SelfAttention(ch, num_heads, norm_groups) if use else nn.Identity()


class DownBlock(nn.Module):
    """One encoder level: ``num_res_blocks`` x (ResBlock [-> SelfAttention]) then a stride-2 conv (``downsample``).

    Returns (downsampled, skips): skips are the outputs of every ResBlock(+attention), at the input resolution;
    with ``skip_downsampled`` (DDPM) the downsampled tensor is appended to them too. Without ``downsample``
    (DDPM's coarsest level) the first output is the last ResBlock's output.
    """

    def __init__(self, in_ch: int, out_ch: int, time_dim: int, num_res_blocks: int = 1, dropout: float = 0.0,
                 attention: bool = False, num_heads: int = 4, norm_groups: int = 8, downsample: bool = True,
                 skip_downsampled: bool = False, resample: str = "reference"):
        super().__init__()
        self.res_blocks = nn.ModuleList(
            ResBlock(in_ch if i == 0 else out_ch, out_ch, time_dim, dropout, norm_groups) for i in range(num_res_blocks)
        )
        self.attentions = nn.ModuleList(
            _attention_or_identity(attention, out_ch, num_heads, norm_groups) for _ in range(num_res_blocks)
        )
        self.downsample = downsampler(out_ch, resample) if downsample else None
        self.skip_downsampled = skip_downsampled and downsample
        self.skip_channels = [out_ch] * (num_res_blocks + int(self.skip_downsampled))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        skips = []
        for res, attn in zip(self.res_blocks, self.attentions):
            x = attn(res(x, temb))
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            if self.skip_downsampled:
                skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: [``upsampler``] then, per skip, concat skip -> ResBlock [-> SelfAttention].

    ``skip_channels`` lists the channels of the skips in the order they are consumed (latest-stored first).
    """

    def __init__(self, in_ch: int, skip_channels: Sequence[int], out_ch: int, time_dim: int, dropout: float = 0.0,
                 attention: bool = False, num_heads: int = 4, norm_groups: int = 8, upsample: bool = True,
                 resample: str = "reference"):
        super().__init__()
        self.upsample = upsampler(in_ch, resample) if upsample else None
        self.num_skips = len(skip_channels)
        self.res_blocks = nn.ModuleList(
            ResBlock((in_ch if i == 0 else out_ch) + skip_ch, out_ch, time_dim, dropout, norm_groups)
            for i, skip_ch in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList(
            _attention_or_identity(attention, out_ch, num_heads, norm_groups) for _ in skip_channels
        )

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor], temb: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        for res, attn, skip in zip(self.res_blocks, self.attentions, skips):
            x = attn(res(torch.cat([x, skip], dim=1), temb))
        return x


class Bottleneck(nn.Module):
    """ResBlock -> SelfAttention -> ResBlock at the coarsest resolution."""

    def __init__(self, ch: int, time_dim: int, dropout: float = 0.0, num_heads: int = 4, norm_groups: int = 8):
        super().__init__()
        self.res1 = ResBlock(ch, ch, time_dim, dropout, norm_groups)
        self.attn = SelfAttention(ch, num_heads, norm_groups)
        self.res2 = ResBlock(ch, ch, time_dim, dropout, norm_groups)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x, temb)), temb)


class _UNet(nn.Module):
    """Shared validation and forward pass; subclasses build time_mlp, init_conv, down/up blocks and the head."""

    skip_init: bool = False  # DDPM also keeps init_conv's output as a skip

    def _setup(self, image_size: int, channels: int, hidden_dims: Sequence[int]) -> List[int]:
        dims = [int(d) for d in hidden_dims]
        if not dims:
            raise ValueError("hidden_dims must be a non-empty list of channel counts, e.g. [32, 64, 128]")
        if any(d <= 0 for d in dims) or channels <= 0 or image_size <= 0:
            raise ValueError(f"image_size, channels and hidden_dims must be positive, got "
                             f"image_size={image_size}, channels={channels}, hidden_dims={dims}")
        n_down = len(dims) - 1
        factor = 2 ** n_down
        if image_size % factor:
            suggestion = max(factor, round(image_size / factor) * factor)
            raise ValueError(f"image_size={image_size} is not divisible by 2**{n_down}={factor} "
                             f"({n_down} downsamplings for hidden_dims={dims}); use e.g. image_size={suggestion}")
        self.image_size, self.channels, self.hidden_dims = int(image_size), int(channels), dims
        self.num_downsamplings = n_down
        return dims

    def _setup_labels(self, num_classes: Optional[int], emb_dim: int) -> None:
        """Class conditioning: Embedding(num_classes + 1, emb_dim) added to the time embedding; row
        ``num_classes`` is the null class of classifier-free guidance (Ho & Salimans 2022). None: unconditional."""
        if num_classes is not None and (isinstance(num_classes, bool) or int(num_classes) < 1):
            raise ValueError(f"num_classes must be null or a positive number of classes, got {num_classes}")
        self.num_classes = None if num_classes is None else int(num_classes)
        self.label_emb = nn.Embedding(self.num_classes + 1, emb_dim) if self.num_classes else None

    def _embed(self, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """Time embedding, plus the label embedding for a conditional model (y None: the null class)."""
        temb = self.time_mlp(t)
        if self.label_emb is None:
            if y is not None:
                raise ValueError("labels given to an unconditional model (built with num_classes=None)")
            return temb
        if y is None:
            y = torch.full(t.shape, self.num_classes, dtype=torch.long, device=t.device)  # t may be a float c_noise
        return temb + self.label_emb(y).to(temb.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] integer timesteps, y [B] class labels (num_classes = null class; None: all
        null) -> prediction [B, C, H, W]."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected input [B, {self.channels}, H, W] (model built with channels={self.channels}), "
                             f"got shape {tuple(x.shape)}")
        factor = 2 ** self.num_downsamplings
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by 2**{self.num_downsamplings}="
                             f"{factor} ({self.num_downsamplings} downsamplings)")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        temb = self._embed(t, y)
        h = self.init_conv(x)
        hs = [h] if self.skip_init else []
        for down in self.down_blocks:
            h, skips = down(h, temb)
            hs.extend(skips)
        h = self.bottleneck(h, temb)
        for up in self.up_blocks:
            h = up(h, [hs.pop() for _ in range(up.num_skips)], temb)
        return self.out_conv(F.silu(self.out_norm(h)))


class DiffusionModel(_UNet):
    """The reference base U-Net: one ResBlock per level, attention only in the bottleneck.

    For hidden_dims [32, 64, 128]: init_conv (32, H) -> Down 32->64 at H (skip 64@H) -> (64, H/2)
    -> Down 64->128 at H/2 (skip 128@H/2) -> (128, H/4) -> Bottleneck -> Up(+128@H/2) -> (64, H/2)
    -> Up(+64@H) -> (32, H) -> out_norm -> SiLU -> out_conv. Skips are the ResBlock outputs before downsampling.
    """

    def __init__(self, image_size: int, channels: int, hidden_dims: Sequence[int] = (32, 64, 128),
                 time_dim: int = 128, num_heads: int = 4, norm_groups: int = 8, dropout: float = 0.0,
                 resample: str = "reference", zero_init: bool = False, num_classes: Optional[int] = None):
        super().__init__()
        dims = self._setup(image_size, channels, hidden_dims)
        self.time_mlp = TimeEmbedding(time_dim)
        self._setup_labels(num_classes, time_dim)
        self.init_conv = conv3x3(channels, dims[0])
        self.down_blocks = nn.ModuleList(
            DownBlock(c_in, c_out, time_dim, dropout=dropout, num_heads=num_heads, norm_groups=norm_groups,
                      resample=resample)
            for c_in, c_out in zip(dims[:-1], dims[1:])
        )
        self.bottleneck = Bottleneck(dims[-1], time_dim, dropout=dropout, num_heads=num_heads, norm_groups=norm_groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(c_in, [c_in], c_out, time_dim, dropout=dropout, num_heads=num_heads, norm_groups=norm_groups,
                    resample=resample)
            for c_in, c_out in zip(reversed(dims[1:]), reversed(dims[:-1]))
        )
        self.out_norm = group_norm(norm_groups, dims[0], "out_norm")
        self.out_conv = conv3x3(dims[0], channels)
        if zero_init:
            zero_init_(self)


class DiffusionModelCIFAR(_UNet):
    """DDPM's CIFAR-10 U-Net (Ho et al. 2020), built from the same blocks as ``DiffusionModel``.

    One level per hidden_dims entry (32, 16, 8, 4 for a 32x32 input and 4 entries), ``num_res_blocks`` ResBlocks
    per encoder level and ``num_res_blocks + 1`` per decoder level, each decoder block concatenating a stored
    skip (init_conv output, every encoder ResBlock output and every downsampled tensor, as in DDPM). Attention
    after the ResBlocks of levels whose resolution is in ``attention_resolutions``, dropout in every ResBlock.
    Time embedding as in DDPM: sinusoidal(hidden_dims[0]) -> Linear -> SiLU -> Linear(time_dim).
    ``resample="reference"`` (the reference classes) uses 4x4 stride-2 conv / transposed conv, ``"ddpm"`` the paper's
    3x3 stride-2 conv / nearest + 3x3 conv; ``zero_init`` is DDPM's zero init (see ``zero_init_``). With both, the
    DDPM recipe has the paper's 35,746,307 parameters.
    """

    skip_init = True

    def __init__(self, image_size: int, channels: int, hidden_dims: Sequence[int] = (128, 256, 256, 256),
                 time_dim: int = 512, dropout: float = 0.1, num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), num_heads: int = 1, norm_groups: int = 32,
                 resample: str = "reference", zero_init: bool = False, num_classes: Optional[int] = None):
        super().__init__()
        dims = self._setup(image_size, channels, hidden_dims)
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        attn_res = {int(r) for r in attention_resolutions}
        block_kw = dict(dropout=dropout, num_heads=num_heads, norm_groups=norm_groups)
        level_kw = dict(block_kw, resample=resample)
        last = len(dims) - 1
        self.time_mlp = TimeEmbedding(dims[0], hidden_dim=time_dim, out_dim=time_dim, act=nn.SiLU)
        self._setup_labels(num_classes, time_dim)
        self.init_conv = conv3x3(channels, dims[0])

        skip_chs = [dims[0]]  # channels of the stored skips, in storage order
        self.down_blocks = nn.ModuleList()
        c_in = dims[0]
        for level, c_out in enumerate(dims):
            block = DownBlock(c_in, c_out, time_dim, num_res_blocks, attention=(image_size >> level) in attn_res,
                              downsample=level != last, skip_downsampled=True, **level_kw)
            self.down_blocks.append(block)
            skip_chs += block.skip_channels
            c_in = c_out

        self.bottleneck = Bottleneck(dims[-1], time_dim, **block_kw)

        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(dims))):
            consumed = [skip_chs.pop() for _ in range(num_res_blocks + 1)]
            self.up_blocks.append(UpBlock(c_in, consumed, dims[level], time_dim,
                                          attention=(image_size >> level) in attn_res,
                                          upsample=level != last, **level_kw))
            c_in = dims[level]
        assert not skip_chs, "every stored skip is consumed by the decoder"
        self.out_norm = group_norm(norm_groups, dims[0], "out_norm")
        self.out_conv = conv3x3(dims[0], channels)
        if zero_init:
            zero_init_(self)


@MODELS.register("base")
def build_base(image_size: int, channels: int, hidden_dims: Sequence[int] = (32, 64, 128), time_dim: int = 128,
               num_heads: int = 4, norm_groups: int = 8, dropout: float = 0.0, resample: str = "reference",
               zero_init: bool = False, num_classes: Optional[int] = None) -> DiffusionModel:
    return DiffusionModel(image_size, channels, list(hidden_dims), time_dim, num_heads=num_heads,
                          norm_groups=norm_groups, dropout=dropout, resample=resample, zero_init=zero_init,
                          num_classes=num_classes)


@MODELS.register("cifar")
def build_cifar(image_size: int, channels: int, base_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                time_dim: Optional[int] = None, dropout: float = 0.1, num_res_blocks: int = 2,
                attention_resolutions: Sequence[int] = (16,), num_heads: int = 1, norm_groups: int = 32,
                resample: str = "reference", zero_init: bool = False,
                num_classes: Optional[int] = None) -> DiffusionModelCIFAR:
    """DDPM recipe: hidden_dims = base_channels * channel_mult, time_dim = 4 * base_channels. The resample and
    zero_init defaults rebuild checkpoints saved before they existed; conf/model/cifar.yaml picks the paper's."""
    hidden_dims = [int(base_channels) * int(m) for m in channel_mult]
    return DiffusionModelCIFAR(image_size, channels, hidden_dims, time_dim or 4 * int(base_channels), dropout,
                               num_res_blocks, tuple(attention_resolutions), num_heads, norm_groups, resample, zero_init,
                               num_classes)
