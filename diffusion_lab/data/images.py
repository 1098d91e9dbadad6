"""Image helpers: [-1, 1] tensors to uint8 arrays and PNG grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

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


def save_grid(
    images: torch.Tensor,
    path: PathLike,
    nrow: Optional[int] = None,
    scale: Optional[int] = None,
    padding: int = 2,
    min_width: int = 256,
) -> Path:
    """Write [-1,1] images [N,C,H,W] as a PNG grid (``nrow`` per row, default ceil(sqrt(N))).

    Each image is upscaled by the integer ``scale`` (nearest); by default the smallest factor that
    makes the grid at least ``min_width`` pixels wide. Returns the path written.
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
    Image.fromarray(array).save(path)
    return path
