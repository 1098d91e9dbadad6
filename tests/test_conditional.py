"""Class-conditional runs end to end: a guidance sweep trains, `compare` shows it, `sample` draws asked labels
and `evaluate` sweeps the guidance scale (tiny models, a few steps)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.config.build import build_components, build_dataset
from diffusion_lab.diffusion.conditioning import balanced_labels, class_grid, drop_labels, training_labels
from diffusion_lab.evaluation import compare as cmp
from tests.helpers import TINY, compose_config, run_cli


def test_label_dropout_rate_and_seeded():
    y = torch.arange(100_000) % 10
    dropped = drop_labels(y, 10, 0.2, torch.Generator().manual_seed(0))
    null = dropped == 10
    assert abs(null.double().mean().item() - 0.2) < 5 * (0.2 * 0.8 / len(y)) ** 0.5
    assert torch.equal(dropped[~null], y[~null])
    assert torch.equal(dropped, drop_labels(y, 10, 0.2, torch.Generator().manual_seed(0)))
    assert torch.equal(drop_labels(y, 10, 0.0), y) and bool((drop_labels(y, 10, 1.0) == 10).all())


def test_unconditional_runs_draw_nothing_for_labels():
    """An unconditional model gets no labels and draws no random numbers for them: existing runs are unchanged."""
    cfg = compose_config(["model.hidden_dims=[8,16]", "model.time_dim=16", "model.norm_groups=4"])
    model = build_components(cfg, torch.device("cpu"), 8, 1, 10).model
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert training_labels(model, torch.zeros(4, dtype=torch.long), 0.1, generator) == {}
    assert torch.equal(generator.get_state(), state)
    assert balanced_labels(model, 8) is None and class_grid(model, 64) == (None, None)


def test_num_classes_auto_and_refusals(tmp_path):
    small = ["model.hidden_dims=[8,16]", "model.time_dim=16", "model.norm_groups=4"]
    cfg = compose_config([*small, "model.num_classes=auto"])
    parts = build_components(cfg, torch.device("cpu"), 8, 1, build_dataset(cfg).num_classes)
    assert parts.model.num_classes == 10
    labels, per_class = class_grid(parts.model, 64)
    assert per_class == 6 and labels.tolist() == sorted(list(range(10)) * 6)
    assert class_grid(parts.model, 4)[0].tolist() == [0, 1, 2, 3]  # never more labels than grid images
    with pytest.raises(ValueError, match="fewer than the 10 classes"):
        build_components(compose_config([*small, "model.num_classes=3"]), torch.device("cpu"), 8, 1, 10)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(ValueError, match="needs labelled data"):
        build_components(compose_config([*small, "model.num_classes=2", "data=folder", f"data.root={flat}"]),
                         torch.device("cpu"), 8, 3, None)


@pytest.mark.slow
def test_guidance_sweep_trains_compares_samples_and_evaluates(tmp_path):
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith(("eval.every", "train.steps"))]
    result = run_cli("diffusion_lab.train", ["-m", "sampler.guidance_scale=0,2", "train.cond_drop_prob=0.1,0.2",
                                             "model.num_classes=auto", "logger=none", "train.steps=3", "eval.every=3",
                                             f"hydra.sweep.dir={sweep}", *tiny], cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4 and all((j / "samples" / "step_0000003.png").is_file() for j in jobs)
    grid = Image.open(jobs[0] / "samples" / "step_0000003.png")  # 4 grid samples < 10 classes: classes 0-3
    assert grid.size[1] > grid.size[0] * 3  # one row per class: 4 rows of 1 image
    shown = cmp.compare([sweep], out=tmp_path / "cmp")
    assert cmp.differing_keys(shown["runs"]) == ["sampler.guidance_scale", "train.cond_drop_prob"]
    assert len(shown["settings"]) == 4 and "sampler.guidance_scale" in shown["table"]

    sampled = run_cli("diffusion_lab.sample", [f"checkpoint={jobs[1]}", "per_class=2", "sampler.steps=3",
                                               "sampler.guidance_scale=3", f"hydra.run.dir={tmp_path / 's'}"], cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    npz = np.load(tmp_path / "s" / "samples.npz")
    assert npz["images"].shape == (20, 8, 8, 1) and npz["labels"].tolist() == sorted(list(range(10)) * 2)
    both = run_cli("diffusion_lab.sample", [f"checkpoint={jobs[1]}", "per_class=2", "labels=[1]"], cwd=tmp_path)
    assert both.returncode != 0 and both.stderr.strip().splitlines() == ["error: give labels=[...] or per_class=k, not both"]

    evaluated = run_cli("diffusion_lab.evaluate", [f"checkpoint={jobs[1]}", "samplers=[{name:ddim,steps:3}]",
                                                   "guidance_scales=[0,2]", "num_samples=40", "eval.batch_size=20",
                                                   f"hydra.run.dir={tmp_path / 'e'}"], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = json.loads((tmp_path / "e" / "fid_vs_cost.json").read_text())["rows"]
    assert [r["guidance_scale"] for r in rows] == [0.0, 2.0]
    assert all(0 <= r["accuracy"] <= 1 and r["fid"] > 0 for r in rows) and (tmp_path / "e" / "guidance.png").is_file()
    saved = json.loads((tmp_path / "e" / "fid_vs_cost.json").read_text())  # guidance.png's precision/recall panel
    assert all(0 <= r[k] <= 1 for r in rows for k in ("precision", "recall", "precision_floor", "recall_floor"))
    assert all(r["recall_floor"] == saved["recall_floor"] and r["kid_std"] >= 0 for r in rows)
