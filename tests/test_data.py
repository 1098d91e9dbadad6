"""Datasets, the exactly resumable loader, and the image helpers (fast, no network)."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data.datasets import (
    DatasetNotFoundError,
    TensorImageDataset,
    build_dataset,
    folder_split,
    stratified_split,
)
from diffusion_lab.data.images import ImageError, read_image, save_grid, to_uint8
from diffusion_lab.data.loader import ResumableLoader
from diffusion_lab.registry import DATASETS
from tests.helpers import write_tiny_cifar


@pytest.fixture(scope="module")
def digits8():
    return build_dataset("digits")


def test_registered():
    assert {"digits", "cifar10", "folder"} <= set(DATASETS.names())


# ---------------------------------------------------------------------------------------------- digits


def test_digits(digits8):
    ds = digits8
    assert len(ds) == 1438  # the train split
    assert (ds.name, ds.split, ds.channels, ds.image_size, ds.hflip) == ("digits", "train", 1, 8, False)
    assert ds.num_classes == 10 and ds.labels.dtype == torch.long and set(ds.labels.tolist()) == set(range(10))
    x = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0


def test_digits_resized():
    ds = build_dataset("digits", image_size=16)
    assert ds[5].shape == (1, 16, 16) and ds.image_size == 16
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0


def _rows(images):
    return {bytes(x.numpy().tobytes()) for x in images}


def test_digits_split_disjoint_stratified_deterministic():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test = build_dataset("digits"), build_dataset("digits", split="test")
    assert (len(train), len(test)) == (1438, 359) and test.split == "test"
    # disjoint and complete: every image index lands in exactly one split (compare labels+pixels as a multiset)
    every = torch.from_numpy(raw.images).float().unsqueeze(1) / 8.0 - 1.0
    assert sorted(_rows(train.images) | _rows(test.images)) == sorted(_rows(every))
    idx = {s: i for s, i in stratified_split(raw.target, 0.2, 0).items()}
    assert not set(idx["train"]) & set(idx["test"]) and len(idx["train"]) + len(idx["test"]) == 1797
    torch.testing.assert_close(test.images, every[idx["test"]], rtol=0, atol=0)
    # stratified: each digit has round(20%) of its images in test
    for c in range(10):
        n_c = int((raw.target == c).sum())
        assert int((test.labels == c).sum()) == round(0.2 * n_c)
    # deterministic for a seed, different for another
    again = build_dataset("digits", split="test")
    torch.testing.assert_close(again.images, test.images, rtol=0, atol=0)
    other = build_dataset("digits", split="test", split_seed=1)
    assert _rows(other.images) != _rows(test.images)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("digits", split="val")


# --------------------------------------------------------------------------------------------- cifar10


def test_cifar10_tiny_through_torchvision(tmp_path):
    train = write_tiny_cifar(tmp_path)
    # the real files' md5s do not match a tiny fixture: the default (verified) load refuses it cleanly
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        build_dataset("cifar10", root=str(tmp_path), download=False)
    ds = build_dataset("cifar10", root=str(tmp_path), download=False, verify_checksums=False)
    assert len(ds) == 10
    assert (ds.name, ds.channels, ds.image_size, ds.hflip) == ("cifar10", 3, 32, True)
    x = torch.stack([ds[i] for i in range(len(ds))])
    assert x.shape == (10, 3, 32, 32)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert torch.all(x[0] == 1.0)  # 255 -> 1
    assert x[1, 0, 0, 0] == 1.0 and x[1, 1, 0, 0] == -1.0 and x[1, 0, 0, 1] == -1.0  # CHW layout, 0 -> -1
    expected = torch.from_numpy(train.reshape(-1, 3, 32, 32)).float() / 127.5 - 1.0
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    small = build_dataset("cifar10", root=str(tmp_path), download=False, verify_checksums=False, image_size=16)
    assert small[3].shape == (3, 16, 16) and small.image_size == 16
    test = build_dataset("cifar10", root=str(tmp_path), download=False, verify_checksums=False, split="test")
    assert len(test) == 2 and test.split == "test"  # the official test_batch (2 images per file here)
    import pickle

    written = [pickle.load(open(tmp_path / "cifar-10-batches-py" / f"data_batch_{i}", "rb"))["labels"] for i in range(1, 6)]
    assert ds.labels.tolist() == sum(written, []) and ds.num_classes == 10
    assert not _rows(torch.stack([test[i] for i in range(2)])) & _rows(x)


def test_cifar10_missing(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("cifar10", root=str(root), download=False)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(root) in msg and "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg
    assert isinstance(info.value, RuntimeError)


def test_cifar10_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_LAB_DATA", str(tmp_path / "envroot"))
    with pytest.raises(DatasetNotFoundError, match="envroot"):
        build_dataset("cifar10", download=False)


# ---------------------------------------------------------------------------------------------- folder


def test_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sub").mkdir()
    sizes = [(20, 30), (40, 17), (16, 16)]
    for i, (w, h) in enumerate(sizes):
        arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / ("sub" if i == 1 else ".") / f"im{i}.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "gray.jpg")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset("folder", root=str(tmp_path), image_size=16)
    held_out = build_dataset("folder", root=str(tmp_path), image_size=16, split="test")
    assert (len(ds), len(held_out)) == (3, 1) and ds.channels == 3 and ds.hflip  # 4 images, 10% -> at least 1
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 16, 16)
        assert x.min() >= -1.0 and x.max() <= 1.0
    gray = build_dataset("folder", root=str(tmp_path), image_size=8, channels=1)
    assert gray[0].shape == (1, 8, 8)


def test_folder_splits(tmp_path):
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i * 10, np.uint8)).save(tmp_path / f"im{i:02d}.png")
    files = sorted(tmp_path.glob("*.png"))
    split = folder_split(files, tmp_path, 0.1, 0)
    assert len(split["test"]) == 2 and len(split["train"]) == 18 and not set(split["test"]) & set(split["train"])
    assert folder_split(files, tmp_path, 0.1, 0) == split and folder_split(files, tmp_path, 0.1, 1) != split
    train, test = (build_dataset("folder", root=str(tmp_path), image_size=8, split=s) for s in ("train", "test"))
    assert (len(train), len(test)) == (18, 2)
    # a val/ subfolder is the test split
    (tmp_path / "val").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / f"v{i}.png")
    train, test = (build_dataset("folder", root=str(tmp_path), image_size=8, split=s) for s in ("train", "test"))
    assert (len(train), len(test)) == (20, 3) and all(test[i].max() == -1.0 for i in range(3))


def test_folder_labels_from_class_subfolders(tmp_path):
    """One subfolder per class gives labels (sorted names, the same indices in val/); a flat folder has none."""
    for name, n in (("cat", 3), ("ant", 2), ("val/cat", 1), ("val/bee", 1)):
        (tmp_path / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "bee").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bee" / "0.png")
    train, test = (build_dataset("folder", root=str(tmp_path), image_size=8, split=s) for s in ("train", "test"))
    assert train.num_classes == test.num_classes == 3  # ant, bee, cat
    assert train.labels.tolist() == [0, 0, 1, 2, 2, 2]  # files sorted: ant/0, ant/1, bee/0, cat/0..2
    assert test.labels.tolist() == [1, 2]  # val/bee/0, val/cat/0
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "loose.png")  # one image outside any class
    assert build_dataset("folder", root=str(tmp_path), image_size=8).labels is None


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no images"):
        build_dataset("folder", root=str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="not found"):
        build_dataset("folder", root=str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------- untrusted image files


def png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height (a decompression bomb's header, without its data)."""
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR's CRC over type + fields
    path.write_bytes(bytes(data))
    return path


def folder_with(tmp_path, name):
    """A folder whose train split is [name, ok.png] (sorted: `name` first) and whose val/ holds one image."""
    (tmp_path / "val").mkdir()
    for path in (tmp_path / "ok.png", tmp_path / "val" / "v.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    return tmp_path / name


def test_a_bomb_header_is_refused_with_one_line_naming_the_file(tmp_path):
    bomb = png_claiming(folder_with(tmp_path, "bomb.png"), 30000, 30000)
    with pytest.raises(ImageError, match="refusing image .*bomb.png") as info:
        read_image(bomb, "RGB", 32)
    assert "\n" not in str(info.value)
    ds = build_dataset("folder", root=str(tmp_path), image_size=8)
    assert ds.base.files[0] == bomb and ds[1].shape == (3, 8, 8)
    with pytest.raises(DatasetNotFoundError, match="refusing image .*bomb.png"):
        ds[0]


def test_max_image_pixels_refuses_large_images_before_decoding(tmp_path):
    big = folder_with(tmp_path, "big.png")
    Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(big)
    ds = build_dataset("folder", root=str(tmp_path), image_size=8, max_image_pixels=10_000)
    assert ds.base.files[0] == big and ds[1].shape == (3, 8, 8)
    with pytest.raises(DatasetNotFoundError, match=r"big.png: 120x100 = 12000 pixels .*max_image_pixels=10000"):
        ds[0]
    assert build_dataset("folder", root=str(tmp_path), image_size=8, max_image_pixels=12_000)[0].shape == (3, 8, 8)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 2000, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    assert read_image(tmp_path / "a.jpg", "RGB", 32).size == (250, 200)  # 1/8 scale, still >= 32 a side
    assert read_image(tmp_path / "a.jpg", "RGB", 400).size == (500, 400)  # 1/4: 1/8 would be under 400
    assert read_image(tmp_path / "a.jpg", "RGB").size == (2000, 1600)


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    gray = np.asarray(read_image(tmp_path / "deep.png", "L"))
    np.testing.assert_array_equal(gray, np.round(ramp / 257.0).astype(np.uint8))
    assert (gray == 255).mean() < 0.01  # convert("L") would make 99.6% of the pixels white
    rgb = np.asarray(read_image(tmp_path / "deep.png", "RGB"))
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == gray).all()


def test_palette_and_transparent_images_are_composited_onto_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, 0], rgba[2:, :, 2] = 200, 99  # top half red, bottom half blue
    rgba[:2, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    palette = Image.fromarray((np.arange(4)[:, None] >= 2).repeat(4, 1).astype(np.uint8), "P")  # 0 top, 1 bottom
    palette.putpalette([200, 0, 0, 0, 0, 99])
    palette.save(tmp_path / "p.png", transparency=1)
    for name in ("rgba.png", "p.png"):
        out = np.asarray(read_image(tmp_path / name, "RGB"))
        assert (out[2:] == 255).all(), name  # transparent -> white, not the hidden colour or black
        assert (out[:2, :, 0] == 200).all() and (out[:2, :, 1:] == 0).all(), name
    la = np.asarray(read_image(tmp_path / "la.png", "L"))
    assert (la[2:] == 255).all() and (la[:2] == la[0, 0]).all() and la[0, 0] < 255


def test_a_folder_of_files_that_are_not_images_holds_no_readable_images(tmp_path):
    for i in range(2):
        (tmp_path / f"{i}.png").write_text("just text")
    with pytest.raises(DatasetNotFoundError, match="holds no readable images"):
        build_dataset("folder", root=str(tmp_path), image_size=8)


# ------------------------------------------------------------------------------------- ResumableLoader


def _take(loader, k):
    return [next(loader)[0] for _ in range(k)]


def _small_digits(n=50):
    full = build_dataset("digits")
    return TensorImageDataset(full.images[:n].clone(), name="digits50", hflip=False)


def test_loader_same_seed_same_batches():
    ds = _small_digits()
    a, b = _take(ResumableLoader(ds, 16, seed=3), 6), _take(ResumableLoader(ds, 16, seed=3), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = _take(ResumableLoader(ds, 16, seed=4), 6)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert a[0].shape == (16, 1, 8, 8)


def test_loader_epochs_are_permutations_drop_last():
    ds = TensorImageDataset(torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone(), "ids", False)
    loader = ResumableLoader(ds, 4, seed=0)
    assert loader.steps_per_epoch == 2
    for epoch in range(3):
        ids = torch.cat([b[:, 0, 0, 0] for b in _take(loader, 2)]).long()
        assert len(set(ids.tolist())) == 8  # 8 distinct of 10, last incomplete batch dropped
        assert loader.state_dict() == {"epoch": epoch + 1, "index": 0}


@pytest.mark.parametrize("hflip", [False, True])
def test_loader_resume_is_exact(hflip):
    ds = _small_digits()  # 50 images, batch 16 -> 3 batches per epoch
    reference = _take(ResumableLoader(ds, 16, seed=7, hflip=hflip), 8)
    first = ResumableLoader(ds, 16, seed=7, hflip=hflip)
    _take(first, 2)
    state = first.state_dict()
    assert state == {"epoch": 0, "index": 2}
    assert first.epoch_fraction == pytest.approx(2 / 3)
    resumed = ResumableLoader(ds, 16, seed=7, hflip=hflip)
    resumed.load_state_dict(state)
    rest = _take(resumed, 6)  # crosses the epoch boundaries at batch 3 and 6
    assert all(torch.equal(x, y) for x, y in zip(reference[2:], rest))
    assert resumed.state_dict() == {"epoch": 2, "index": 2}


def test_loader_flips_some_images_reproducibly():
    ds = _small_digits()
    plain = _take(ResumableLoader(ds, 16, seed=1, hflip=False), 3)
    flipped = _take(ResumableLoader(ds, 16, seed=1, hflip=True), 3)
    again = _take(ResumableLoader(ds, 16, seed=1, hflip=True), 3)
    n_flipped = n_same = 0
    for p, f, g in zip(plain, flipped, again):
        assert torch.equal(f, g)
        for pi, fi in zip(p, f):
            if torch.equal(pi, fi):
                n_same += 1
            else:
                assert torch.equal(pi.flip(-1), fi)
                n_flipped += 1
    assert n_flipped > 5 and n_same > 5


def test_loader_dataloader_path_matches_and_resumes(tmp_path):
    """A dataset without an in-memory tensor goes through a DataLoader; same stream, same resume."""
    full = _small_digits()

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(full)

        def __getitem__(self, i):
            return full.images[i].clone(), 0  # (image, label) items are accepted too

    fast = _take(ResumableLoader(full, 16, seed=5, hflip=True), 5)
    slow = ResumableLoader(ListDataset(), 16, seed=5, hflip=True)
    got = _take(slow, 2)
    slow2 = ResumableLoader(ListDataset(), 16, seed=5, hflip=True, num_workers=2)  # worker processes
    slow2.load_state_dict(slow.state_dict())
    got += _take(slow2, 3)
    assert all(torch.equal(x, y) for x, y in zip(fast, got))


def _id_dataset(n=50, classes=7):
    """Image i holds the value i everywhere, label i % classes: a batch's labels can be checked against its images."""
    images = torch.arange(float(n)).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    return TensorImageDataset(images, "ids", False, labels=torch.arange(n) % classes, num_classes=classes)


@pytest.mark.parametrize("hflip", [False, True])
def test_loader_labels_ride_with_images_and_resume_exactly(hflip):
    ds = _id_dataset()
    stream = ResumableLoader(ds, 16, seed=7, hflip=hflip)
    reference = [next(stream) for _ in range(8)]
    for x, y in reference:
        assert y.dtype == torch.long and torch.equal(y, x[:, 0, 0, 0].long() % 7)
    first = ResumableLoader(ds, 16, seed=7, hflip=hflip)
    [next(first) for _ in range(2)]
    resumed = ResumableLoader(ds, 16, seed=7, hflip=hflip)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (rx, ry) in zip(reference[2:], [next(resumed) for _ in range(6)]):  # across two epoch ends
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_loader_labels_through_the_dataloader_path():
    full = _id_dataset()

    class FileLike(torch.utils.data.Dataset):  # no in-memory images: the DataLoader path, labels by attribute
        labels = full.labels

        def __len__(self):
            return len(full)

        def __getitem__(self, i):
            return full.images[i].clone()

    fast, slow = ResumableLoader(full, 16, seed=5), ResumableLoader(FileLike(), 16, seed=5)
    for _ in range(5):
        (x, y), (sx, sy) = next(fast), next(slow)
        assert torch.equal(x, sx) and torch.equal(y, sy)
    unlabelled = TensorImageDataset(full.images, "ids", False)
    assert unlabelled.num_classes is None and next(ResumableLoader(unlabelled, 16, seed=5))[1] is None


def test_loader_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="batch_size"):
        ResumableLoader(_small_digits(10), 16, seed=0)


# --------------------------------------------------------------------------------------------- helpers


def test_to_uint8():
    x = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 5, 3)
    assert out[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255]


def test_save_grid(tmp_path, digits8):
    path = save_grid(digits8.images[:64], tmp_path / "grids" / "digits.png")
    with Image.open(path) as im:
        w, h = im.size
    # 8 per row, 8x8 upscaled x4 = 32 px, padding 2: 8 * 34 + 2 = 274
    assert (w, h) == (274, 274) and w >= 256
    path = save_grid(torch.zeros(6, 3, 4, 4), tmp_path / "rgb.png", nrow=3, scale=1)
    with Image.open(path) as im:
        assert im.size == (3 * 6 + 2, 2 * 6 + 2)
