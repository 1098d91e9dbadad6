"""Data-parallel training: distributed.py's single-process path, how a global batch splits over ranks, and
2-process gloo runs (torchrun, or torch.multiprocessing) that equal one process on the combined batch, resume
exactly and split FID generation without changing the FID."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from diffusion_lab.config.build import build_model
from diffusion_lab.data.datasets import TensorImageDataset, TransformImageDataset
from diffusion_lab.data.loader import ResumableLoader
from diffusion_lab.errors import ConfigError
from diffusion_lab.evaluation.tracker import FIDTracker
from diffusion_lab.train import build_data, seed_everything, train
from diffusion_lab.training import checkpoint
from diffusion_lab.training.distributed import Ranks, ranks_from_env, session, shard
from tests.helpers import REPO, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

DDP_TINY = ["model.hidden_dims=[16,32]", "model.time_dim=32", "train.batch_size=16", "train.log_every=2",
            "train.sample_every=0", "train.checkpoint_every=0", "train.num_grid_samples=4", "train.warmup_steps=2",
            "sampler.steps=5", "eval.every=0", "logger=none"]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(args, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc -m diffusion_lab.train args`; fails the test if it fails."""
    env = {k: v for k, v in ENV.items() if k not in RANK_VARS}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "-m", "diffusion_lab.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def last(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def moments(state: dict) -> dict:
    """Adam's exp_avg of every parameter of a checkpoint."""
    return {i: s["exp_avg"] for i, s in state["train_step"]["optimizer"]["state"].items()}


# ------------------------------------------------------------------------------------------------
# The single-process path and the split of a global batch


def test_one_process_is_rank_0_of_1_and_every_collective_returns_its_input(monkeypatch):
    for name in RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    x = torch.arange(6.0)
    with session(torch.device("cpu")) as (ranks, device):
        assert (ranks.rank, ranks.world_size, ranks.local_rank, device) == (0, 1, 0, torch.device("cpu"))
        assert ranks.is_main and not ranks.active and not dist.is_initialized()
        assert ranks.broadcast("run dir") == "run dir" and ranks.all_gather({"a": 1}) == [{"a": 1}]
        assert ranks.mean(2.5) == 2.5 and ranks.any(True) and not ranks.any(False)
        assert torch.equal(ranks.shard(x), x)


def test_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks_from_env() == (3, 4, 1)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_RANK")
    assert ranks_from_env() == (0, 1, 0)


def test_the_shards_of_a_global_batch_are_disjoint_and_tile_it():
    x = torch.arange(12)
    parts = [shard(x, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.mark.parametrize("in_memory", [True, False], ids=["tensor", "dataloader"])
def test_rank_loaders_together_yield_the_single_process_batches(in_memory):
    """Across an epoch boundary, with flips, for both loader paths, labels riding along; and after a resume."""
    images, labels = torch.randn(40, 1, 4, 4), torch.arange(40) % 10
    base = TensorImageDataset(images, name="noise", hflip=True, labels=labels, num_classes=10)
    dataset = base if in_memory else TransformImageDataset(base, "noise", 1, 4, hflip=True, labels=labels.tolist(),
                                                           num_classes=10)
    single = ResumableLoader(dataset, 8, seed=3, hflip=True)
    ranks = [ResumableLoader(dataset, 8, seed=3, hflip=True, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # 5 batches per epoch
        (x_a, y_a), (x_b, y_b) = [next(loader) for loader in ranks]
        assert x_a.shape[0] == 4 and not torch.equal(x_a, x_b)
        x, y = next(single)
        assert torch.equal(torch.cat([x_a, x_b]), x) and torch.equal(torch.cat([y_a, y_b]), y)
    resumed = ResumableLoader(dataset, 8, seed=3, hflip=True, rank=1, world_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    (x_r, y_r), (x_1, y_1) = next(resumed), next(ranks[1])
    assert torch.equal(x_r, x_1) and torch.equal(y_r, y_1)


def test_a_global_batch_that_does_not_split_over_the_ranks_is_one_line():
    cfg = compose_config([*DDP_TINY, "train.batch_size=10"])
    with pytest.raises(ConfigError, match=r"^batch_size=10 is the global batch and does not split evenly over 4 ranks$"):
        build_data(cfg, Ranks(rank=0, world_size=4), torch.device("cpu"))
    build_data(cfg, Ranks(rank=0, world_size=2), torch.device("cpu"))  # 10 = 2 x 5 is fine


# ------------------------------------------------------------------------------------------------
# FID generation split over ranks

FID_CFG = {"every": 1, "num_samples": 96, "batch_size": 32, "reference": "train", "mode": "clean",
           "feature_extractor": "small", "fallback": "small"}  # 3 batches: rank 0 makes two, rank 1 one


def fid_images():
    return TensorImageDataset(torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                              name="fid_test", hflip=False)


def fake_sampler(made: list):
    """A deterministic 'sampler' of x_T and the seed that records which batches (seeds) it made."""
    def sample(x_T: torch.Tensor, seed: int) -> torch.Tensor:
        made.append(seed)
        g = torch.Generator().manual_seed(seed)
        return torch.tanh(x_T + 0.3 * torch.randn(x_T.shape, generator=g))
    return sample


def fid_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        images = fid_images()
        tracker = FIDTracker(OmegaConf.create(FID_CFG), lambda split: images, "cpu", seed=5)
        made: list = []
        result = tracker.evaluate(fake_sampler(made), Ranks(rank, world_size, rank))
        beside = {k: getattr(result, k) for k in ("kid", "kid_std", "precision", "recall")}  # from gathered features
        Path(out_dir, f"{rank}.json").write_text(json.dumps({"fid": result.value, "n": result.num_samples, "made": made,
                                                             **beside}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fid_split_over_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(fid_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    images = fid_images()
    made: list = []
    single = FIDTracker(OmegaConf.create(FID_CFG), lambda split: images, "cpu", seed=5).evaluate(fake_sampler(made))
    assert made == [5, 6, 7] and ranks[0]["made"] == [5, 6] and ranks[1]["made"] == [7]  # each its share, once
    for r in ranks:
        assert r["n"] == single.num_samples == 96
        assert r["fid"] == pytest.approx(single.value, rel=1e-6, abs=1e-9)
        for key in ("kid", "kid_std", "precision", "recall"):
            assert r[key] == pytest.approx(getattr(single, key), rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------------------------------------
# 2-process training under torchrun


@pytest.mark.slow
def test_two_ranks_train_exactly_as_one_process_on_the_combined_batch(tmp_path):
    result = torchrun([*DDP_TINY, "train.steps=4"], cwd=tmp_path)
    run_dirs = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert len(run_dirs) == 1 and len(list((tmp_path / "outputs").glob("*/*"))) == 1  # one dir: rank 0's
    two = last(run_dirs[0])

    cfg = compose_config([*DDP_TINY, "train.steps=4"])
    one = last(Path(train(cfg, tmp_path / "one")["run_dir"]))
    seed_everything(cfg.seed)
    initial = build_model(cfg, 8, 1).state_dict()

    # Adam's first moment is a linear average of the gradients: it agrees to float precision. The weights agree
    # to a tenth of one learning-rate step: Adam divides by sqrt(v), which blows a 1e-8 gradient difference on an
    # element with a near-zero gradient up to ~1e-5 (a few elements of 114k), while a wrong split of the batch
    # moves thousands of elements by a whole step (~1e-3).
    m_one, m_two = moments(one), moments(two)
    assert max_difference(m_two, m_one) < 1e-5 * max(v.abs().max().item() for v in m_one.values())
    assert max_difference(one["model"], initial) > 1e-3  # training moved the weights far beyond the tolerance
    assert max_difference(two["model"], one["model"]) < 1e-4
    assert max_difference(two["train_step"]["ema"]["module"], one["train_step"]["ema"]["module"]) < 1e-4
    assert two["data"] == one["data"]

    metrics = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]  # rank 0 alone logs
    assert metrics[-1]["loss"] == pytest.approx(json.loads((tmp_path / "one" / "metrics.jsonl").read_text()
                                                           .splitlines()[-1])["loss"], rel=1e-5)
    assert json.loads((run_dirs[0] / "summary.json").read_text())["world_size"] == 2
    assert "world size 2" in result.stdout


@pytest.mark.slow
def test_two_ranks_resume_exactly(tmp_path):
    """With dropout, so each rank's own RNG state must come back too."""
    common = [*DDP_TINY, "model.dropout=0.1", "train.lr_schedule=constant"]  # the lr does not depend on train.steps
    torchrun([*common, "train.steps=4", f"hydra.run.dir={tmp_path / 'straight'}"], cwd=tmp_path)
    torchrun([*common, "train.steps=2", f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path)
    torchrun([*common, "train.steps=4", f"train.resume={tmp_path / 'first'}", f"hydra.run.dir={tmp_path / 'resumed'}"],
             cwd=tmp_path)
    straight, resumed = last(tmp_path / "straight"), last(tmp_path / "resumed")
    assert resumed["step"] == 4
    assert max_difference(resumed["model"], last(tmp_path / "first")["model"]) > 1e-4  # steps 3-4 changed it
    for key in straight["model"]:
        assert torch.equal(resumed["model"][key], straight["model"][key]), key
    for key, value in straight["train_step"]["ema"]["module"].items():
        assert torch.equal(resumed["train_step"]["ema"]["module"][key], value), key
    assert [m["step"] for m in map(json.loads, (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines())] \
        == [2, 4]
