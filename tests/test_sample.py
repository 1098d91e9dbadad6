"""The sample and evaluate commands round-trip from checkpoints of tiny runs, for every objective."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.config.trained import load_trained
from diffusion_lab.evaluate import evaluate
from diffusion_lab.evaluation import cost
from diffusion_lab.sample import sample
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint
from tests.helpers import TINY, compose_config, run_cli


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for objective in ("eps", "x0", "v"):
        train(compose_config(TINY + ["logger=none", "eval.every=0", "train.steps=3", f"objective={objective}"]),
              root / objective)
        out[objective] = root / objective / "checkpoints" / "last.pt"
    return out


def sample_config(path, *overrides):
    return compose_config([f"checkpoint={path}", "num_samples=10", "batch_size=4", *overrides], config_name="sample")


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_sample_round_trips_every_objective(checkpoints, tmp_path, objective):
    trained = load_trained(checkpoints[objective], torch.device("cpu"))
    assert trained.objective.name == objective and trained.step == 3
    ema = checkpoint.load(checkpoints[objective])["train_step"]["ema"]["module"]
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, ema[key]), f"the EMA weights are loaded: {key}"
    summary = sample(sample_config(checkpoints[objective], "sampler=dpm_solver", "sampler.steps=4"), tmp_path)
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert (tmp_path / "grid.png").stat().st_size > 0 and summary["objective"] == objective
    again = sample(sample_config(checkpoints[objective], "sampler=dpm_solver", "sampler.steps=4"), tmp_path / "b")
    assert np.array_equal(images, np.load(tmp_path / "b" / "samples.npz")["images"]), "seeded: same images"
    assert again["num_samples"] == 10


def test_sample_with_fid(checkpoints, tmp_path):
    summary = sample(sample_config(checkpoints["eps"], "fid=true", "eval.feature_extractor=small"), tmp_path)
    assert summary["fid"]["value"] > 0 and "small random net" in summary["fid"]["label"]
    assert 0 < summary["fid"]["floor"] < summary["fid"]["value"] and summary["fid"]["floor_n"] == 10
    assert 0 <= summary["fid"]["precision"] <= 1 and 0 <= summary["fid"]["recall_floor"] <= 1  # beside the FID
    assert summary["fid"]["kid_std"] >= 0 and summary["fid"]["kid"] is not None


def test_evaluate_fid_against_cost(checkpoints, tmp_path):
    cfg = compose_config([f"checkpoint={checkpoints['v']}", "num_samples=16", "batch_size=8"],
                         config_name="evaluate")
    cfg.samplers = OmegaConf.create([{"name": "ddim", "steps": 2}, {"name": "ddim", "steps": 4},
                                     {"name": "dpm_solver", "steps": 3}])
    rows = evaluate(cfg, tmp_path)
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim", 2), ("ddim", 4), ("dpm_solver", 3)]
    assert all(r["fid"] > 0 and r["seconds"] > 0 for r in rows)
    saved = json.loads((tmp_path / "fid_vs_cost.json").read_text())
    assert len(saved["rows"]) == 3 and "digits classifier" in saved["label"] and saved["floor_n"] == 16
    assert all(r["fid_floor"] == saved["floor"] for r in rows)
    assert (tmp_path / "fid_vs_cost.png").stat().st_size > 0 and (tmp_path / "fid_vs_cost.csv").is_file()
    scored = cost.read_evaluation(tmp_path, {})  # what compare reads of it: the run it scored and its rows
    assert scored.label == saved["label"] and [r["nfe"] for r in scored.rows] == [2, 4, 3]
    assert (scored.run.path / "config.yaml").is_file() and scored.run.config["objective"] == "v"


@pytest.mark.slow
def test_sample_cli(checkpoints, tmp_path):
    result = run_cli("diffusion_lab.sample", [f"checkpoint={checkpoints['x0']}", "sampler=ddim", "sampler.steps=3",
                                              "num_samples=5", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.load(tmp_path / "out" / "samples.npz")["images"].shape == (5, 8, 8, 1)
    missing = run_cli("diffusion_lab.sample", [f"checkpoint={tmp_path / 'nope.pt'}"], cwd=tmp_path)
    assert missing.returncode != 0 and "no checkpoint at" in missing.stderr
    unset = run_cli("diffusion_lab.sample", [], cwd=tmp_path)
    assert unset.returncode != 0 and unset.stderr.strip() == "error: checkpoint is required: add checkpoint=..."
