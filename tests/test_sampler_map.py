"""The sampler map (docs/sampler_map.md): each of our samplers against its diffusers scheduler or k-diffusion
function, on the same exact model (the mixture of ``diffusion.exact``), the same x_T and the same noise.

Each test asserts the max-abs difference of the two outputs below a tolerance set above the largest value
measured (printed with -s; the outputs themselves are O(1)). Float64 on both sides except where
diffusers keeps its tables in float32 (discrete betas, sigmas, EDM sigmas): those rows are equal to float32
precision. Every test also asserts the output moved away from the start, so a sampler that does nothing fails.
k-diffusion's tests skip where it is not installed (CI); diffusers' run everywhere (a test dependency).
"""
import inspect
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.diffusion import grids
from diffusion_lab.diffusion.exact import ExactDenoiser, GaussianMixture
from diffusion_lab.diffusion.processes import EDMProcess, FlowProcess, VEProcess, VPProcess
from diffusion_lab.diffusion.samplers import (
    Trajectory,
    _grid,
    consistency,
    ddim,
    ddpm,
    dpm_solver,
    dpm_solver_3m,
    edm,
    euler,
    euler_ancestral,
    heun,
    pc,
)
from diffusion_lab.diffusion.schedules import cosine, linear
from diffusion_lab.registry import OBJECTIVES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from bench_vs_kdiffusion import load_kdiffusion_sampling  # noqa: E402

diffusers = pytest.importorskip("diffusers")

MIX = GaussianMixture([0.3, 0.7], [-0.5, 0.4], [0.1, 0.15])  # two modes, as tests/test_samplers.py
SHAPE = (16, 1, 2, 2)  # 64 scalar draws per run: cheap, and enough to see any difference
SCHEDULES = {"linear": linear, "cosine": cosine}
FLOAT32_TOL = 1e-4  # diffusers' float32 tables (betas, sigmas) and float32 steps: measured up to 4.3e-5
EDM_TOL = 1e-3  # diffusers' EDM schedulers (float32 sigmas up to sigma_max 80; EDMEulerScheduler also rounds the
#                 sample to float32 in each step): measured up to 2.1e-4
FLOAT64_TOL = 1e-10  # k-diffusion, both sides in float64: measured up to 3.1e-13


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ours(fn, process, x_T, kind: str = "eps", seed: int = 1, **kw) -> torch.Tensor:
    """Our sampler on the exact model of MIX, no clamp of the result (``clip_x0`` as given, default off)."""
    kw.setdefault("clip_x0", False)
    return fn(ExactDenoiser(process, MIX, kind), process, OBJECTIVES.build(kind), x_T, clamp_final=False,
              generator=_gen(seed), **kw)


def _assert_equal(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float, x_T: torch.Tensor) -> None:
    diff = (ours - theirs.to(ours.dtype)).abs().max().item()
    print(f"{name}: max-abs difference {diff:.2e} (tolerance {tol:.0e})")
    assert diff < tol, f"{name}: max-abs difference {diff:.3e} >= {tol:.0e}"
    assert (ours - x_T).abs().max().item() > 0.1, f"{name}: the sample did not move"


# --- diffusers: discrete schedules (integer timesteps, eps model) ---


def _discrete(cls, schedule, **config):
    """A diffusers scheduler on our betas (diffusers holds them in float32)."""
    return cls(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.double().numpy(),
               prediction_type="epsilon", **config)


def _generator(scheduler, generator) -> dict:
    """The generator keyword for a scheduler step that draws noise (HeunDiscreteScheduler takes none)."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def _discrete_loop(scheduler, schedule, x_T, generator=None, **step_kw) -> torch.Tensor:
    """A diffusers pipeline's loop: x = init_noise_sigma x_T, the model at each (integer) timestep on the scaled
    input, step. The scaled input of the k-diffusion-style schedulers, x / sqrt(sigma^2 + 1), is our x_t."""
    model, x = ExactDenoiser(schedule, MIX, "eps"), x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        assert float(t) == int(t), f"fractional timestep {float(t)}: the exact model takes integer timesteps"
        eps = model(scheduler.scale_model_input(x, t), torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x, **step_kw, **_generator(scheduler, generator)).prev_sample
    return x


@pytest.mark.parametrize("variance, clip_x0", [("fixed_small", True), ("fixed_large", False)])
def test_ddpm_is_diffusers_ddpm_scheduler_given_one_generator(variance, clip_x0):
    """Both draw one randn of x's shape per step for t > 0, in the same order: one generator, equal samples."""
    schedule, x_T = linear(), _x_T()
    scheduler = _discrete(diffusers.DDPMScheduler, schedule, variance_type=variance, clip_sample=clip_x0)
    scheduler.set_timesteps(schedule.num_timesteps)
    theirs = _discrete_loop(scheduler, schedule, x_T, generator=_gen())
    ours = _ours(ddpm, schedule, x_T, variance=variance, clip_x0=clip_x0)
    _assert_equal(f"ddpm {variance}", ours, theirs, FLOAT32_TOL, x_T)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_eta1_with_clipping_is_diffusers_ddim_scheduler(spacing):
    """Extends tests/test_samplers.py::test_ddim_equals_diffusers_ddim_scheduler (eta 0) to eta 1 and clip_x0:
    clip_sample with use_clipped_model_output re-derives eps from the clamped x0, as ours does."""
    schedule, x_T, steps = cosine(), _x_T(), 20  # 20 divides T: diffusers steps to t - T // S
    scheduler = _discrete(diffusers.DDIMScheduler, schedule, timestep_spacing=spacing, set_alpha_to_one=True,
                          steps_offset=0, clip_sample=True)
    scheduler.set_timesteps(steps)
    theirs = _discrete_loop(scheduler, schedule, x_T, generator=_gen(), eta=1.0, use_clipped_model_output=True)
    ours = _ours(ddim, schedule, x_T, steps=steps, grid=spacing, eta=1.0, clip_x0=True)
    _assert_equal(f"ddim eta 1 {spacing}", ours, theirs, FLOAT32_TOL, x_T)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("fn, order, solver_type, steps", [(dpm_solver, 2, "midpoint", 20),
                                                           (dpm_solver_3m, 3, "heun", 10)])
def test_dpm_solver_is_diffusers_multistep_on_our_logsnr_grid(schedule_name, fn, order, solver_type, steps):
    """DPMSolverMultistepScheduler(dpmsolver++, lower_order_final, final_sigmas_type zero) given our grid as its
    custom timesteps. Order 3 under 15 steps: diffusers lowers the order of the last two steps only then, ours
    always (the 15-step case below)."""
    schedule, x_T = SCHEDULES[schedule_name](), _x_T()
    scheduler = _discrete(diffusers.DPMSolverMultistepScheduler, schedule, algorithm_type="dpmsolver++",
                          solver_order=order, solver_type=solver_type, lower_order_final=True,
                          final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=_grid(schedule, "logsnr", steps, True))
    theirs = _discrete_loop(scheduler, schedule, x_T)
    ours = _ours(fn, schedule, x_T, steps=steps)
    _assert_equal(f"{fn.__name__} {schedule_name}", ours, theirs, FLOAT32_TOL, x_T)


def test_dpm_solver_3m_lowers_the_order_before_the_last_step_where_diffusers_does_not_at_15_steps():
    """From 15 steps diffusers keeps third order on the step before the last; we take second order there."""
    schedule, x_T, steps = linear(), _x_T(), 15
    scheduler = _discrete(diffusers.DPMSolverMultistepScheduler, schedule, solver_order=3, solver_type="heun",
                          final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=_grid(schedule, "logsnr", steps, True))
    theirs = _discrete_loop(scheduler, schedule, x_T)
    diff = (_ours(dpm_solver_3m, schedule, x_T, steps=steps) - theirs).abs().max().item()
    print(f"dpm_solver_3m 15 steps vs diffusers: {diff:.2e}")
    assert diff > 10 * FLOAT32_TOL  # measured 1.1e-2


@pytest.mark.parametrize("name, fn, cls, steps", [
    ("euler", euler, diffusers.EulerDiscreteScheduler, 20),
    ("heun", heun, diffusers.HeunDiscreteScheduler, 10),
    ("euler_ancestral", euler_ancestral, diffusers.EulerAncestralDiscreteScheduler, 20),
])
def test_karras_samplers_are_diffusers_discrete_schedulers_on_trailing_timesteps(name, fn, cls, steps):
    """diffusers' k-diffusion-style discrete schedulers on its trailing spacing: integer timesteps, so the sigmas
    are those of our timesteps (its Karras grid instead evaluates at fractional timesteps: not shown equal)."""
    schedule, x_T = linear(), _x_T()
    scheduler = _discrete(cls, schedule, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert [int(t) for t in scheduler.timesteps.unique_consecutive()] == grids.trailing(schedule, steps).tolist()
    theirs = _discrete_loop(scheduler, schedule, x_T, generator=_gen())
    ours = _ours(fn, schedule, x_T, steps=steps, grid="trailing")
    _assert_equal(f"{name} trailing", ours, theirs, FLOAT32_TOL, x_T)


@pytest.mark.parametrize("name, fn, cls, steps", [
    ("euler", euler, diffusers.EulerDiscreteScheduler, 20),
    ("heun", heun, diffusers.HeunDiscreteScheduler, 10),
])
def test_euler_and_heun_are_diffusers_schedulers_on_our_karras_timesteps(name, fn, cls, steps):
    """Our default grid (karras on the nearest integer timesteps) as diffusers' custom timesteps."""
    schedule, x_T = linear(), _x_T()
    scheduler = _discrete(cls, schedule)
    scheduler.set_timesteps(timesteps=_grid(schedule, "karras", steps, True))
    theirs = _discrete_loop(scheduler, schedule, x_T)
    _assert_equal(f"{name} karras", _ours(fn, schedule, x_T, steps=steps), theirs, FLOAT32_TOL, x_T)


# --- diffusers: continuous processes (EDM, VE, flow) ---


def _preconditioned_loop(scheduler, process, x_T, scalings, kind="x0", generator=None) -> torch.Tensor:
    """diffusers' EDM / consistency pipelines with the exact denoiser D(x; sigma): the network output F that makes
    the scheduler's own c_skip x + c_out F equal D (``scalings(sigma) -> (c_skip, c_out)``)."""
    model, x = ExactDenoiser(process, MIX, kind), x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        scheduler.scale_model_input(x, t)  # sets the step index
        sigma = scheduler.sigmas[scheduler.step_index]  # its dtype: the scalings the scheduler itself computes
        c_skip, c_out = scalings(sigma)
        D = model(x, torch.full((x.shape[0],), sigma.item(), dtype=torch.float64))
        x = scheduler.step((D - c_skip * x) / c_out, t, x, generator=generator).prev_sample
    return x


def _edm_scalings(scheduler):
    """(c_skip, c_out) of an EDM scheduler, read off its precondition_outputs."""
    def scalings(sigma):
        one = torch.ones((), dtype=torch.float64)
        c_skip = scheduler.precondition_outputs(one, 0 * one, sigma)
        return c_skip, scheduler.precondition_outputs(one, one, sigma) - c_skip
    return scalings


def test_euler_on_edm_is_diffusers_edm_euler_scheduler():
    process, x_T, steps = EDMProcess(), _x_T(), 18
    scheduler = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), grids.karras(process, steps), rtol=1e-6, atol=0)
    theirs = _preconditioned_loop(scheduler, process, x_T, _edm_scalings(scheduler))
    _assert_equal("euler edm", _ours(euler, process, x_T, kind="x0", steps=steps), theirs, EDM_TOL, x_T)


@pytest.mark.parametrize("fn, order, solver_type, steps", [(dpm_solver, 2, "midpoint", 18),
                                                           (dpm_solver_3m, 3, "heun", 10)])
def test_dpm_solver_on_edm_is_diffusers_edm_dpm_solver_multistep(fn, order, solver_type, steps):
    process, x_T = EDMProcess(), _x_T()
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0,
                                                         solver_order=order, solver_type=solver_type,
                                                         algorithm_type="dpmsolver++",
                                                         final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    theirs = _preconditioned_loop(scheduler, process, x_T, _edm_scalings(scheduler))
    ours = _ours(fn, process, x_T, kind="x0", steps=steps, grid="karras")
    _assert_equal(f"{fn.__name__} edm", ours, theirs, EDM_TOL, x_T)


def test_consistency_is_diffusers_cm_stochastic_iterative_scheduler():
    """Multistep consistency sampling with the exact denoiser as f, on the scheduler's own Karras sigmas (its
    40-point training grid) as our explicit list; one generator: both draw one randn per step after the first."""
    process, x_T = EDMProcess(), _x_T()
    scheduler = diffusers.CMStochasticIterativeScheduler(clip_denoised=False)
    scheduler.set_timesteps(timesteps=[34, 22, 0])
    sigmas = scheduler.sigmas[:-1].double().tolist()
    assert sigmas[0] == pytest.approx(80.0) and len(sigmas) == 3
    theirs = _preconditioned_loop(scheduler, process, x_T, scheduler.get_scalings_for_boundary_condition,
                                  generator=_gen())
    ours = _ours(consistency, process, x_T, kind="x0", grid=sigmas)
    _assert_equal("consistency edm", ours, theirs, FLOAT32_TOL, x_T)


def test_euler_on_flow_with_the_shift_grid_is_diffusers_flow_match_euler():
    """FlowMatchEulerDiscreteScheduler(shift 3) given our unshifted times (uniform, t = 0 dropped) as sigmas."""
    process, x_T, steps, m = FlowProcess(), _x_T(), 12, 3.0
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=m)
    scheduler.set_timesteps(sigmas=torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1].tolist())
    model, x = ExactDenoiser(process, MIX, "flow"), x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].double().item()
        x = scheduler.step(model(x, torch.full((x.shape[0],), sigma, dtype=torch.float64)), t, x).prev_sample
    ours = _ours(euler, process, x_T, kind="flow", steps=steps, grid={"name": "shift", "shift": m})
    _assert_equal("euler flow shift", ours, x, FLOAT32_TOL, x_T)


def test_pc_corrector_is_diffusers_score_sde_ve_step_correct():
    """pc's Langevin corrector on ve is ScoreSdeVeScheduler.step_correct given the same noise (our predictor is
    ancestral, theirs reverse diffusion: only the corrector is shown equal)."""
    process, x_T = VEProcess(), _x_T().float()  # diffusers draws the corrector's noise in float32
    traj = Trajectory(at=[1])  # x_t at the second evaluation: after the first corrector step
    _ours(pc, process, x_T, steps=2, callback=traj)
    scheduler = diffusers.ScoreSdeVeScheduler(snr=0.16)
    scheduler.set_timesteps(2)
    x = process.prior_std(1.0) * x_T
    eps = ExactDenoiser(process, MIX, "eps")(x, torch.ones(x.shape[0], dtype=torch.float64))
    theirs = scheduler.step_correct(-eps / process.prior_std(1.0), x, generator=_gen()).prev_sample
    _assert_equal("pc corrector ve", traj.x_t[0], theirs, FLOAT32_TOL, x)


# --- k-diffusion (its sampling.py alone; skipped where it is not installed) ---


def _kdiffusion():
    try:
        return load_kdiffusion_sampling()
    except ImportError as error:
        pytest.skip(f"k-diffusion's sampling.py is not importable: {error}")


def _sigmas(process, steps: int) -> torch.Tensor:
    """Our karras grid with k-diffusion's final 0, float64 (k-diffusion's get_sigmas_karras is float32)."""
    return torch.cat([grids.karras(process, steps), torch.zeros(1, dtype=torch.float64)])


class _VEDenoiser:
    """k-diffusion's view of a process: D(y, s~) with y = x / alpha, s~ = sigma / alpha (alpha = 1 on edm and ve:
    the exact model itself), the time found from the logSNR -log s~."""

    def __init__(self, process):
        self.process, self.model = process, ExactDenoiser(process, MIX, "x0")

    def __call__(self, y, s):
        t = self.process.t_of_log_snr(-s.log())
        return self.model(self.process.alpha(t).view(-1, 1, 1, 1) * y, t)


KDIFFUSION = [  # (ours, our options, k-diffusion's function, its options)
    (euler, {}, "sample_euler", {}),
    (heun, {}, "sample_heun", {}),
    (dpm_solver, {"grid": "karras"}, "sample_dpmpp_2m", {}),
    (euler_ancestral, {}, "sample_euler_ancestral", {}),
    (euler_ancestral, {"eta": 0.5}, "sample_euler_ancestral", {"eta": 0.5}),
]


@pytest.mark.parametrize("process", [EDMProcess(), VPProcess()], ids=["edm", "vp"])
@pytest.mark.parametrize("fn, kw, k_name, k_kw", KDIFFUSION)
def test_samplers_are_kdiffusion_functions_on_our_karras_sigmas(process, fn, kw, k_name, k_kw):
    """Same karras sigmas s~ (float64), same D; on vp k-diffusion runs in y = x / alpha. euler_ancestral draws
    randn_like from the global generator once per step before sigma = 0, ours from its generator at the same
    points: seeded alike, equal."""
    k, x_T, steps = _kdiffusion(), _x_T(), 12
    ts = grids.karras(process, steps)
    s = process.sigma(ts) / process.alpha(ts)
    torch.manual_seed(1)  # the CPU default generator seeded as _gen(1)
    y = getattr(k, k_name)(_VEDenoiser(process), x_T * process.prior_std(ts[0]) / process.alpha(ts[0]),
                           torch.cat([s, torch.zeros(1, dtype=torch.float64)]), disable=True, **k_kw)
    ours = _ours(fn, process, x_T, kind="x0", steps=steps, **kw)
    _assert_equal(f"{fn.__name__} {kw} vs {k_name} on {process.name}", ours, y, FLOAT64_TOL, x_T)


def test_edm_churn_is_kdiffusion_heun_with_s_churn():
    """EDM Algorithm 2: k-diffusion draws one randn_like per step even where gamma = 0; with S_tmax below
    sigma_max the first step has no churn on both sides, so our generator skips that one draw."""
    k, process, x_T, steps = _kdiffusion(), EDMProcess(), _x_T(), 12
    churn = dict(S_churn=10.0, S_tmin=0.0, S_tmax=50.0, S_noise=1.003)
    torch.manual_seed(1)
    theirs = k.sample_heun(ExactDenoiser(process, MIX, "x0"), 80.0 * x_T, _sigmas(process, steps), disable=True,
                           **{key.lower(): value for key, value in churn.items()})
    model, generator = ExactDenoiser(process, MIX, "x0"), _gen()
    torch.randn(SHAPE, generator=generator, dtype=torch.float64)  # k-diffusion's unused draw at sigma_max
    ours = edm(model, process, OBJECTIVES.build("x0"), x_T, steps=steps, clamp_final=False, generator=generator,
               **churn)
    _assert_equal("edm vs sample_heun s_churn", ours, theirs, FLOAT64_TOL, x_T)
    assert (ours - _ours(heun, process, x_T, kind="x0", steps=steps)).abs().max().item() > 1e-3  # it churned


def test_dpm_solver_3m_follows_kdiffusion_dpmpp_3m_sde_eta0_until_the_step_before_the_last():
    """dpmpp_3m_sde with eta 0 is DPM-Solver++(3M); it keeps third order on the step before the last, we lower it
    to second: equal states up to that step, different result."""
    k, process, x_T, steps = _kdiffusion(), EDMProcess(), _x_T(), 10
    states = []
    theirs = k.sample_dpmpp_3m_sde(ExactDenoiser(process, MIX, "x0"), 80.0 * x_T, _sigmas(process, steps), eta=0.0,
                                   disable=True, callback=lambda info: states.append(info["x"]),
                                   noise_sampler=lambda sigma, sigma_next: torch.zeros_like(x_T))
    traj = Trajectory()
    ours = _ours(dpm_solver_3m, process, x_T, kind="x0", steps=steps, grid="karras", callback=traj)
    diffs = [(a - b).abs().max().item() for a, b in zip(traj.x_t, states)]
    print("dpm_solver_3m vs dpmpp_3m_sde, per step:", " ".join(f"{d:.1e}" for d in diffs))
    assert len(diffs) == steps and max(diffs[:-1]) < FLOAT64_TOL and diffs[-1] > 1e-6
    assert (ours - theirs).abs().max().item() > 1e-6
