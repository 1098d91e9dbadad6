"""Consistency models: the boundary condition, the closed-form consistency function of Gaussian data, the
recipes' noise levels and curricula, distillation from an exact teacher, and multistep sampling."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusion_lab.diffusion import consistency, grids, samplers
from diffusion_lab.diffusion.exact import ExactDenoiser, GaussianMixture, gaussian
from diffusion_lab.diffusion.objectives import ConsistencyObjective, boundary_sigma
from diffusion_lab.diffusion.samplers import Trajectory
from diffusion_lab.diffusion.schedules import log_snr
from diffusion_lab.registry import OBJECTIVES, SCHEDULES

PROCESSES = {"edm": {}, "vp": {}, "ve": {}, "flow": {}, "cosine": {}, "linear": {}}
BASES = ("edm", "eps", "v", "x0", "flow")


def _process(name):
    return SCHEDULES.build(name, **PROCESSES[name])


def _pairs(process):
    """(base, process) pairs that can work (eps cannot on the flow path)."""
    return [b for b in BASES if not (b == "eps" and name_of(process) == "flow") and not (b == "flow" and process.discrete)]


def name_of(process):
    return process.name or "discrete"


@pytest.mark.parametrize("name", list(PROCESSES))
def test_the_boundary_condition_holds_exactly_for_every_base_and_process(name):
    process = _process(name)
    t_end = grids.end_time(process)
    for base in _pairs(process):
        objective = ConsistencyObjective(base=base)
        x = 3 * torch.randn(5, 1, 4, 4, dtype=torch.float64)
        t = process.time_tensor(t_end, 5, "cpu")
        a = float(process.alpha(t[:1].to(torch.float64) if not process.discrete else t[:1]))
        f, _ = objective.to_x0_eps(torch.randn_like(x) * 100, x, process, t)  # any network output
        assert torch.equal(f, x / a), (name, base)
        # away from the boundary the network output matters
        t_mid = process.time_tensor(grids.karras(process, 3)[1].item(), 5, "cpu")
        assert not torch.allclose(*(objective.to_x0_eps(o, x, process, t_mid)[0] for o in (x * 0, x)))


def test_base_edm_is_the_papers_c_skip_c_out():
    """Song et al. 2023, Appendix C: c_skip = d^2 / ((s - s_min)^2 + d^2), c_out = d (s - s_min) / sqrt(d^2 + s^2),
    c_in = 1 / sqrt(s^2 + d^2) on the EDM process."""
    process, d = _process("edm"), 0.5
    objective, s_min = ConsistencyObjective(base="edm", sigma_data=d), 0.002
    s = torch.tensor([0.01, 0.3, 2.0, 80.0], dtype=torch.float64)
    x, F = torch.randn(4, 1, 2, 2, dtype=torch.float64), torch.randn(4, 1, 2, 2, dtype=torch.float64)
    c_skip = d**2 / ((s - s_min) ** 2 + d**2)
    c_out = d * (s - s_min) / torch.sqrt(d**2 + s**2)
    expected = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F
    torch.testing.assert_close(objective.to_x0_eps(F, x, process, s)[0], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(objective.c_in(process, s), 1 / torch.sqrt(s**2 + d**2))
    assert boundary_sigma(process) == pytest.approx(s_min)


def _gaussian_consistency(y, s, c, s_min):
    """For x0 ~ N(0, c^2) on alpha = 1, the PF-ODE keeps y / sqrt(c^2 + s^2): f(y, s) = y sqrt(c^2 + s_min^2) /
    sqrt(c^2 + s^2)."""
    return y * math.sqrt(c**2 + s_min**2) / torch.sqrt(c**2 + s**2)


def _ode_end_error(solver, levels, c=0.7):
    process = _process("edm")
    teacher = ExactDenoiser(process, gaussian(0.0, c), kind="x0")
    ts = grids.karras(process, levels)
    x = 80 * torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = _gaussian_consistency(x, torch.tensor(80.0, dtype=torch.float64), c, float(ts[-1]))
    for hi, lo in zip(ts[:-1].tolist(), ts[1:].tolist()):
        x = consistency.teacher_step(teacher, process, x, torch.full((64,), hi, dtype=torch.float64),
                                     torch.full((64,), lo, dtype=torch.float64), solver)
    return ((x - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("solver, order, tol", [("heun", 2, 1e-3), ("euler", 1, 2e-2)])
def test_teacher_steps_converge_to_the_closed_form_end_point_of_the_gaussian_ode(solver, order, tol):
    """Chaining teacher_step over Karras levels with the exact Gaussian denoiser ends at the closed form, with
    the solver's order: doubling the levels divides the error by 2^order (Heun 2, Euler 1)."""
    coarse, fine = _ode_end_error(solver, 80), _ode_end_error(solver, 160)
    assert fine < tol
    assert coarse / fine == pytest.approx(2**order, rel=0.15)


def test_teacher_step_is_the_heun_samplers_step():
    """One Heun step from t to r equals the heun sampler's x_t at r on the grid [t, r] (its third evaluation)."""
    process = _process("cosine")
    teacher = ExactDenoiser(process, GaussianMixture([0.3, 0.7], [-0.5, 0.4], [0.1, 0.2]), kind="eps")
    objective = OBJECTIVES.build("eps")
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    trajectory = Trajectory(at=[2])
    samplers.heun(teacher, process, objective, x, grid=[700, 300], clamp_final=False, callback=trajectory)
    D = consistency.denoiser(teacher, objective, process)
    step = consistency.teacher_step(D, process, x, torch.full((8,), 700), torch.full((8,), 300), "heun")
    torch.testing.assert_close(step, trajectory.x_t[0].to(step.dtype), rtol=1e-10, atol=1e-10)


def test_ict_curriculum_and_levels():
    """N(k) = min(s0 2^floor(k / K'), s1) + 1 with K' = floor(K / (log2(s1/s0) + 1)) (iCT): 11 levels at the
    start, 1281 at the end; levels are Karras, descending, ending exactly at the boundary."""
    process = _process("edm")
    loss = consistency.ConsistencyLoss(process, ConsistencyObjective(), method="ct")
    K = 8000  # K' = floor(8000 / 8) = 1000
    counts = []
    for k in (0, 999, 1000, 2000, 6999, 7000, 7999):
        loss.set_progress(k, K)
        counts.append(loss.num_levels())
    assert counts == [11, 11, 21, 41, 641, 1281, 1281]
    ts = loss.levels_at(11)
    assert bool((ts[:-1] > ts[1:]).all()) and ts[0].item() == pytest.approx(80.0) and ts[-1] == grids.end_time(process)


def test_ict_pairs_follow_the_discretised_lognormal():
    """p(i) ~ erf((ln s_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln s_i - P_mean) / (sqrt 2 P_std))."""
    process = _process("edm")
    loss = consistency.ConsistencyLoss(process, ConsistencyObjective(), method="ct")
    loss.set_progress(0, 100)
    pairs = loss.sample_t(200_000, "cpu", torch.Generator().manual_seed(0))
    ts = loss.levels_at(11)
    assert bool((pairs[:, 0] > pairs[:, 1]).all())
    index = {float(t): i for i, t in enumerate(ts.tolist())}
    assert all(index[float(hi)] + 1 == index[float(lo)] for hi, lo in pairs[:50].tolist())  # adjacent levels
    s = ts.flip(0)  # ascending
    cdf = torch.erf((s.log() + 1.1) / (math.sqrt(2) * 2.0))
    p = (cdf[1:] - cdf[:-1]) / (cdf[1:] - cdf[:-1]).sum()
    seen = torch.bincount(torch.tensor([len(ts) - 1 - index[float(lo)] for lo in pairs[:, 1].tolist()]), minlength=10)
    torch.testing.assert_close(seen.double() / len(pairs), p, atol=4e-3, rtol=0)


def test_ect_gap_shrinks_by_q_each_stage_and_ends_at_the_boundary():
    process = _process("edm")
    loss = consistency.ConsistencyLoss(process, ConsistencyObjective(), method="ect", ect_stages=4)
    gaps = []
    for step in (0, 25, 50, 75):
        loss.set_progress(step, 100)
        pairs = loss.sample_t(4000, "cpu", torch.Generator().manual_seed(0))
        t, r = pairs[:, 0], pairs[:, 1]
        at_boundary = t == grids.end_time(process)  # a lognormal draw below the range is clamped to it
        assert bool((r[~at_boundary] < t[~at_boundary]).all()) and bool((r >= grids.end_time(process)).all())
        assert (loss.weight(t, r)[at_boundary] == 0).all() and at_boundary.float().mean() < 0.01
        s_r = t * (1 - 2.0 ** -(loss.ect_stage() + 1) * (1 + 8 * torch.sigmoid(-t)))
        above = s_r > grids.end_time(process)
        torch.testing.assert_close(r[above], s_r[above])  # edm: the time is the noise level
        assert bool((r[~above] == grids.end_time(process)).all())
        gaps.append(((t - r) / t)[t > 5].mean().item())
    assert all(a / b == pytest.approx(2.0, rel=0.05) for a, b in zip(gaps, gaps[1:]))


def test_a_discrete_schedule_caps_ct_levels_at_its_timesteps_and_refuses_ect():
    loss = consistency.ConsistencyLoss(_process("cosine"), ConsistencyObjective(base="eps"), method="ct")
    loss.set_progress(10**6, 10**6)
    usable = int((log_snr(_process("cosine")) >= -5.1).sum())  # the Karras grid's clip: 996 of the 1000 timesteps
    assert loss.num_levels() == usable and torch.equal(loss.levels_at(usable), torch.arange(usable - 1, -1, -1))
    with pytest.raises(ValueError, match="cannot hold"):
        consistency.ConsistencyLoss(_process("cosine"), ConsistencyObjective(base="eps"), method="cd", levels=1001)
    with pytest.raises(ValueError, match="continuous process"):
        consistency.ConsistencyLoss(_process("cosine"), ConsistencyObjective(base="eps"), method="ect")
    with pytest.raises(ValueError, match="objective=consistency"):
        consistency.ConsistencyLoss(_process("edm"), OBJECTIVES.build("edm"), method="ct")


class GainNet(torch.nn.Module):
    """F(x, c_noise) = g(c_noise) x with a small MLP g: it can represent the Gaussian consistency function."""

    def __init__(self):
        super().__init__()
        self.g = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.SiLU(), torch.nn.Linear(32, 1))

    def forward(self, x, c_noise, y=None):
        return self.g(c_noise.float().view(-1, 1)).view(-1, 1, 1, 1) * x


def _student_errors(net, process, objective, c, s_min):
    """Relative RMS error of the student's f against the closed form at noise levels 0.05 .. 80."""
    model = objective.network(net, process)
    s = torch.tensor([0.05, 0.3, 1.0, 3.0, 10.0, 40.0, 80.0], dtype=torch.float64)
    y = torch.randn(len(s), 1, 4, 4, generator=torch.Generator().manual_seed(5)) * torch.sqrt(c**2 + s**2).view(-1, 1, 1, 1).float()
    with torch.no_grad():
        f = consistency.denoiser(model, objective, process)(y, s)
    exact = _gaussian_consistency(y.double(), s.view(-1, 1, 1, 1), c, s_min)
    return ((f.double() - exact).pow(2).flatten(1).mean(1) / exact.pow(2).flatten(1).mean(1)).sqrt()


def _train(method, steps=1500, batch=128):
    torch.manual_seed(0)
    process, c = _process("edm"), 0.5
    objective = ConsistencyObjective(base="edm", sigma_data=0.5)
    loss = consistency.ConsistencyLoss(process, objective, method=method, levels=18, s0=10, s1=80, metric="l2")
    loss.teacher = consistency.denoiser(ExactDenoiser(process, gaussian(0.0, c), kind="edm"), OBJECTIVES.build("edm"),
                                        process)
    net, s_min = GainNet(), boundary_sigma(process)
    before = _student_errors(net, process, objective, c, s_min)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss.set_progress(step, steps)
        x0 = c * torch.randn(batch, 1, 2, 2, generator=generator)
        t = loss.sample_t(batch, "cpu", generator)
        value = loss(objective.network(net, process), x0, t, torch.randn(x0.shape, generator=generator))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    return before, _student_errors(net, process, objective, c, s_min)


def test_distillation_from_the_exact_denoiser_reaches_the_closed_form_consistency_function():
    """CD with the exact Gaussian denoiser as teacher (18 Heun levels) brings a gain network's f within 8% of the
    closed-form PF-ODE end point at every level from 0.05 to 80 (it starts 50-110% off above s = 1; seen:
    at most 6.3%, 0.4-2% above s = 1)."""
    before, after = _train("cd")
    assert before[2:].min() > 0.5
    assert after.max() < 0.08, after


def test_consistency_training_from_data_alone_moves_towards_it():
    """CT (no teacher, iCT curriculum 10 -> 80 levels) gets the same network within 10% at s <= 10 and at least
    halves its error at 40 and 80 in the same steps (seen: 2-9% and 34-48%, from 98-109%): training from data
    converges more slowly than distillation, as Song et al. 2023 report."""
    before, after = _train("ct")
    assert after[:5].max() < 0.1, after
    assert bool((after[5:] < before[5:] / 2).all()), (before, after)


def test_multistep_sampling_of_the_exact_consistency_function_is_exact():
    """With f the closed form, every step of Algorithm 1 keeps the samples N(0, c^2 + s_min^2): 1, 2 and 4 steps
    give that std, and each step costs one evaluation."""
    process, c = _process("edm"), 0.6
    s_min = boundary_sigma(process)
    objective = OBJECTIVES.build("x0")

    def f(x_t, t):  # the x0 objective's prediction is f itself
        return _gaussian_consistency(x_t, t.view(-1, 1, 1, 1), c, s_min).to(x_t.dtype)

    for steps in (1, 2, 4):
        trajectory = Trajectory()
        x = samplers.consistency(f, process, objective, torch.randn(20000, 1, 1, 1, dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(steps)),
                                 steps=steps, clamp_final=False, callback=trajectory,
                                 generator=torch.Generator().manual_seed(9))
        assert len(trajectory) == steps == samplers.num_evaluations("consistency", {"steps": steps}, process)
        assert trajectory.timesteps[0] == pytest.approx(80.0)
        assert x.std().item() == pytest.approx(math.sqrt(c**2 + s_min**2), rel=0.02)


def test_sampling_starts_at_the_objectives_sigma_max():
    process = _process("cosine")
    objective = ConsistencyObjective(base="eps", sigma_max=20.0)
    trajectory = Trajectory()
    samplers.consistency(lambda x, t: torch.zeros_like(x), process, objective, torch.randn(2, 1, 2, 2), steps=2,
                         callback=trajectory)
    first = trajectory.timesteps[0]
    assert process.sigma(torch.tensor(first)) / process.alpha(torch.tensor(first)) == pytest.approx(20.0, rel=0.05)
    loss = consistency.ConsistencyLoss(process, objective, method="cd", levels=18)
    assert loss.levels_at(18)[0].item() == first


# -- runs: a tiny teacher, its distillation, refusals, exact resume, evaluation beside the teacher ---------------

from omegaconf import OmegaConf  # noqa: E402

from diffusion_lab.config.validation import validate  # noqa: E402
from diffusion_lab.errors import ConfigError  # noqa: E402
from diffusion_lab.train import train  # noqa: E402
from diffusion_lab.training import checkpoint  # noqa: E402
from tests.helpers import TINY, compose_config  # noqa: E402

RUN = TINY + ["logger=none", "eval.every=0"]
STUDENT = ["objective=consistency", "sampler=consistency", "sampler.steps=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    train(compose_config(RUN), run_dir)
    return run_dir


def test_a_distilled_run_starts_from_its_teacher_and_records_it(teacher, tmp_path):
    overrides = RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={teacher}",
                                 "train.steps=1"]
    cfg = compose_config(overrides)
    summary = train(cfg, tmp_path / "cd")
    assert summary["teacher"]["run_dir"] == str(teacher) and summary["teacher"]["objective"] == "eps"
    assert summary["teacher"]["init_from_teacher"] and summary["steps"] == 1
    # with lr 0 the student's weights stay exactly the teacher's EMA weights
    frozen = train(compose_config(overrides + ["train.lr=1e-30", "train.warmup_steps=0"]), tmp_path / "lr0")
    student = checkpoint.load(Path(frozen["checkpoint"]))["model"]
    teacher_ema = checkpoint.load(teacher / "checkpoints" / "last.pt")["train_step"]["ema"]["module"]
    assert all(torch.allclose(student[k].float(), teacher_ema[k].float(), atol=1e-6) for k in teacher_ema)


@pytest.mark.parametrize("overrides, message", [
    (["objective.method=cd"], "needs train.teacher"),
    (["objective.method=ect", "schedule=edm"], "needs train.teacher"),
    (["objective.method=cd", "train.teacher=/nonexistent/run"], "must be an existing checkpoint"),
])
def test_a_missing_teacher_is_refused_before_the_run(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(RUN + STUDENT + overrides))


def test_train_teacher_without_a_consistency_objective_is_refused(teacher):
    with pytest.raises(ConfigError, match="objective=consistency only"):
        validate(compose_config(RUN + [f"train.teacher={teacher}"]))


@pytest.mark.parametrize("overrides, message", [
    (["data.image_size=16"], "was trained on data=digits at 1x8x8; this run is data=digits at 1x16x16"),
    (["schedule=linear"], "shares its teacher's process"),
    (["model.hidden_dims=[16,16]"], "network differs"),
    (["objective.base=edm"], "objective.base=eps"),
    (["objective.method=ect", "train.init_from_teacher=false", "schedule=edm"], "process"),
])
def test_a_teacher_that_does_not_fit_is_refused_with_one_line(teacher, tmp_path, overrides, message):
    cfg = compose_config(RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={teacher}"]
                         + overrides)
    with pytest.raises(ConfigError, match=message) as refused:
        train(cfg, tmp_path / "refused")
    assert "\n" not in str(refused.value)


def test_a_consistency_model_is_not_a_teacher(teacher, tmp_path):
    student = tmp_path / "student"
    train(compose_config(RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={teacher}",
                                          "train.steps=1"]), student)
    cfg = compose_config(RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={student}"])
    with pytest.raises(ConfigError, match="is a consistency model"):
        train(cfg, tmp_path / "refused")


def test_a_consistency_training_run_resumes_exactly(tmp_path):
    """6 steps straight == 3 + resume to 6, bit for bit (loss, weights). The curriculum is a function of (step,
    train.steps), like the lr schedule, so the 3-step first half holds it fixed (s0 = s1) and a constant lr."""
    base = RUN + STUDENT + ["schedule=edm", "objective.s0=40", "objective.s1=40", "train.lr_schedule=constant"]
    straight = train(compose_config(base), tmp_path / "straight")
    train(compose_config([o for o in base if not o.startswith("train.steps")] + ["train.steps=3"]), tmp_path / "a")
    resumed = train(compose_config(base + [f"train.resume={tmp_path / 'a'}"]), tmp_path / "b")
    one, two = (checkpoint.load(Path(s["checkpoint"])) for s in (straight, resumed))
    assert one["loss_history"][-1] == two["loss_history"][-1]  # the step-4 window holds 2 steps straight, 1 resumed
    assert all(torch.equal(v, two["model"][k]) for k, v in one["model"].items())


def test_evaluate_scores_the_teacher_beside_and_compare_keeps_them_apart(teacher, tmp_path, capsys):
    from diffusion_lab.evaluate import evaluate
    from diffusion_lab.evaluation.cost import read_evaluation

    student = tmp_path / "student"
    train(compose_config(RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={teacher}",
                                          "train.steps=2"]), student)
    cfg = compose_config([f"checkpoint={student}", "num_samples=64", "batch_size=32", "teacher_nfe=[3]",
                          "samplers=[{name:consistency,steps:1},{name:consistency,steps:2}]"], config_name="evaluate")
    rows = evaluate(cfg, tmp_path / "eval")
    assert [(r["model"], r["nfe"]) for r in rows] == [("checkpoint", 1), ("checkpoint", 2), ("teacher", 3)]
    own = compose_config(RUN).sampler.name  # the teacher is scored with the sampler it was trained with
    assert rows[2]["setting"].startswith(f"teacher: {own}")
    import json
    assert json.loads((tmp_path / "eval" / "fid_vs_cost.json").read_text())["teacher"] == str(teacher)
    assert [r["nfe"] for r in read_evaluation(tmp_path / "eval", {}).rows] == [1, 2]
    from diffusion_lab.evaluation.plots import fid_vs_cost_figure

    legend = [t.get_text() for t in fid_vs_cost_figure(rows, "x").axes[0].get_legend().get_texts()]
    assert f"teacher: {own}" in legend and "consistency" in legend  # not guided: no "w=1"


@pytest.mark.parametrize("name, sigma_max", [("edm", None), ("cosine", 20.0)])
def test_the_2_and_4_step_samplers_sample_on_the_default_cd_levels(name, sigma_max):
    """CD learns f at its levels only: with the default 17 (16 intervals) every time the 1-, 2- and 4-step
    samplers evaluate is a training level (with 18, the paper's, the 2-step's second time is not)."""
    process = _process(name)
    objective = ConsistencyObjective(base="edm" if name == "edm" else "eps", sigma_max=sigma_max)
    levels = set(consistency.ConsistencyLoss(process, objective, method="cd").levels_at(17).tolist())
    eighteen = set(consistency.ConsistencyLoss(process, objective, method="cd", levels=18).levels_at(18).tolist())
    for steps in (1, 2, 4):
        trajectory = Trajectory()
        samplers.consistency(lambda x, t: torch.zeros_like(x), process, objective, torch.randn(2, 1, 2, 2),
                             steps=steps, callback=trajectory)
        times = [round(t, 9) for t in trajectory.timesteps]
        assert set(times) <= {round(t, 9) for t in levels}, (steps, times)
        if steps == 2:
            assert not set(times) <= {round(t, 9) for t in eighteen}


def test_distillation_from_a_continuous_class_conditional_teacher(tmp_path):
    """An EDM, class-conditional teacher: the student (base=edm on its process) distils with labels, and the
    consistency sampler guides it (w = 2) with one evaluation per step and per branch."""
    from diffusion_lab.config.trained import load_trained
    from diffusion_lab.diffusion.samplers import build_sampler

    continuous = ["schedule=edm", "model.num_classes=auto"]
    teacher_dir = tmp_path / "teacher"
    train(compose_config(RUN + continuous + ["objective=edm", "train.steps=2"]), teacher_dir)
    student_dir = tmp_path / "student"
    summary = train(compose_config(RUN + continuous + STUDENT + ["objective.method=cd", "objective.base=edm",
                                                                 f"train.teacher={teacher_dir}", "train.steps=2"]),
                    student_dir)
    assert summary["teacher"]["schedule"] == "edm" and summary["steps"] == 2
    student = load_trained(student_dir, torch.device("cpu"))
    model = student.objective.network(student.model, student.schedule)
    noise, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    x = {w: build_sampler("consistency", steps=2, guidance_scale=w, clamp_final=False)(
        model, student.schedule, student.objective, noise, y=y, generator=torch.Generator().manual_seed(0))
        for w in (1.0, 2.0)}
    assert x[2.0].shape == (4, 1, 8, 8) and bool(torch.isfinite(x[2.0]).all())
    assert not torch.allclose(x[1.0], x[2.0]), "w = 2 applied no guidance"


def test_sampling_a_consistency_model_with_an_ode_sampler_says_so(teacher, tmp_path, capsys):
    """`sample` with its default sampler (an ODE/SDE sampler) on a consistency checkpoint prints one note naming
    sampler=consistency; with sampler=consistency there is no note."""
    from tests.helpers import run_main

    student = tmp_path / "student"
    train(compose_config(RUN + STUDENT + ["objective.method=cd", "objective.base=eps", f"train.teacher={teacher}",
                                          "train.steps=1"]), student)
    for sampler, noted in (([], True), (["sampler=consistency", "sampler.steps=1"], False)):
        code, out, err = run_main("diffusion_lab.sample", [f"checkpoint={student}", "num_samples=4", *sampler,
                                                           f"hydra.run.dir={tmp_path / ('s' + str(noted))}"],
                                  tmp_path, capsys)
        assert code == 0, err
        default = compose_config([f"checkpoint={student}"], config_name="sample").sampler.name
        assert (f"is a consistency model; sampler={default} uses it as a denoiser" in out + err) == noted
