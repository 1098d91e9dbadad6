"""The packaged recipes (`experiment=...`) and debug modes (`debug=smoke|overfit`): each composes, validates and
builds; a recipe's U-Net has the parameter count its source states; the debug modes run and do what they say."""
import json

import pytest
import torch

from diffusion_lab.config import CONF_DIR
from diffusion_lab.config.build import build_dataset, build_model
from diffusion_lab.config.validation import validate
from diffusion_lab.data.loader import ResumableLoader
from diffusion_lab.models import count_parameters
from diffusion_lab.train import train
from tests.helpers import TINY, compose_config, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PARAMETERS = {
    "ddpm_cifar10": 35_746_307,  # Ho et al. 2020, Appendix B: "35.7M parameters" (their code: 35,746,307)
    # openai/improved-diffusion's UNetModel with these flags and use_scale_shift_norm=False, learn_sigma=False,
    # counted with their code (their released checkpoint, with both on, has 52,546,438: "cifar10_uncond_50M")
    "iddpm_cifar10": 49_062_787,
    "minsnr_v_cifar10": 49_062_787,
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_each_recipe_composes_validates_and_builds(name, tmp_path):
    needs_teacher = "teacher: ???" in (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
    (tmp_path / "last.pt").write_bytes(b"")
    cfg = compose_config([f"experiment={name}"] + ([f"train.teacher={tmp_path / 'last.pt'}"] if needs_teacher else []))
    validate(cfg)
    if needs_teacher:  # without one, a one-line refusal naming the key
        with pytest.raises(Exception, match="train.teacher"):
            validate(compose_config([f"experiment={name}"]))
    model = build_model(cfg, cfg.data.image_size, 3 if cfg.data.name == "cifar10" else 1)
    if name in PARAMETERS:
        assert count_parameters(model) == PARAMETERS[name]


def test_the_iddpm_recipes_hold_the_papers_settings():
    iddpm = compose_config(["experiment=iddpm_cifar10"])
    assert (iddpm.schedule.name, iddpm.schedule.noise_steps, iddpm.schedule.s) == ("cosine", 4000, 0.008)
    assert (iddpm.train.lr, iddpm.train.batch_size, iddpm.model.dropout, iddpm.train.ema_decay) == (1e-4, 128, 0.3, 0.9999)
    minsnr = compose_config(["experiment=minsnr_v_cifar10"])
    assert (minsnr.objective.name, minsnr.objective.weighting, minsnr.objective.snr_gamma) == ("v", "min_snr", 5.0)
    differ = {k for k in ("data", "model", "schedule", "sampler", "train", "eval") if minsnr[k] != iddpm[k]}
    assert not differ, f"min-SNR changes only the objective, not {differ}"


@pytest.mark.parametrize("debug", ["smoke", "overfit"])
@pytest.mark.parametrize("experiment", [None, "ddpm_cifar10", "iddpm_cifar10"])
def test_debug_modes_compose_over_any_recipe(debug, experiment):
    overrides = [f"debug={debug}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg, plain = compose_config(overrides), compose_config(overrides[1:])
    validate(cfg)
    assert cfg.logger.name == "none" and cfg.model.name == plain.model.name and cfg.schedule == plain.schedule
    assert cfg.train.steps == (4 if debug == "smoke" else 2000) and cfg.train.overfit_batches == (debug == "overfit")


@pytest.mark.slow
def test_debug_smoke_runs_every_phase_into_its_own_dir(tmp_path, capsys):
    code, out, err = run_main("diffusion_lab.train", ["debug=smoke", "model.hidden_dims=[16,32]", "model.time_dim=32",
                                                      "sampler.steps=5"], tmp_path, capsys)
    assert code in (0, None), err
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["debug"], "debug runs stay apart from real ones"
    runs = list((tmp_path / "outputs" / "debug").glob("*/*/summary.json"))
    assert len(runs) == 1
    run, summary = runs[0].parent, json.loads(runs[0].read_text())
    assert summary["steps"] == 4 and [s for s, _ in summary["fid_history"]] == [2, 4]
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert summary["wandb"] == {"logger": "none"} and not list(run.glob("wandb")), "logger none: no W&B run"


def test_overfit_reads_one_fixed_batch():
    cfg = compose_config(["debug=overfit", "train.batch_size=16"])
    full, one = build_dataset(compose_config(["train.batch_size=16"])), build_dataset(cfg)
    assert len(one) == 16 and not one.hflip and torch.equal(one.images, full.images[:16])
    assert torch.equal(one.labels, full.labels[:16])
    assert len(build_dataset(cfg, "test")) == len(build_dataset(compose_config([]), "test")), "held-out data stays whole"
    loader = ResumableLoader(one, 8, seed=0)  # grad_accum_steps=2: two halves, the same 16 images every step
    for _ in range(3):
        seen = torch.cat([next(loader)[0], next(loader)[0]])  # (images, labels) batches
        assert sorted(map(tuple, seen.flatten(1).tolist())) == sorted(map(tuple, one.images.flatten(1).tolist()))


@pytest.mark.slow
def test_overfit_loss_falls_far_below_a_normal_runs(tmp_path):
    """300 steps on 4 images vs 300 on the whole digits set (same model, lr, seed): measured 0.090 vs 0.155."""
    base = [o for o in TINY if not o.startswith(("train.steps", "train.batch_size", "train.warmup", "eval."))]
    base += ["logger=none", "eval.every=0", "train.batch_size=4", "train.steps=300", "train.warmup_steps=10",
             "train.log_every=25", "train.sample_every=0", "train.checkpoint_every=0"]
    overfit = train(compose_config(base + ["debug=overfit"]), tmp_path / "overfit")
    normal = train(compose_config(base + ["model.dropout=0.0"]), tmp_path / "normal")
    assert overfit["dataset_size"] == 4 and normal["dataset_size"] > 1000
    assert overfit["final_loss_smoothed"] < 0.75 * normal["final_loss_smoothed"]  # the mean of the last 4 log points
