"""Post-hoc EMA (EDM2): the power EMA's update and profile, the least-squares reconstruction from snapshots, the
snapshots of a train.ema=power run across an interruption, and `evaluate ema_lengths=...`."""
import re

import numpy as np
import pytest
import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.training import checkpoint, posthoc_ema as P
from diffusion_lab.training.ema import EMAS, EMA, PowerEMA
from tests.helpers import TINY, compose_config, run_cli

TRACKED = (0.05, 0.10)


def scripted_trajectory(updates=400, every=50, dtype=torch.float32, between=(0.075,)):
    """A toy module's drifting, noisy weights (momentum on Gaussian steps, like SGD's) folded into a PowerEMA of
    TRACKED, snapshotted every `every` updates and at the end (as `dtype`), and into direct trackers of `between`.
    Returns (model, ema, direct trackers, snapshots, weights per update [updates, n])."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    ema, direct = PowerEMA(model, TRACKED), {s: PowerEMA(model, (s,)) for s in between}
    velocity = [torch.zeros_like(p) for p in model.parameters()]
    snapshots, thetas = [], []
    for t in range(1, updates + 1):
        with torch.no_grad():
            for p, v in zip(model.parameters(), velocity):
                p.add_(v.mul_(0.9).add_(torch.randn_like(p) * 0.01))
        thetas.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        for tracker in (ema, *direct.values()):
            tracker.update(model)
        if t % every == 0 or t == updates:
            tensors = ema.snapshot(dtype)
            snapshots.append(P.Snapshot(t, t, ema.stds, lambda tensors=tensors: tensors, f"update {t}"))
    return model, ema, direct, snapshots, torch.stack(thetas)


def max_error(weights, average):
    return max((weights[name].double() - value.double()).abs().max().item() for name, value in average.items())


def spread(thetas):
    """How far the weights move over training: the largest range of one weight."""
    return (thetas.max(0).values - thetas.min(0).values).max().item()


# ------------------------------------------------------------------------------------------------
# The power function


def test_sigma_rel_and_gamma_round_trip():
    assert P.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's values
    assert P.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma_rel in (0.01, 0.05, 0.075, 0.1, 0.2, 0.28):
        assert P.gamma_to_sigma_rel(P.sigma_rel_to_gamma(sigma_rel)) == pytest.approx(sigma_rel, rel=1e-12)
    assert P.gamma_to_sigma_rel(0) == pytest.approx(P.MAX_SIGMA_REL)
    with pytest.raises(ValueError):
        P.sigma_rel_to_gamma(0.3)


def test_power_ema_equals_the_weighted_average_of_its_profile():
    """float64: the tracked average after t updates is sum_tau w_t(tau) theta_tau to 1e-12; w_t sums to 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    ema, thetas = PowerEMA(model, TRACKED), []
    for _ in range(200):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        thetas.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        ema.update(model)
    for gamma, average in zip(ema.gammas, ema.averages()):
        w = torch.from_numpy(P.power_profile(200, gamma, np.arange(1, 201)))
        assert w.sum().item() == pytest.approx(1.0, abs=1e-12)
        tracked = torch.cat([v.flatten() for v in average.values()])
        assert (tracked - w @ torch.stack(thetas)).abs().max().item() < 1e-12
    assert P.power_beta(1, ema.gammas[0]) == 0.0 and ema.num_updates == 200


def test_the_default_warmup_ema_is_nearly_a_power_ema_of_sigma_rel_0_09():
    """Below ~1800 updates the standard EMA (decay 0.995, warm-up (1 + n) / (10 + n)) never reaches its decay: it
    is 1 - 9 / (t + 9) ~ (1 - 1/t)^9, the power EMA with gamma = 8 (sigma_rel 0.090). Its profile, read off one
    weight per update set to 1 at that update only, matches that power profile to 1% (measured 0.5%) at t = 750."""
    T = 750
    model = torch.nn.Linear(T, 1, bias=False).double()
    ema = EMA(model, decay=0.995, warmup=True)
    for tau in range(T):
        with torch.no_grad():
            model.weight.zero_()[0, tau] = 1.0
        ema.update(model)
    profile = ema.module.weight[0].numpy()
    power = P.power_profile(T, 8.0, np.arange(1, T + 1))
    assert np.linalg.norm(profile - power) / np.linalg.norm(power) < 0.01
    assert P.gamma_to_sigma_rel(8.0) == pytest.approx(0.0905, abs=1e-4)


def test_discrete_gram_matrix_approaches_edm2s_continuous_one():
    """At t ~ 1e4-1e5 updates the exact discrete inner products are within 2e-4 (relative) of EDM2's continuous
    closed form; the error shrinks like 1/t."""
    profiles = [(t, P.sigma_rel_to_gamma(s)) for t in (20_000, 50_000, 100_000) for s in (0.05, 0.1, 0.2)]
    G, _ = P.gram(profiles, profiles[0], chunk=1 << 14)
    continuous = np.array([[P.continuous_dot(*a, *b) for b in profiles] for a in profiles])
    assert np.abs(G / continuous - 1).max() < 2e-4


# ------------------------------------------------------------------------------------------------
# Reconstruction


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float16, 1e-3)])
def test_reconstructing_a_tracked_length_gives_its_average(dtype, tolerance):
    """The last snapshot holds the tracked averages, so the least squares picks them: measured error 0.0 with
    float32 snapshots, 3.1e-4 of the weights' spread with float16 ones (their rounding)."""
    model, ema, _, snapshots, thetas = scripted_trajectory(dtype=dtype)
    for sigma_rel, average in zip(TRACKED, ema.averages()):
        weights, x = P.reconstruct(snapshots, sigma_rel, model.state_dict())
        assert max_error(weights, average) <= tolerance * spread(thetas), sigma_rel
        assert all(w.dtype == torch.float32 for w in weights.values())


def test_a_length_between_the_tracked_ones_is_reconstructed():
    """sigma_rel 0.075 (tracked directly by a third PowerEMA) from 9 snapshots of 0.05 and 0.10 over 400 updates:
    measured error 1.2e-3 of the weights' spread (float32 snapshots; 1.3e-3 with float16), with the profiles
    themselves matched to 1.2% (relative L2). Asserted: 3e-3."""
    model, _, direct, snapshots, thetas = scripted_trajectory()
    weights, x = P.reconstruct(snapshots, 0.075, model.state_dict())
    assert max_error(weights, direct[0.075].averages()[0]) < 3e-3 * spread(thetas)
    assert sum(x) == pytest.approx(1.0, abs=0.02)


def test_snapshot_files_round_trip(tmp_path):
    model, ema, _, _, _ = scripted_trajectory(updates=60)
    path = P.write_snapshot(P.snapshot_path(tmp_path, 60), ema.snapshot(torch.float32), 60, 60, ema.stds, "float32")
    read = P.read_snapshot(path)
    assert (read.step, read.num_updates, read.sigma_rels) == (60, 60, TRACKED)
    weights, _ = P.reconstruct([read], 0.10, model.state_dict())
    assert max_error(weights, ema.averages()[1]) == 0.0
    (tmp_path / P.SNAPSHOT_DIR / "step_0000070.safetensors").write_bytes(b"torn")
    with pytest.raises(ConfigError, match="cannot read EMA snapshot .*step_0000070"):
        P.read_snapshot(tmp_path / P.SNAPSHOT_DIR / "step_0000070.safetensors")


def test_power_ema_state_dict_round_trips_and_keeps_module():
    model, ema, _, _, _ = scripted_trajectory(updates=30)
    state = ema.state_dict()
    assert set(state["module"]) == set(model.state_dict()) and state["stds"] == list(TRACKED)
    again = PowerEMA(model, TRACKED)
    again.load_state_dict(state)
    assert again.num_updates == 30
    for a, b in zip(again.averages(), ema.averages()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerEMA(model, (0.05,)).load_state_dict(state)
    assert EMAS.names() == ["power", "standard"]
    assert isinstance(EMAS.build("standard", model=model, train=compose_config().train), EMA)


# ------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("override, needle", [
    ("train.ema=fancy", "train.ema='fancy' must be one of power, standard"),
    ("train.ema_stds=[0.05,0.3]", "train.ema_stds[1]=0.3 must be in (0, 0.2887)"),
    ("train.ema_stds=[0.0]", "train.ema_stds[0]=0.0 must be in (0, 0.2887)"),
    ("train.ema_stds=[]", "train.ema_stds=[] must be a non-empty list of float"),
    ("train.ema_stds=[0.05,0.05]", "train.ema_stds=[0.05, 0.05] must be distinct values"),
    ("train.ema_snapshot_every=0", "train.ema_snapshot_every=0 must be > 0"),
    ("train.ema_snapshot_dtype=int8", "train.ema_snapshot_dtype='int8' must be one of float16, bfloat16, float32"),
])
def test_bad_ema_settings_are_one_line(override, needle):
    from diffusion_lab.config.validation import validate

    with pytest.raises(ConfigError) as error:
        validate(compose_config([override]))
    assert str(error.value).startswith(needle) and "\n" not in str(error.value)


def test_bad_ema_lengths_are_one_line():
    from diffusion_lab.config.validation import validate

    with pytest.raises(ConfigError, match=r"^ema_lengths\[1\]=0.5 must be in \(0, 0.2887\)"):
        validate(compose_config(["checkpoint=x", "ema_lengths=[0.1,0.5]"], config_name="evaluate"))


def test_old_checkpoints_compare_as_standard_ema():
    saved = compose_config()
    old = {k: v for k, v in checkpoint.OmegaConf.to_container(saved).items()}
    for key in ("ema", "ema_stds", "ema_snapshot_every", "ema_snapshot_dtype"):
        old["train"].pop(key)
    assert checkpoint.config_differences(old, checkpoint.OmegaConf.to_container(saved)) == []
    assert checkpoint.config_differences(old, checkpoint.OmegaConf.to_container(compose_config(["train.ema=power"])))


# ------------------------------------------------------------------------------------------------
# Runs


POWER = TINY + ["logger=none", "eval.every=0", "train.sample_every=0", "train.lr_schedule=constant", "train.ema=power",
                "train.ema_snapshot_every=2", "train.ema_snapshot_dtype=float32", "train.checkpoint_every=4",
                "train.steps=8"]


def snapshot_tensors(run_dir):
    from safetensors.torch import load_file

    return {step: load_file(str(path)) for step, path in P.snapshot_files(run_dir).items()}


def assert_same_files(one, two):
    a, b = snapshot_tensors(one), snapshot_tensors(two)
    assert sorted(a) == sorted(b) == [2, 4, 6, 8]
    assert all(a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s]) for s in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    from diffusion_lab.train import train

    run_dir = tmp_path_factory.mktemp("straight")
    train(compose_config(POWER), run_dir)
    return run_dir


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_snapshots(straight, tmp_path, monkeypatch):
    """A run that dies after step 6 (checkpoint at 4, snapshots up to 6, and a stray step_7 file) resumed in its own
    dir and in a new one: the snapshots and every tracked average are tensor-equal to those of a straight run."""
    from diffusion_lab.train import train
    from diffusion_lab.training.loop import Loop

    after_step = Loop.after_step

    def dies_after_step_6(self, bar):
        after_step(self, bar)
        if self.state.step == 6:
            raise RuntimeError("killed")

    monkeypatch.setattr(Loop, "after_step", dies_after_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_config(POWER), tmp_path / "crashed")
    monkeypatch.setattr(Loop, "after_step", after_step)
    assert sorted(P.snapshot_files(tmp_path / "crashed")) == [2, 4, 6]
    (tmp_path / "crashed" / P.SNAPSHOT_DIR / "step_0000007.safetensors").write_bytes(b"written before the crash")
    last = tmp_path / "crashed" / "checkpoints" / "last.pt"
    train(compose_config(POWER + [f"train.resume={last}"]), tmp_path / "elsewhere")
    train(compose_config(POWER + [f"train.resume={last}"]), tmp_path / "crashed")
    one = checkpoint.load(straight / "checkpoints" / "last.pt")["train_step"]["ema"]
    for run_dir in (tmp_path / "elsewhere", tmp_path / "crashed"):
        assert_same_files(straight, run_dir)
        two = checkpoint.load(run_dir / "checkpoints" / "last.pt")["train_step"]["ema"]
        assert one["num_updates"] == two["num_updates"] == 8
        for a, b in zip(one["averages"], two["averages"]):
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_evaluate_sweeps_ema_lengths_and_sample_reads_the_best(straight, tmp_path):
    out = tmp_path / "ev"
    result = run_cli("diffusion_lab.evaluate", [f"checkpoint={straight}", "ema_lengths=[0.05,0.075]",
                                                "samplers=[{name:ddim,steps:3}]", "num_samples=16", "batch_size=8",
                                                "eval.feature_extractor=small", f"hydra.run.dir={out}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"sigma_rel 0\.075 \(rebuilt in [0-9.]+s\), ddim, 3 steps, 3 NFE: FID ", result.stdout)
    assert result.stdout.count("ddim, 3 steps, 3 NFE: FID ") == 2  # one line per EMA length
    rows = (out / "ema_fid.csv").read_text().splitlines()
    assert rows[0] == "sigma_rel,setting,fid,fid_floor,seconds,reconstruction_seconds" and len(rows) == 3
    assert (out / "ema_fid.png").is_file() and f"wrote {out / 'posthoc_ema.pt'}" in result.stdout
    saved = checkpoint.load(out / "posthoc_ema.pt")
    record = saved["posthoc_ema"]
    assert record["sigma_rel"] in (0.05, 0.075) and record["snapshot_steps"] == [2, 4, 6, 8]
    if record["sigma_rel"] == 0.05:  # the tracked length: the reconstruction is the run's own EMA
        run_ema = checkpoint.load(straight / "checkpoints" / "last.pt")["train_step"]["ema"]["module"]
        assert max_error(saved["train_step"]["ema"]["module"], run_ema) < 1e-6
    sampled = run_cli("diffusion_lab.sample", [f"checkpoint={out / 'posthoc_ema.pt'}", "num_samples=4",
                                               "batch_size=4", f"hydra.run.dir={tmp_path / 's'}"], tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    with pytest.raises(checkpoint.CheckpointError, match="post-hoc EMA reconstruction"):
        checkpoint.load_for_resume(out / "posthoc_ema.pt", compose_config(POWER))


@pytest.mark.slow
def test_a_standard_ema_run_has_no_snapshots_in_one_line(tmp_path):
    from diffusion_lab.train import train

    run_dir = tmp_path / "run"
    train(compose_config(TINY + ["logger=none", "eval.every=0", "train.steps=2", "train.sample_every=0"]), run_dir)
    assert not (run_dir / P.SNAPSHOT_DIR).exists()
    result = run_cli("diffusion_lab.evaluate", [f"checkpoint={run_dir}", "ema_lengths=[0.1]",
                                                f"hydra.run.dir={tmp_path / 'ev'}"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {run_dir} has no EMA snapshots (trained with train.ema=standard); train with train.ema=power to "
        "choose the EMA length after training"], result.stderr[-2000:]
    assert not (tmp_path / "ev").exists(), "a refused command leaves no run dir behind"
