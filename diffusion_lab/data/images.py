"""Image helpers: image files read safely into 8-bit L or RGB, [-1, 1] tensors to uint8 arrays and PNG grids.

Reading an image file trusts nothing in it: a header claiming more than ``max_pixels`` pixels (a
decompression bomb, or a photo far larger than any training size) is refused with one line naming the file
before anything is decoded; a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that is still at least the size
asked for; 16-bit images are scaled to 8 bit (65535 -> 255), not clipped; palette images and images with
transparency are composited onto white; floating-point images are refused.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

PathLike = Union[str, os.PathLike]
MAX_IMAGE_PIXELS = 89_478_485  # PIL's own warning threshold (about 9459 x 9459); data.max_image_pixels
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PNG's 16-bit grey opens as I;16 (older Pillow: I)
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
BACKGROUND = (255, 255, 255, 255)  # what transparent pixels become


class ImageError(ValueError):
    """An image file that cannot be used; the message is one line naming the file."""


def open_image(path: PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """The PIL image of ``path`` with only its header read; ImageError when it is not an image or claims
    more than ``max_pixels`` pixels (PIL's own bomb limit, twice its warning threshold, also holds)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks instead
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as error:
            raise ImageError(f"refusing image {path}: {error}") from error
        except (OSError, ValueError, SyntaxError) as error:  # not an image, truncated header, unreadable
            raise ImageError(f"cannot read image {path}: {_one_line(error)}") from error
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageError(f"refusing image {path}: {im.width}x{im.height} = {im.width * im.height} pixels is more "
                         f"than data.max_image_pixels={max_pixels} (a decompression bomb, or downscale it first)")
    return im


def read_image(path: PathLike, mode: str, size: int = 0, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """``path`` decoded into an 8-bit PIL image of ``mode`` (L or RGB); a JPEG at the smallest scale whose
    sides stay at least ``size`` (0: full size). ImageError (one line naming the file) when it cannot be."""
    from PIL import Image

    with open_image(path, max_pixels) as im:
        if size:
            im.draft(None, (size, size))  # JPEG only: a scaled-down DCT decode; other formats ignore it
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # truncated data
            raise ImageError(f"cannot read image {path}: {_one_line(error)}") from error
        return to_mode(im, mode, path)


def to_mode(im: Any, mode: str, path: PathLike = "image") -> Any:
    """An image of any PIL mode as 8-bit ``mode`` (L or RGB): 16-bit scaled, transparency onto white."""
    from PIL import Image

    if im.mode == "F":
        raise ImageError(f"refusing image {path}: floating-point pixels have no fixed range; save it as 8 or 16 bit")
    if im.mode in SIXTEEN_BIT:
        pixels = np.asarray(im).astype(np.int64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
            raise ImageError(f"refusing image {path}: 32-bit pixels outside 0..65535; save it as 8 or 16 bit")
        im = Image.fromarray((pixels / 257.0).round().astype(np.uint8), "L")
    if im.mode in ALPHA or im.mode == "P" or "transparency" in im.info:
        im = Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND), im.convert("RGBA"))
    return im.convert(mode)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


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
