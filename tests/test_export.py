"""`export`: a tiny `model=cifar resample=ddpm` run as a diffusers DDPMPipeline, checked against diffusers itself:
the UNet2DModel predicts what our network does, DDPMPipeline / DDIMPipeline sample what our ddpm / ddim do from
the same generator, and what has no exact counterpart is refused with one line."""
import json

import pytest
import torch

from diffusion_lab.config.build import build_model, build_schedule
from diffusion_lab.config.trained import generate, load_trained
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.export import export
from diffusion_lab.interop.pipeline import refusal
from diffusion_lab.interop.unet_map import to_unet2d_state, unet2d_config
from diffusion_lab.models.unet import build_cifar, count_parameters
from diffusion_lab.train import train
from tests.helpers import TINY, compose_config, run_main

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)

T = 25  # timesteps of the tiny runs (cosine; the run also draws linear at T, which needs T > 20)
NET = ["model=cifar", "data=digits", "model.base_channels=8", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
       "model.attention_resolutions=[4]", "model.norm_groups=4", "model.time_dim=24", "model.zero_init=false"]
CIFAR = NET + ["schedule=cosine", f"schedule.noise_steps={T}", "train.steps=3", "train.batch_size=8",
               "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=3", "train.warmup_steps=1",
               "train.ema_decay=0.5", "eval.every=0", "logger=none", "sampler=ddim", "sampler.steps=5"]
PREDICTION_ATOL = 1e-5  # max abs, float32 (measured: up to 4e-7 on these runs, 2e-6 on the 35.7M DDPM network)
SAMPLE_ATOL = 1e-5      # max abs in [-1, 1] after T steps, float32 (measured: up to 2e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{objective: (run dir, pipeline folder)} of tiny cifar runs trained 3 steps (random init, so every weight
    matters) and exported."""
    root, out = tmp_path_factory.mktemp("runs"), {}
    for objective in ("eps", "v"):
        train(compose_config(CIFAR + [f"objective={objective}"]), root / objective)
        cfg = compose_config([f"checkpoint={root / objective}", f"out={root / objective}_pipe"], config_name="export")
        export(cfg, root / f"{objective}_export")
        out[objective] = (root / objective, root / f"{objective}_pipe")
    return out


@pytest.mark.parametrize("kw", [dict(), dict(num_heads=2, time_dim=40), dict(channel_mult=[1, 1, 2], num_res_blocks=2,
                                                                             attention_resolutions=[8, 2])])
def test_unet2d_model_is_our_network(kw):
    """The config and weight map alone (no training): same parameter count, same prediction at random init."""
    torch.manual_seed(0)
    settings = dict(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], norm_groups=4,
                    resample="ddpm", dropout=0.1)
    model = build_cifar(8, 3, **{**settings, **kw}).eval()
    unet = diffusers.UNet2DModel(**unet2d_config(model)).eval()
    unet.load_state_dict(to_unet2d_state(model), strict=True)
    assert count_parameters(unet) == count_parameters(model)
    x, t = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 17, 500, 999])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert ours.abs().max() > 0.1, "a prediction that tells mappings apart"
    assert (ours - theirs).abs().max() <= PREDICTION_ATOL


def test_the_ddpm_config_is_googles_ddpm_cifar10():
    """model=cifar's defaults export as google/ddpm-cifar10-32's UNet2DModel architecture (35,746,307 parameters)."""
    model = build_model(compose_config(["model=cifar"]), 32, 3)
    config = unet2d_config(model)
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
    assert (config["block_out_channels"], config["freq_shift"], config["flip_sin_to_cos"]) == ([128, 256, 256, 256], 1, False)
    assert config["attention_head_dim"] is None and config["norm_eps"] == 1e-5 and config["dropout"] == 0.1
    assert count_parameters(diffusers.UNet2DModel(**config)) == 35_746_307


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_exported_unet_predicts_what_ours_does(exported, objective):
    run, folder = exported[objective]
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*.json")} == {
        "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"}
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == {"eps": "epsilon", "v": "v_prediction"}[objective]
    trained = load_trained(run, torch.device("cpu"))
    assert scheduler["trained_betas"] == trained.schedule.betas.tolist() and scheduler["num_train_timesteps"] == T
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True).eval()
    x, t = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 5, 10, 23, 24])  # the integer t both are fed
    with torch.no_grad():
        ours, theirs = trained.model(x, t), unet(x, t).sample
    assert ours.abs().max() > 0.1 and (ours - theirs).abs().max() <= PREDICTION_ATOL


def _images(pipeline, steps, **options):
    """A pipeline's 4 samples from seed 0, from its [0, 1] numpy output back to [-1, 1] tensors."""
    images = pipeline(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                      output_type="np", **options).images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddpm_pipeline_samples_what_our_ddpm_does(exported, objective):
    """Same seed, same draw order (x_T, then one noise per step): DDPMPipeline = our ddpm sampler."""
    run, folder = exported[objective]
    pipeline = diffusers.DDPMPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    trained = load_trained(run, torch.device("cpu"))
    ours = generate(trained, build_sampler("ddpm"), 4, 4, 0, torch.device("cpu"), progress=False)
    theirs = _images(pipeline, T)
    assert ours.std() > 0.1 and (ours - theirs).abs().max() <= SAMPLE_ATOL


def test_ddim_pipeline_samples_what_our_ddim_does(exported):
    """Deterministic: diffusers' DDIMScheduler (eta 0, leading spacing, alpha 1 at the end) = our ddim on grid=leading."""
    run, folder = exported["eps"]
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
    config = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler").config
    scheduler = diffusers.DDIMScheduler.from_config(config, timestep_spacing="leading", set_alpha_to_one=True,
                                                    steps_offset=0, clip_sample=False)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    trained = load_trained(run, torch.device("cpu"))
    ours = generate(trained, build_sampler("ddim", steps=5, grid="leading", clip_x0=False), 4, 4, 0,
                    torch.device("cpu"), progress=False)
    theirs = _images(pipeline, 5, eta=0.0)
    assert ours.std() > 0.1 and (ours - theirs).abs().max() <= SAMPLE_ATOL


REFUSED = [
    (["model=base"], "model=base: only model=cifar"),
    (NET + ["model.resample=reference"], "model.resample=reference"),
    (NET + ["schedule=vp", "objective=v"], "schedule=vp is a continuous-time process"),
    (NET + ["schedule=edm", "objective=edm"], "schedule=edm is a continuous-time process"),
    (NET + ["objective=edm"], "objective=edm has no DDPMScheduler prediction_type"),
    (NET + ["objective=consistency"], "objective=consistency has no DDPMScheduler prediction_type"),
    (NET + ["latent=pca"], "latent=pca: a latent run"),
    (NET + ["model.num_classes=10"], "class-conditional"),
    (NET + ["model.num_heads=2", "model.base_channels=8", "model.channel_mult=[1,1]"], None),  # widths 4 = 4: maps
    (NET + ["model.num_heads=4", "model.channel_mult=[1,2,2]", "model.attention_resolutions=[8]"],
     "head widths [2, 4]"),
]


@pytest.mark.parametrize("overrides,why", REFUSED)
def test_what_has_no_exact_counterpart_is_refused_with_one_line(overrides, why):
    cfg = compose_config(overrides)
    reason = refusal(cfg, build_model(cfg, 8, 1), build_schedule(cfg))
    assert reason == why if why is None else (why in reason and "\n" not in reason), reason


def test_the_export_command_refuses_with_one_line(exported, tmp_path, capsys):
    train(compose_config(TINY + ["logger=none", "eval.every=0", "train.steps=3"]), tmp_path / "base")
    args = [f"checkpoint={tmp_path / 'base'}", f"out={tmp_path / 'pipe'}", f"hydra.run.dir={tmp_path / 'log'}"]
    code, _, err = run_main("diffusion_lab.export", args, tmp_path, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "model=base: only model=cifar" in err, err
    assert not (tmp_path / "pipe").exists() and not list(tmp_path.glob(".pipe.*")), "nothing half-written"
    run, folder = exported["eps"]
    code, _, err = run_main("diffusion_lab.export", [f"checkpoint={run}", f"out={folder}",
                                                     f"hydra.run.dir={tmp_path / 'log2'}"], tmp_path, capsys)
    assert code == 2 and err.strip() == f"error: out={folder} is not empty: pick a new folder"
    code, _, err = run_main("diffusion_lab.export", [f"checkpoint={run}"], tmp_path, capsys)
    assert code == 2 and err.strip() == "error: out is required: add out=..."


def test_a_failed_export_leaves_nothing_behind(tmp_path):
    """files.write_dir: the folder appears whole or not at all, and its temp folder is removed."""
    from diffusion_lab import files

    def half_written(folder):
        (folder / "model_index.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(files.WriteError, match="No space left on device"):
        files.write_dir(tmp_path / "pipe", half_written)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    files.write_dir(tmp_path / "empty", lambda folder: (folder / "a.json").write_text("{}"))
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["a.json"] and len(list(tmp_path.iterdir())) == 1


def test_a_written_folder_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """files.write_dir fsyncs every file the fill wrote (diffusers' save_pretrained does not) before the rename."""
    import os

    from diffusion_lab import files

    synced, renamed, real_fsync, real_rename = [], [], os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "rename", lambda a, b: renamed.append(len(synced)) or real_rename(a, b))

    def fill(folder):
        (folder / "unet").mkdir()
        (folder / "unet" / "weights.safetensors").write_bytes(b"x")
        (folder / "model_index.json").write_text("{}")

    files.write_dir(tmp_path / "pipe", fill)
    before_rename = {os.path.basename(p) for p in synced[:renamed[0]]}
    assert {"weights.safetensors", "model_index.json", "unet"} <= before_rename
