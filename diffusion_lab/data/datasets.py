"""Datasets: images as float [C,H,W] in [-1, 1], with their split, size and labels.

Every dataset builder is registered in ``DATASETS`` and returns an ``ImageDataset``: a
``torch.utils.data.Dataset`` whose items are image tensors only and which carries
``.name``, ``.split``, ``.channels``, ``.image_size``, ``.hflip`` (whether random horizontal flips
make sense) and, for labelled data, ``.labels`` (LongTensor [N] of class indices) and ``.num_classes``
(both None for unlabelled data). Every builder takes ``split``: ``train`` (what training reads) or ``test`` (held out, the
default FID reference): digits a seeded class-stratified split, CIFAR-10 the official one, a folder its
``val/`` subfolder or a seeded fraction of its files.
"""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..registry import DATASETS
from .images import MAX_IMAGE_PIXELS, ImageError, read_image

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
DATA_ENV_VAR = "DIFFUSION_LAB_DATA"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "test")
_DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


class DatasetNotFoundError(RuntimeError):
    """The dataset's files are missing (or unreadable) and could not be fetched; the message is one line."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------------------
# Dataset classes


class ImageDataset(Dataset):
    """Base class: items are image tensors [C,H,W] in [-1, 1]; ``labels`` [N] and ``num_classes`` when labelled."""

    def __init__(self, name: str, channels: int, image_size: int, hflip: bool, split: str = "train",
                 labels: Optional[Sequence[int]] = None, num_classes: Optional[int] = None):
        self.name = name
        self.split = split
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.hflip = bool(hflip)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.num_classes = None if labels is None else int(num_classes or int(self.labels.max()) + 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, channels={self.channels}, "
            f"image_size={self.image_size}, hflip={self.hflip})"
        )


class TensorImageDataset(ImageDataset):
    """All images held in memory as one float tensor ``images`` [N,C,H,W] (ResumableLoader fast path);
    ``labels`` [N] (class indices) when the data has them."""

    def __init__(self, images: torch.Tensor, name: str, hflip: bool, split: str = "train",
                 labels: Optional[torch.Tensor] = None, num_classes: Optional[int] = None):
        if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be [N,C,S,S], got {tuple(images.shape)}")
        super().__init__(name, images.shape[1], images.shape[-1], hflip, split, labels, num_classes)
        self.images = images.contiguous()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class TransformImageDataset(ImageDataset):
    """Wraps a dataset whose items are ``image`` or ``(image, label, ...)``; items are the image, the
    labels (when given) are the ``labels`` tensor."""

    def __init__(self, base: Dataset, name: str, channels: int, image_size: int, hflip: bool, split: str = "train",
                 labels: Optional[Sequence[int]] = None, num_classes: Optional[int] = None):
        super().__init__(name, channels, image_size, hflip, split, labels, num_classes)
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.base[index]
        return item[0] if isinstance(item, (tuple, list)) else item


class FirstImages(ImageDataset):
    """The first ``n`` images of ``base`` (its ``images`` and ``labels`` cut to match), never flipped: one fixed
    set of pixels to overfit (``train.overfit_batches``)."""

    def __init__(self, base: ImageDataset, n: int):
        super().__init__(base.name, base.channels, base.image_size, hflip=False, split=base.split)
        self.base, self.n = base, min(int(n), len(base))  # type: ignore[arg-type]
        for attribute in ("images", "labels"):
            value = getattr(base, attribute, None)
            if isinstance(value, torch.Tensor):
                setattr(self, attribute, value[: self.n])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        return self.base[index % self.n]


class _ImageFiles(Dataset):
    """Image files read by ``images.read_image`` (size: the shorter side the transform resizes to)."""

    def __init__(self, files: Sequence[Path], mode: str, transform: Any, size: int = 0,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.files = list(files)
        self.mode = mode
        self.transform = transform
        self.size, self.max_pixels = int(size), int(max_pixels)

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> Any:
        """The PIL image of file ``index``; DatasetNotFoundError (one line naming it) when unreadable."""
        try:
            return read_image(self.files[index], self.mode, self.size, self.max_pixels)
        except ImageError as error:
            raise DatasetNotFoundError(str(error)) from error

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.read(index))

    def check_readable(self, root: Path) -> None:
        """At least one file decodes (the first that does ends the search), else one line saying none does."""
        for index in range(len(self.files)):
            try:
                self.read(index)
                return
            except DatasetNotFoundError as error:
                reason = str(error)
        raise DatasetNotFoundError(f"image folder {root} holds no readable images: {len(self.files)} file(s) "
                                   f"named as images, none decodes (the last: {reason})")


def _to_minus_one_one(channels: int) -> List[Any]:
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize((0.5,) * channels, (0.5,) * channels)]


# --------------------------------------------------------------------------------------------------
# Builders


def build_dataset(name: str, **params: Any) -> ImageDataset:
    """``DATASETS.build(name, **params)``."""
    return DATASETS.build(name, **params)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; known: {', '.join(SPLITS)}")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """Sorted indices of a class-stratified split: round(test_fraction * n_c) of each class go to test,
    drawn by a generator seeded with ``seed``; the rest is train. Disjoint, and the same for the same seed."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.append(rng.permutation(members)[: int(round(test_fraction * len(members)))])
    test_idx = np.sort(np.concatenate(test))
    return {"train": np.setdiff1d(np.arange(len(labels)), test_idx), "test": test_idx}


@DATASETS.register("digits")
def digits(image_size: int = 8, split: str = "train", test_fraction: float = 0.2, split_seed: int = 0) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 handwritten digits (no download), 1 channel, optionally resized (bilinear).

    ``split``: a class-stratified ``test_fraction`` of each digit, chosen with ``split_seed``, is held out
    as ``test`` (359 images at the defaults 0.2 and 0); ``train`` is the other 1438. ``labels`` are kept.
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    raw = load_digits()
    idx = stratified_split(raw.target, test_fraction, split_seed)[split]
    x = torch.from_numpy(raw.images[idx]).float().unsqueeze(1) / 8.0 - 1.0  # values 0..16 -> [-1, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(-1.0, 1.0)
    return TensorImageDataset(x, name="digits", hflip=False, split=split, labels=torch.from_numpy(raw.target[idx]),
                              num_classes=10)


def default_cifar10_root() -> str:
    """$DIFFUSION_LAB_DATA if set, else ~/.cache/diffusion_lab/cifar10."""
    env = os.environ.get(DATA_ENV_VAR)
    return os.path.expanduser(env) if env else os.path.expanduser("~/.cache/diffusion_lab/cifar10")


def _cifar10_missing(root: str, why: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        _one_line(
            f"CIFAR-10 not found at {root} ({why}): put the extracted '{CIFAR10_FOLDER}' folder "
            f"(data_batch_1..5, test_batch, batches.meta) in {root}, e.g. download {CIFAR10_URL} "
            f"and run 'tar -xzf cifar-10-python.tar.gz -C {root}' (or set data.root / ${DATA_ENV_VAR})"
        )
    )


@DATASETS.register("cifar10")
def cifar10(
    image_size: int = 32,
    root: Optional[str] = None,
    download: bool = True,
    verify_checksums: bool = True,
    split: str = "train",
) -> TransformImageDataset:
    """CIFAR-10's official split through torchvision's loader (50k train, 10k test images), RGB, hflip True.

    ``verify_checksums=False`` loads through the very same torchvision code but with the per-file md5
    values set to None (torchvision's ``check_integrity`` then only checks that the files exist): for
    tiny CIFAR-format test fixtures or re-packed copies. The download is only attempted when the
    ``cifar-10-batches-py`` folder does not exist; network errors become ``DatasetNotFoundError``.
    """
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    _check_split(split)
    root = os.path.abspath(os.path.expanduser(root)) if root else os.path.abspath(default_cifar10_root())
    folder = os.path.join(root, CIFAR10_FOLDER)
    if not os.path.isdir(folder):
        if not download:
            raise _cifar10_missing(root, f"no {CIFAR10_FOLDER} folder and download=False")
        previous_timeout = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT_S)
        try:
            download_and_extract_archive(CIFAR10.url, root, filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        except Exception as err:  # URLError, socket timeout, OSError, RuntimeError (bad md5), tarfile errors
            raise _cifar10_missing(root, f"download failed: {type(err).__name__}: {err}") from err
        finally:
            socket.setdefaulttimeout(previous_timeout)

    cls = CIFAR10 if verify_checksums else _cifar10_without_checksums()
    tfs = ([T.Resize(image_size, antialias=True)] if image_size != 32 else []) + _to_minus_one_one(3)
    try:
        base = cls(root, train=split == "train", transform=T.Compose(tfs), download=False)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as err:
        raise _cifar10_missing(root, f"files missing or corrupted: {type(err).__name__}: {err}") from err
    return TransformImageDataset(base, name="cifar10", channels=3, image_size=image_size, hflip=True, split=split,
                                 labels=base.targets, num_classes=len(base.classes))


@functools.lru_cache(maxsize=None)
def _cifar10_without_checksums() -> type:
    """torchvision's CIFAR10 with every md5 set to None (built lazily: torchvision is slow to import)."""
    from torchvision.datasets import CIFAR10

    class CIFAR10WithoutChecksums(CIFAR10):
        """Same loading code; torchvision's ``check_integrity(path, None)`` only checks the file exists."""

        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return CIFAR10WithoutChecksums


def folder_split(files: Sequence[Path], root: Path, val_fraction: float, seed: int) -> Dict[str, List[Path]]:
    """Files under ``root/val`` are the test split when that folder exists; otherwise a seeded
    ``val_fraction`` of the (sorted) files, at least one, is held out."""
    val = root / "val"
    if val.is_dir():
        return {"train": [f for f in files if val not in f.parents], "test": [f for f in files if val in f.parents]}
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(files))
    held = set(order[: max(1, int(round(val_fraction * len(files))))].tolist())
    return {"train": [f for i, f in enumerate(files) if i not in held], "test": [f for i, f in enumerate(files) if i in held]}


@DATASETS.register("folder")
def folder(root: str, image_size: int = 64, channels: int = 3, split: str = "train", val_fraction: float = 0.1,
           split_seed: int = 0, max_image_pixels: int = MAX_IMAGE_PIXELS) -> TransformImageDataset:
    """Every png/jpg/jpeg/bmp/webp under ``root`` (recursive, sorted), shorter side resized then center-cropped;
    ``split`` as in ``folder_split``; labelled by class subfolder as in ``folder_classes``. Files are read by
    ``images.read_image``: more than ``max_image_pixels`` pixels is refused, 16-bit is scaled to 8 bit,
    transparency composited onto white. A split none of whose files decodes is refused up front."""
    from torchvision import transforms as T

    _check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"folder dataset: channels must be 1 (L) or 3 (RGB), got {channels}")
    path = Path(os.path.expanduser(str(root))).resolve()
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder not found: {path} (set data.root to a folder of images)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DatasetNotFoundError(
            f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {path}"
        )
    classes = folder_classes(files, path)
    files = folder_split(files, path, val_fraction, split_seed)[split]
    if not files:
        raise DatasetNotFoundError(f"the {split} split of {path} has no images (too few files, or an empty val/)")
    tf = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size)] + _to_minus_one_one(channels))
    if max_image_pixels < 1:
        raise ValueError(f"folder dataset: max_image_pixels must be >= 1, got {max_image_pixels}")
    base = _ImageFiles(files, "RGB" if channels == 3 else "L", tf, image_size, max_image_pixels)
    base.check_readable(path)
    labels = [classes.index(_class_folder(f, path)) for f in files] if classes else None
    return TransformImageDataset(base, name=f"folder:{path.name}", channels=channels, image_size=image_size,
                                 hflip=True, split=split, labels=labels, num_classes=len(classes) or None)


def _class_folder(file: Path, root: Path) -> Optional[str]:
    """The first folder of ``file`` below ``root`` (below ``root/val`` for held-out files); None at the top."""
    parts = file.relative_to(root).parts
    parts = parts[1:] if parts[0] == "val" and (root / "val").is_dir() else parts
    return parts[0] if len(parts) > 1 else None


def folder_classes(files: Sequence[Path], root: Path) -> List[str]:
    """Sorted class names when every image lies in a class subfolder (``root/cat/1.png``, ``root/val/cat/2.png``),
    the same for both splits; [] (unlabelled) when any image lies directly in ``root`` (or ``root/val``)."""
    names = [_class_folder(f, root) for f in files]
    return [] if None in names else sorted(set(names))
