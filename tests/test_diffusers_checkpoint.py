"""`checkpoint=diffusers:DIR`: a local diffusers UNet2DModel folder sampled and scored by our commands; the
export -> import round trip gives back our model's predictions and samples."""
import json
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab.config.trained import generate, load_trained
from diffusion_lab.diffusion.guidance import Guidance, GuidedModel
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.evaluate import evaluate
from diffusion_lab.interop.scheduler_map import betas_of
from diffusion_lab.sample import sample
from tests.helpers import compose_config, run_main
from tests.test_export import PREDICTION_ATOL, SAMPLE_ATOL, exported  # noqa: F401  (the module's fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)
CPU = torch.device("cpu")


def tiny_unet(num_class_embeds=None, channels=1):
    """A random channels x 8 x 8 UNet2DModel (digits-shaped by default, 8 and 16 channels, attention at 4x4)."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds).eval()


def save_pipeline(folder, unet, **scheduler):
    """A pipeline folder as save_pretrained writes it (safetensors weights)."""
    scheduler = diffusers.DDPMScheduler(**{"num_train_timesteps": 20, "beta_schedule": "squaredcos_cap_v2", **scheduler})
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("pipe") / "ddpm", tiny_unet())


def test_a_diffusers_folder_is_its_unet_and_schedule(pipeline_dir):
    trained = load_trained(f"diffusers:{pipeline_dir}", CPU)
    assert trained.image_shape == (1, 8, 8) and trained.objective.name == "eps" and trained.model.num_classes is None
    assert trained.source == {"run": None, "group": None} and trained.schedule.num_timesteps == 20
    theirs = diffusers.DDPMScheduler.from_pretrained(pipeline_dir / "scheduler")
    torch.testing.assert_close(trained.schedule.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-6)
    unet = diffusers.UNet2DModel.from_pretrained(pipeline_dir / "unet").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 7, 19])
    with torch.no_grad():
        ours = trained.objective.network(trained.model, trained.schedule)(x, t)
        assert torch.equal(ours, unet(x, t).sample), "the network is the UNet, fed the integer timesteps"


@pytest.mark.parametrize("kind,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                            ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_beta_schedules_are_diffusers_own(kind, start, end):
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=kind, beta_start=start, beta_end=end)
    ours = betas_of(dict(theirs.config), "test")
    torch.testing.assert_close(ours, theirs.betas.double(), rtol=0, atol=1e-7)  # theirs are float32


def test_sample_and_evaluate_a_diffusers_folder(pipeline_dir, tmp_path):
    cfg = compose_config([f"checkpoint=diffusers:{pipeline_dir}", "num_samples=6", "batch_size=4", "sampler=ddim",
                          "sampler.steps=4", "data=digits", "fid=true", "eval.feature_extractor=small"],
                         config_name="sample")
    summary = sample(cfg, tmp_path / "sample")
    assert np.load(tmp_path / "sample" / "samples.npz")["images"].shape == (6, 8, 8, 1)
    assert (tmp_path / "sample" / "grid.png").stat().st_size > 0 and summary["fid"]["value"] > 0
    cfg = compose_config([f"checkpoint=diffusers:{pipeline_dir}", "num_samples=16", "batch_size=8", "data=digits"],
                         config_name="evaluate")
    cfg.samplers = OmegaConf.create([{"name": "ddim", "steps": 4}, {"name": "dpm_solver", "steps": 3}])
    rows = evaluate(cfg, tmp_path / "evaluate")
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("ddim", 4), ("dpm_solver", 3)] and all(r["fid"] > 0 for r in rows)
    assert "digits classifier" in json.loads((tmp_path / "evaluate" / "fid_vs_cost.json").read_text())["label"]


def test_data_of_other_channels_than_the_unet_is_refused(tmp_path):
    folder = save_pipeline(tmp_path / "rgb", tiny_unet(channels=3))
    cfg = compose_config([f"checkpoint=diffusers:{folder}", "num_samples=4", "sampler=ddim", "sampler.steps=2",
                          "data=digits", "fid=true"], config_name="sample")
    with pytest.raises(ValueError, match="data=digits has 1 channel.*the diffusers UNet makes 3"):
        sample(cfg, tmp_path / "out")


def test_a_conditional_unet_is_guided(tmp_path):
    """num_class_embeds = 11: classes 0..9 and our null class 10; guidance mixes the UNet's own predictions."""
    folder = save_pipeline(tmp_path / "cond", tiny_unet(num_class_embeds=11), prediction_type="v_prediction")
    trained = load_trained(f"diffusers:{folder}", CPU)
    assert trained.model.num_classes == 10 and trained.objective.name == "v"
    unet, y = trained.model.unet, torch.tensor([0, 3, 9])
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([2, 10, 19])
    guided = GuidedModel(trained.objective.network(trained.model, trained.schedule), y, Guidance(3.0))
    with torch.no_grad():
        cond, null = unet(x, t, class_labels=y).sample, unet(x, t, class_labels=torch.full_like(y, 10)).sample
        torch.testing.assert_close(guided(x, t), null + 3.0 * (cond - null), rtol=0, atol=1e-5)
    cfg = compose_config([f"checkpoint=diffusers:{folder}", "labels=[1,2,2]", "sampler=ddim", "sampler.steps=3",
                          "sampler.guidance_scale=2.0"], config_name="sample")
    sample(cfg, tmp_path / "out")
    assert np.load(tmp_path / "out" / "samples.npz")["labels"].tolist() == [1, 2, 2]


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_export_then_import_gives_back_our_model(exported, objective):  # noqa: F811
    run, folder = exported[objective]
    ours, back = load_trained(run, CPU), load_trained(f"diffusers:{folder}", CPU)
    assert back.objective.name == objective and torch.equal(back.schedule.betas, ours.schedule.betas)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 12, 24])
    with torch.no_grad():
        a = ours.objective.network(ours.model, ours.schedule)(x, t)
        b = back.objective.network(back.model, back.schedule)(x, t)
    assert a.abs().max() > 0.1 and (a - b).abs().max() <= PREDICTION_ATOL
    for name, options in (("ddpm", {}), ("dpm_solver", {"steps": 5}))[objective == "v":]:  # v's ddpm: test_export
        sampler = build_sampler(name, **options)
        first, second = (generate(m, sampler, 4, 4, 0, CPU, progress=False) for m in (ours, back))
        assert (first - second).abs().max() <= SAMPLE_ATOL, name


def test_what_cannot_be_read_is_refused_with_one_line(pipeline_dir, tmp_path, capsys):
    bin_only = tmp_path / "bin"
    shutil.copytree(pipeline_dir, bin_only)
    (bin_only / "unet" / "diffusion_pytorch_model.safetensors").rename(bin_only / "unet" / "diffusion_pytorch_model.bin")
    odd = tmp_path / "odd"
    shutil.copytree(pipeline_dir, odd)
    config = json.loads((odd / "scheduler" / "scheduler_config.json").read_text())
    (odd / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_schedule": "sigmoid"}))
    cases = [([f"checkpoint=diffusers:{bin_only}"], "no .safetensors weights (found: diffusion_pytorch_model.bin)"),
             ([f"checkpoint=diffusers:{odd}"], "beta_schedule='sigmoid' is not read"),
             ([f"checkpoint=diffusers:{tmp_path / 'none'}"], "no such folder"),
             ([f"checkpoint=diffusers:{pipeline_dir}", "fid=true"], "FID needs reference data: add data=digits"),
             ([f"checkpoint=diffusers:{pipeline_dir}", "data=digits", "data.image_size=16"], "data.image_size=16")]
    for i, (args, why) in enumerate(cases):
        code, _, err = run_main("diffusion_lab.sample", [*args, "sampler=ddim", "sampler.steps=2", "num_samples=2",
                                                         f"hydra.run.dir={tmp_path / f'log{i}'}"], tmp_path, capsys)
        assert code == 2 and why in err and err.strip().count("\n") == 0, (args, err)


def test_a_bare_unet_folder_with_its_scheduler_config(tmp_path):
    """config.json + weights + scheduler_config.json in one folder (UNet2DModel.save_pretrained, save_config)."""
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "bare", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=30, beta_schedule="linear", beta_start=1e-3, beta_end=0.2,
                            prediction_type="sample").save_config(tmp_path / "bare")
    trained = load_trained(f"diffusers:{tmp_path / 'bare'}", CPU)
    assert trained.objective.name == "x0" and trained.schedule.num_timesteps == 30
    torch.testing.assert_close(trained.schedule.betas.double(), torch.linspace(1e-3, 0.2, 30, dtype=torch.float64),
                               rtol=0, atol=1e-8)


@pytest.mark.parametrize("change,why", [
    ({"_class_name": "UNet2DConditionModel"}, "it is a UNet2DConditionModel"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"num_class_embeds": 1}, "num_class_embeds < 2"),
    ({"out_channels": 2}, "a learned variance is not read"),
])
def test_a_unet_our_samplers_cannot_run_is_refused(pipeline_dir, tmp_path, change, why):
    folder = tmp_path / "changed"
    shutil.copytree(pipeline_dir, folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match="cannot be sampled here") as refused:
        load_trained(f"diffusers:{folder}", CPU)
    assert why in str(refused.value) and "\n" not in str(refused.value)


def test_data_is_only_for_a_diffusers_checkpoint(exported):  # noqa: F811
    data = compose_config(["data=digits"], config_name="sample").data
    with pytest.raises(ValueError, match="names the FID data of a checkpoint=diffusers:DIR"):
        load_trained(exported["eps"][0], CPU, data=data)
