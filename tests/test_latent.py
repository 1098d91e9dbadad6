"""Latent diffusion (`latent=`): PCA's exact round trip, the per-channel scaling, the latent cache, exact resume,
the codec hash check, decoding in train / sample / evaluate, and a diffusers AutoencoderKL folder."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_lab.config.latent import build_latent, parse, restore_latent
from diffusion_lab.config.trained import generate, load_trained
from diffusion_lab.data.datasets import build_dataset
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.errors import ConfigError
from diffusion_lab.latent import space as latent_space
from diffusion_lab.latent.pca import MIN_RELATIVE_STD, PCACodec
from diffusion_lab.latent.space import LatentSpace, cached_latents, channel_stats
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint
from diffusion_lab.training.checkpoint import CheckpointError
from tests.helpers import TINY, compose_config, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def latent_run(tmp_path, *extra):
    """TINY training overrides in latent space, with the latent cache inside tmp_path."""
    return TINY + ["logger=none", f"latent_space.cache_dir={tmp_path / 'cache'}", *extra]


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits", split="train")


def test_parse_names_every_kind():
    assert parse("pca") == ("pca", "")
    assert parse("diffusers:/models/vae") == ("diffusers", "/models/vae")
    assert parse("outputs/autoencoder/run") == ("autoencoder", "outputs/autoencoder/run")
    assert parse("pcaruns/x") == ("autoencoder", "pcaruns/x"), "only the exact prefix names a kind"


def test_pca_with_every_component_is_an_exact_whitened_round_trip(digits):
    """64 components of 8x8 digits: decode(encode(x)) = x, and every component has unit variance."""
    codec = PCACodec.fit(digits.images, channels=1, factor=1)
    z = codec.encode(digits.images)
    assert z.shape == (len(digits), 1, 8, 8)
    assert torch.allclose(codec.decode(z), digits.images, atol=1e-4)
    std = z.flatten(1).std(0)
    informative = codec.scales > 1.01 * codec.scales[0] * MIN_RELATIVE_STD  # a few border pixels never change
    assert 0 < int((~informative).sum()) < 8
    assert torch.allclose(std[informative], torch.ones(int(informative.sum())), atol=1e-3)
    assert (std[~informative] < 1e-3).all(), "directions without variance are not whitened into noise"
    fewer = PCACodec.fit(digits.images, channels=1, factor=2)  # 16 components: a projection, not the identity
    error = (fewer.decode(fewer.encode(digits.images)) - digits.images).pow(2).mean()
    assert 0 < error < digits.images.var(), "the top 16 components explain most but not all of the variance"


def test_pca_refuses_more_components_than_the_data_has(digits):
    with pytest.raises(ValueError, match="exceed"):
        PCACodec.fit(digits.images[:10], channels=1, factor=1)
    with pytest.raises(ValueError, match="does not divide"):
        PCACodec.fit(digits.images, channels=1, factor=3)


class AffineCodec:
    """A codec with known channel offsets and scales: raw latent channel c = a_c x + b_c."""

    def __init__(self):
        self.a, self.b = torch.tensor([3.0, 0.5]), torch.tensor([1.0, -2.0])
        self.identity = {"kind": "affine", "path": None, "sha256": "0" * 64}
        self.calls = 0

    def encode(self, x):
        self.calls += 1
        return x.expand(-1, 2, -1, -1) * self.a.view(1, 2, 1, 1) + self.b.view(1, 2, 1, 1)

    def decode(self, z):
        return ((z - self.b.view(1, 2, 1, 1)) / self.a.view(1, 2, 1, 1)).mean(1, keepdim=True)

    def tensors(self):
        return {}


@pytest.mark.parametrize("target_std", [1.0, 0.5])
def test_scaling_standardises_every_channel_and_decode_inverts_it(digits, target_std):
    codec = AffineCodec()
    raw = codec.encode(digits.images)
    space = LatentSpace(codec, *channel_stats(raw), target_std)
    z = space.scale(raw)
    per_channel = z.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.full((2,), target_std), atol=1e-5)
    assert torch.allclose(space.decode(z), digits.images, atol=1e-5), "decode undoes the scaling and the codec"


def test_latents_are_encoded_once_and_read_back_from_the_cache(digits, tmp_path, monkeypatch):
    codec = AffineCodec()
    first = cached_latents(codec, digits, {"name": "digits"}, torch.device("cpu"), tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and codec.calls > 0
    monkeypatch.setattr(latent_space, "encode_all", lambda *a, **k: pytest.fail("encoded again"))
    assert torch.equal(cached_latents(codec, digits, {"name": "digits"}, torch.device("cpu"), tmp_path), first)
    monkeypatch.undo()
    other = AffineCodec()
    other.identity = {**other.identity, "sha256": "1" * 64}
    cached_latents(other, digits, {"name": "digits"}, torch.device("cpu"), tmp_path)
    cached_latents(codec, digits, {"name": "digits", "image_size": 16}, torch.device("cpu"), tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3, "another codec or other data is another cache file"
    files[0].write_bytes(b"not a safetensors file")
    assert torch.equal(cached_latents(codec, digits, {"name": "digits"}, torch.device("cpu"), tmp_path), first), \
        "a damaged cache file is encoded again"


@pytest.fixture(scope="module")
def pca_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pca")
    summary = train(compose_config(latent_run(tmp, "latent=pca", "latent_space.pca_channels=2",
                                              "latent_space.pca_factor=2")), tmp / "run")
    return tmp, tmp / "run", summary


def test_a_pca_run_diffuses_latents_and_shows_pixels(pca_run):
    tmp, run_dir, summary = pca_run
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert tuple(state["image_shape"]) == (2, 4, 4), "the U-Net is sized from the latent shape"
    record = state["latent"]
    assert record["identity"]["kind"] == "pca" and record["pixel_shape"] == [1, 8, 8]
    assert np.isfinite(summary["final_fid"]), "FID decodes the samples (against 1x8x8 digits)"
    from PIL import Image

    from diffusion_lab.data.images import save_grid
    pixel_grid = save_grid(torch.zeros(4, 1, 8, 8), tmp / "pixel_grid.png", nrow=None, caption="step 6 (EMA model)")
    grid = Image.open(sorted((run_dir / "samples").glob("*.png"))[-1])
    assert grid.size == Image.open(pixel_grid).size, "the sample grid shows 4 decoded 8x8 images, not 2x4x4 latents"
    trained = load_trained(run_dir, torch.device("cpu"))
    images = generate(trained, build_sampler("ddim", steps=3), 5, 5, 0, torch.device("cpu"), progress=False)
    assert images.shape == (5, 1, 8, 8) and images.abs().max() <= 1.0
    assert len(list((tmp / "cache").glob("*.safetensors"))) == 1


def test_resume_in_latent_space_is_exact_and_checks_the_codec(tmp_path):
    base = latent_run(tmp_path, "latent=pca", "eval.every=0", "train.lr_schedule=constant")
    train(compose_config(base), tmp_path / "straight")
    train(compose_config([o for o in base if not o.startswith("train.steps")] + ["train.steps=3"]), tmp_path / "a")
    first = tmp_path / "a" / "checkpoints" / "last.pt"
    train(compose_config(base + [f"train.resume={first}"]), tmp_path / "b")
    one, two = (checkpoint.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("straight", "b"))
    assert all(torch.equal(v, two["model"][k]) for k, v in one["model"].items())
    state = checkpoint.load(first)
    state["latent"]["tensors"]["components"] = state["latent"]["tensors"]["components"] * 2  # another basis
    checkpoint.save(first, state)
    with pytest.raises(ConfigError, match="now holds another one"):
        train(compose_config(base + [f"train.resume={first}"]), tmp_path / "c")
    with pytest.raises(CheckpointError, match="now holds another one"):
        load_trained(first, torch.device("cpu"))


def test_a_teacher_in_another_space_is_refused(pca_run, tmp_path):
    teacher = tmp_path / "teacher"
    train(compose_config(TINY + ["logger=none", "eval.every=0"]), teacher)  # pixel space
    cfg = compose_config(latent_run(tmp_path, "latent=pca", "objective=consistency", "objective.method=cd",
                                    f"train.teacher={teacher}", "train.init_from_teacher=false", "eval.every=0"))
    with pytest.raises(Exception, match="pixel space, this run in the latent space of pca"):
        train(cfg, tmp_path / "student")


@pytest.mark.parametrize("extra", [
    ["schedule=edm", "objective=edm", "sampler=heun", "sampler.steps=3"],
    ["schedule=flow", "objective=flow", "sampler=euler", "sampler.steps=3"],
    ["model.num_classes=auto", "sampler.guidance_scale=2.0"],
])
def test_latent_space_works_with_other_processes_and_guidance(tmp_path, extra):
    summary = train(compose_config(latent_run(tmp_path, "latent=pca", "train.steps=3", "eval.every=3",
                                              *extra)), tmp_path / "run")
    assert np.isfinite(summary["final_fid"]) and summary["steps"] == 3


def test_sample_and_evaluate_decode_a_latent_checkpoint(pca_run, tmp_path):
    _, run_dir, _ = pca_run
    sampled = run_cli("diffusion_lab.sample", [f"checkpoint={run_dir}", "num_samples=6", "sampler=ddim",
                                               "sampler.steps=3", f"hydra.run.dir={tmp_path / 's'}"], cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert np.load(tmp_path / "s" / "samples.npz")["images"].shape == (6, 8, 8, 1)
    evaluated = run_cli("diffusion_lab.evaluate", [f"checkpoint={run_dir}", "samplers=[{name:ddim,steps:3}]",
                                                   "num_samples=40", "eval.batch_size=20",
                                                   f"hydra.run.dir={tmp_path / 'e'}"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    rows = json.loads((tmp_path / "e" / "fid_vs_cost.json").read_text())["rows"]
    assert len(rows) == 1 and np.isfinite(rows[0]["fid"])


# ------------------------------------------------------------------------------------------------
# A diffusers AutoencoderKL folder (a tiny random one, saved here: nothing is downloaded)


def save_vae(folder, seed):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                        norm_num_groups=4, layers_per_block=1, sample_size=8)
    vae.save_pretrained(folder, safe_serialization=True)


def test_a_diffusers_folder_is_a_latent_space_and_a_swapped_one_is_refused(tmp_path):
    vae = tmp_path / "vae"
    save_vae(vae, seed=0)
    cfg = compose_config(latent_run(tmp_path, f"latent=diffusers:{vae}", "eval.every=0", "train.steps=3"))
    train(cfg, tmp_path / "run")
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert tuple(state["image_shape"]) == (2, 4, 4) and state["latent"]["identity"]["kind"] == "diffusers"
    trained = load_trained(tmp_path / "run", torch.device("cpu"))
    images = generate(trained, build_sampler("ddim", steps=2), 3, 3, 0, torch.device("cpu"), progress=False)
    assert images.shape == (3, 1, 8, 8)
    save_vae(vae, seed=1)  # other weights in the same folder
    with pytest.raises(CheckpointError, match="now holds another one"):
        load_trained(tmp_path / "run", torch.device("cpu"))
    resume = latent_run(tmp_path, f"latent=diffusers:{vae}", "eval.every=0", f"train.resume={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match="now holds another one"):
        train(compose_config(resume + ["train.steps=4"]), tmp_path / "run2")


def test_a_folder_without_a_safetensors_autoencoder_is_one_line(tmp_path, digits):
    cfg = compose_config(latent_run(tmp_path, f"latent=diffusers:{tmp_path / 'nothing'}"))
    with pytest.raises(CheckpointError, match="no diffusers AutoencoderKL folder"):
        build_latent(cfg, digits, torch.device("cpu"))
    save_vae(tmp_path / "bin", seed=0)
    for file in (tmp_path / "bin").glob("*.safetensors"):
        torch.save({}, file.with_suffix(".bin"))
        file.unlink()
    cfg = compose_config(latent_run(tmp_path, f"latent=diffusers:{tmp_path / 'bin'}"))
    with pytest.raises(CheckpointError, match="safetensors"):
        build_latent(cfg, digits, torch.device("cpu"))


def test_no_latent_record_is_pixel_space():
    assert restore_latent(None, torch.device("cpu")) is None


@pytest.mark.slow
def test_two_ranks_train_in_latent_space_as_one_process(tmp_path):
    """Under torchrun every rank builds the same latent space (rank 0 writes the cache) and the ranks together
    train as one process on the combined batch."""
    from tests.test_distributed import DDP_TINY, last, max_difference, torchrun

    args = [*DDP_TINY, "train.steps=4", "latent=pca", "latent_space.pca_channels=2", "latent_space.pca_factor=2",
            f"latent_space.cache_dir={tmp_path / 'cache'}"]
    torchrun(args, cwd=tmp_path)
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(run_dirs) == 1 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    two = last(run_dirs[0])
    one = last(Path(train(compose_config(args), tmp_path / "one")["run_dir"]))
    assert tuple(two["image_shape"]) == (2, 4, 4) and two["latent"]["identity"] == one["latent"]["identity"]
    assert max_difference(two["model"], one["model"]) < 1e-4
