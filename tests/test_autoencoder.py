"""`python -m diffusion_lab.autoencoder`: the model's shapes, a tiny run's artefacts, exact resume, the round trip,
`load_autoencoder`'s contract and refusals, and a sweep over the latent channels."""
import json

import pytest
import torch

from diffusion_lab.autoencoder import train_autoencoder
from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.latent.autoencoder_run import build_autoencoder, load_autoencoder
from diffusion_lab.latent.hashing import tensor_hash
from diffusion_lab.models.autoencoder import KLAutoencoder, kl_divergence
from diffusion_lab.training import checkpoint
from tests.helpers import TINY, compose_config, run_cli

# A run of a few seconds: 8x8 digits, a narrow network, FID on 64 held-out images.
AE_TINY = ["data.image_size=8", "autoencoder.width=8", "autoencoder.norm_groups=4", "autoencoder.factor=2",
           "train.steps=6", "train.batch_size=16", "train.log_every=2", "train.sample_every=3",
           "train.checkpoint_every=3", "train.num_grid_samples=8", "train.warmup_steps=2", "eval.every=3",
           "eval.num_samples=64", "eval.batch_size=64", "logger=none"]


def ae_config(extra=()):
    return compose_config(AE_TINY + list(extra), config_name="autoencoder")


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ae")
    return run_dir, train_autoencoder(ae_config(), run_dir, overrides=["tiny"])


@pytest.mark.parametrize("factor", [2, 4])
def test_latent_shape_follows_the_factor(factor):
    model = KLAutoencoder(channels=1, latent_channels=3, factor=factor, width=8, norm_groups=4)
    mean, logvar = model.encode(torch.zeros(2, 1, 16, 16))
    assert mean.shape == logvar.shape == (2, 3, 16 // factor, 16 // factor) == (2, *model.latent_shape(16))
    assert model.decode(mean).shape == (2, 1, 16, 16)


def test_kl_of_the_prior_is_zero_and_grows_away_from_it():
    zero = torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_divergence(zero, zero), torch.zeros(2))
    assert (kl_divergence(zero + 1.0, zero) == 0.5 * 36).all()


def test_a_run_writes_checkpoint_grids_and_summary_with_recon_fid_and_floor(tiny_ae):
    run_dir, summary = tiny_ae
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert set(checkpoint.REQUIRED_KEYS) <= set(state) and state["step"] == 6
    assert state["config"]["autoencoder"]["factor"] == 2 and state["latent_shape"] == [4, 4, 4]
    assert [p.name for p in sorted((run_dir / "samples").glob("*.png"))] == ["step_0000003.png", "step_0000006.png"]
    assert (run_dir / "reconstructions.png").is_file() and (run_dir / "loss.png").is_file()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["recon_fid"] > 0 and saved["fid_floor"] > 0 and saved["fid_floor_n"] == 64 == saved["test_n"]
    assert "digits classifier" in saved["fid_label"] and [s for s, _ in saved["recon_fid_history"]] == [3, 6]
    assert 0 < saved["test_recon_l1"] < 2 and 0 < saved["test_recon_mse"] < 4
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    parts = [r for r in rows if "recon_l1" in r]
    assert [r["step"] for r in parts] == [2, 4, 6] and all(r["kl"] > 0 and r["recon_l1"] > 0 for r in parts)
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 for r in rows if "loss" in r)
    assert "reconstruction FID" in (run_dir / "train.log").read_text()


def test_resume_continues_exactly(tmp_path):
    """6 steps straight == 3 steps, then resume to 6: same weights, EMA, optimizer and posterior generator."""
    base = ["train.lr_schedule=constant", "eval.every=0"]
    train_autoencoder(ae_config(base), tmp_path / "straight")
    train_autoencoder(ae_config(base + ["train.steps=3"]), tmp_path / "a")
    resumed = train_autoencoder(ae_config(base + [f"train.resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert resumed["steps"] == 6
    one, two = (checkpoint.load(tmp_path / d / "checkpoints" / "last.pt") for d in ("straight", "b"))
    pairs = [*zip(one["model"].values(), two["model"].values()),
             *zip(one["train_step"]["ema"]["module"].values(), two["train_step"]["ema"]["module"].values()),
             *[(a[k], b[k]) for a, b in zip(one["train_step"]["optimizer"]["state"].values(),
                                           two["train_step"]["optimizer"]["state"].values()) for k in a]]
    assert len(pairs) > 20 and all(torch.equal(a, b) for a, b in pairs)
    assert torch.equal(one["rng"]["noise_generator"], two["rng"]["noise_generator"])
    assert one["loss_history"][-1] == two["loss_history"][-1], "steps 5-6 give bit-identical losses"
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "loss" in r] == [2, 3, 4, 6]


def test_training_improves_the_round_trip(tmp_path):
    from diffusion_lab.config.build import build_dataset

    cfg = ae_config(["train.steps=40", "eval.every=0", "train.sample_every=0"])
    longer = train_autoencoder(cfg, tmp_path / "r")
    trained, _ = load_autoencoder(tmp_path / "r", "cpu")
    torch.manual_seed(0)
    untrained = build_autoencoder(dict(cfg.autoencoder), channels=1).eval()
    test = torch.stack([build_dataset(cfg, "test")[i] for i in range(64)])
    error = {name: (m.reconstruct(test) - test).abs().mean().item() for name, m in
             (("trained", trained), ("untrained", untrained))}
    assert error["trained"] < 0.7 * error["untrained"], error
    assert longer["test_recon_l1"] == pytest.approx(error["trained"], rel=1e-5)  # summary: the EMA's held-out L1


def test_load_autoencoder_returns_the_ema_network_and_its_identity(tiny_ae, tmp_path):
    run_dir, _ = tiny_ae
    model, info = load_autoencoder(run_dir, "cpu")
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert info["kind"] == "autoencoder" and info["path"] == str((run_dir / "checkpoints" / "last.pt").resolve())
    assert info["image_shape"] == [1, 8, 8] and info["latent_shape"] == [4, 4, 4] and info["step"] == 6
    assert info["data"] == state["config"]["data"] and info["data"]["name"] == "digits"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ema = state["train_step"]["ema"]["module"]
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    assert info["sha256"] == tensor_hash(ema) != tensor_hash(state["model"])
    checkpoint.save(tmp_path / "copy.pt", state)  # the same weights saved again: the same hash
    assert load_autoencoder(tmp_path / "copy.pt")[1]["sha256"] == info["sha256"]
    state["train_step"]["ema"]["module"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in ema.items()}
    checkpoint.save(tmp_path / "changed.pt", state)
    assert load_autoencoder(tmp_path / "changed.pt")[1]["sha256"] != info["sha256"]


def one_line_refusal(path):
    with pytest.raises(checkpoint.CheckpointError) as caught:
        load_autoencoder(path)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_load_autoencoder_refuses_a_missing_path_a_diffusion_run_and_weights_that_do_not_fit(tiny_ae, tmp_path):
    from diffusion_lab.train import train

    assert "no checkpoint at" in one_line_refusal(tmp_path / "nowhere")
    train(compose_config(TINY + ["logger=none", "eval.every=0", "train.steps=2", "train.sample_every=0"]),
          tmp_path / "diffusion")
    assert "not an autoencoder run" in one_line_refusal(tmp_path / "diffusion")
    state = checkpoint.load(tiny_ae[0] / "checkpoints" / "last.pt")
    state["config"]["autoencoder"]["width"] = 16  # the saved config no longer describes the weights
    checkpoint.save(tmp_path / "edited.pt", state)
    assert "does not hold the model its saved config describes" in one_line_refusal(tmp_path / "edited.pt")


def test_a_bad_override_is_one_line(tmp_path):
    result = run_cli("diffusion_lab.autoencoder", AE_TINY + ["autoencoder.factor=3"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "autoencoder.factor=3 must be one of 1, 2, 4, 8" in result.stderr


def test_a_sweep_over_latent_channels_trains_one_autoencoder_per_job(tmp_path):
    fast = [o for o in AE_TINY if not o.startswith(("train.steps", "eval.every"))] + ["train.steps=2", "eval.every=0"]
    result = run_cli("diffusion_lab.autoencoder", ["-m", *fast, "autoencoder.latent_channels=2,4",
                                                   f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted(p.parent.parent for p in (tmp_path / "sweep").glob("*/checkpoints/last.pt"))
    assert [j.name for j in jobs] == ["0-autoencoder.latent_channels_2", "1-autoencoder.latent_channels_4"]
    assert [load_autoencoder(j)[1]["latent_shape"][0] for j in jobs] == [2, 4]


def test_power_ema_is_refused_before_any_work():
    """train.ema=power writes snapshots in the diffusion loop only: the autoencoder says so in one line, before it
    builds its data or network."""
    from diffusion_lab.autoencoder import build
    from diffusion_lab.errors import ConfigError
    from tests.helpers import compose_config

    cfg = compose_config(["train.ema=power"], config_name="autoencoder")
    with pytest.raises(ConfigError, match="keeps train.ema=standard"):
        build(cfg, None, torch.device("cpu"))
