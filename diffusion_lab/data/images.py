"""Image helpers: [-1, 1] tensors to uint8 arrays and PNG grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import PathLike


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1,1] floats [N,C,H,W] (or [C,H,W]) -> uint8 numpy [N,H,W,C] (or [H,W,C]); -1 -> 0, 1 -> 255."""
    x = images.detach().float().cpu().clamp(-1.0, 1.0)
    x = ((x + 1.0) * 127.5).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 1) if x.dim() == 4 else x.permute(1, 2, 0)
    return x.contiguous().numpy()


def row_labels(num_images: int, per_row: Optional[int], name: str = "class") -> Optional[list]:
    """`class 0`, `class 1`, ... for a grid with one row per class of `per_row` images; None without rows."""
    return None if not per_row else [f"{name} {k}" for k in range(math.ceil(num_images / per_row))]


def caption_image(array: np.ndarray, caption: Optional[str], labels: Optional[Sequence[str]], pitch: int,
                  padding: int):
    """The grid as a PIL image with `caption` in a strip above it and `labels[k]` left of row k (row k starts
    at padding + k * pitch pixels), black text on white."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.fromarray(array).convert("RGB")
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    left = 6 + max((draw.textlength(text, font=font) for text in labels or ()), default=-6)
    top = 16 if caption else 0
    out = Image.new("RGB", (grid.width + int(left), grid.height + top), "white")
    out.paste(grid, (int(left), top))
    draw = ImageDraw.Draw(out)
    if caption:
        draw.text((int(left) + 2, 2), caption, fill="black", font=font)
    for k, text in enumerate(labels or ()):
        draw.text((2, top + padding + k * pitch + pitch // 2 - 6), text, fill="black", font=font)
    return out


def save_grid(
    images: torch.Tensor,
    path: PathLike,
    nrow: Optional[int] = None,
    scale: Optional[int] = None,
    padding: int = 2,
    min_width: int = 256,
    caption: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
) -> Path:
    """Write [-1,1] images [N,C,H,W] as a PNG grid (``nrow`` per row, default ceil(sqrt(N))).

    Each image is upscaled by the integer ``scale`` (nearest); by default the smallest factor that
    makes the grid at least ``min_width`` pixels wide. ``caption`` is written above the grid (e.g. the
    training step) and ``labels[k]`` left of row k (e.g. its class). Returns the path written.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    n, _, h, w = x.shape
    nrow = int(nrow) if nrow else max(1, math.ceil(math.sqrt(n)))
    if scale is None:
        scale = max(1, math.ceil(min_width / (min(nrow, n) * w)))
    if scale != 1:
        x = F.interpolate(x, scale_factor=int(scale), mode="nearest")
    grid = make_grid(x.clamp(-1.0, 1.0), nrow=nrow, padding=padding, pad_value=-1.0)
    array = to_uint8(grid)
    if array.shape[-1] == 1:
        array = array[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if caption or labels:
        image = caption_image(array, caption, labels, pitch=h * int(scale) + padding, padding=padding)
    image.save(path)
    return path
