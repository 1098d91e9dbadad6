"""Samplers against an EXACT denoiser.

Per pixel, x0 ~ sum_k w_k N(m_k, s_k^2) (one component: a Gaussian). With x_t = a x0 + b eps,
x_t | k ~ N(a m_k, a^2 s_k^2 + b^2), so with responsibilities r_k(x_t):
    E[x0 | x_t]  = sum_k r_k (m_k + a s_k^2 (x_t - a m_k) / (a^2 s_k^2 + b^2))
    E[eps | x_t] = sum_k r_k  b (x_t - a m_k) / (a^2 s_k^2 + b^2)
and the v-predictor is a E[eps] - b E[x0]; all built here from these closed forms, not via objectives.py.

Every sample statistic is compared with theory within 5 standard errors plus, where the sampler is not
exact for a finite number of steps, a discretization allowance. The allowances are not guesses: for
Gaussian data every sampler is a linear-Gaussian recursion, so its exact output moments are computed
below (``_ddpm_moments``/``_ddim_moments``, ``_flow_map``) and the samples are also checked against those
to within the standard error alone. Figures for schedule "linear", mu=0.3, s=0.2 (std of the output):
ddpm fixed_small 0.1963 (-1.9%), fixed_large 0.2009 (+0.5%), ddim eta=0 100 steps 0.1875 (-6.2%),
ddim eta=1 100 steps 0.1746 (-12.7%), dpm_solver 20 steps 0.2502 (+25%), 10 steps 0.2019 (+0.9%).
"""
import math

import pytest
import torch

from diffusion_lab.objectives import EpsObjective, VObjective, X0Objective
from diffusion_lab.registry import SAMPLERS, UnknownChoiceError
from diffusion_lab.samplers import (
    Trajectory,
    build_sampler,
    ddim,
    ddpm,
    denoise,
    dpm_solver,
    num_evaluations,
    timesteps,
)
from diffusion_lab.schedules import cosine, linear

MU, S = 0.3, 0.2  # the Gaussian data
MIX = ([0.3, 0.7], [-0.5, 0.4], [0.1, 0.15])  # weights, means, stds of the two-mode mixture
N_SHAPE = (2048, 1, 4, 4)  # 32768 iid scalar samples per run
N = math.prod(N_SHAPE)
K_SE = 5.0


class ExactDenoiser:
    """model(x_t, t) returning the exact E[eps|x_t], E[x0|x_t] or v for per-pixel mixture data (float64)."""

    def __init__(self, schedule, weights, means, stds, kind="eps"):
        assert len(weights) in (1, 2) and abs(sum(weights) - 1) < 1e-12
        self.alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
        self.components = list(zip(weights, means, stds))
        self.kind = kind
        self.calls = 0

    def posterior_means(self, x_t, t):
        ab = self.alphas_cumprod.to(x_t.device)[t].view(-1, *([1] * (x_t.dim() - 1)))
        a, b = ab.sqrt(), (1.0 - ab).sqrt()
        x = x_t.to(torch.float64)
        logits, e_x0, e_eps = [], [], []
        for w, m, s in self.components:
            var = a**2 * s**2 + b**2
            r = x - a * m
            logits.append(math.log(w) - 0.5 * torch.log(var) - 0.5 * r**2 / var)
            e_x0.append(m + (a * s**2 / var) * r)
            e_eps.append((b / var) * r)
        if len(logits) == 1:
            return e_x0[0], e_eps[0], a, b
        r1 = torch.sigmoid(logits[1] - logits[0])  # responsibility of component 1 (two components)
        return e_x0[0] + r1 * (e_x0[1] - e_x0[0]), e_eps[0] + r1 * (e_eps[1] - e_eps[0]), a, b

    def __call__(self, x_t, t):
        assert t.dtype == torch.long and t.shape == (x_t.shape[0],) and t.device == x_t.device
        self.calls += 1
        e_x0, e_eps, a, b = self.posterior_means(x_t, t)
        out = {"eps": e_eps, "x0": e_x0, "v": a * e_eps - b * e_x0}[self.kind]
        return out.to(x_t.dtype)


OBJECTIVES = {"eps": EpsObjective(), "x0": X0Objective(), "v": VObjective()}


@pytest.fixture(scope="module")
def schedule():
    return linear()


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(N_SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _run(fn, schedule, x, kind="eps", data=((1.0,), (MU,), (S,)), seed=1, **kw):
    model = ExactDenoiser(schedule, *data, kind=kind)
    return fn(model, schedule, OBJECTIVES[kind], x, clip_x0=False, clamp_final=False, generator=_gen(seed), **kw)


# --- exact output moments of the discretized samplers for Gaussian data (independent scalar recursions) ---


def _gauss_post(ab):
    """E[x0|x] = mu + k (x - a mu), E[eps|x] = e (x - a mu)."""
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    d = a * a * S * S + b * b
    return a, a * S * S / d, b / d


def _ddpm_moments(schedule, variance):
    """Ho et al. eq. 6-7 with x0 = E[x0|x_t]: x_{t-1} = c1 x0 + c2 x_t + sqrt(var) z, from x_T ~ N(0, 1)."""
    abs_, betas = schedule.alphas_cumprod.double().tolist(), schedule.betas.double().tolist()
    m, v = 0.0, 1.0
    for t in range(len(abs_) - 1, -1, -1):
        a, k, _ = _gauss_post(abs_[t])
        ab_prev = abs_[t - 1] if t > 0 else 1.0
        c1 = betas[t] * math.sqrt(ab_prev) / (1 - abs_[t])
        c2 = (1 - ab_prev) * math.sqrt(1 - betas[t]) / (1 - abs_[t])
        var = 0.0 if t == 0 else betas[t] * ((1 - ab_prev) / (1 - abs_[t]) if variance == "fixed_small" else 1.0)
        gain = c1 * k + c2
        m, v = gain * m + c1 * (MU - k * a * MU), gain * gain * v + var
    return m, math.sqrt(v)


def _ddim_moments(schedule, ts, eta):
    """Song et al. eq. 12 with the exact (x0, eps) predictions, from x_T ~ N(0, 1)."""
    abs_ = schedule.alphas_cumprod.double().tolist()
    m, v = 0.0, 1.0
    for i, t in enumerate(ts):
        a, k, e = _gauss_post(abs_[t])
        ab_prev = abs_[ts[i + 1]] if i + 1 < len(ts) else 1.0
        sigma = eta * math.sqrt((1 - ab_prev) / (1 - abs_[t]) * (1 - abs_[t] / ab_prev))
        c_eps = math.sqrt(1 - ab_prev - sigma**2)
        gain = math.sqrt(ab_prev) * k + c_eps * e
        shift = math.sqrt(ab_prev) * (MU - k * a * MU) - c_eps * e * a * MU
        m, v = gain * m + shift, gain * gain * v + sigma**2
    return m, math.sqrt(v)


def _flow_map(schedule, x_T):
    """Exact probability-flow ODE map from t = T-1 to 0 for Gaussian data: in y = x/a, sigma = b/a the ODE is
    dy/dsigma = (y - E[x0|y]) / sigma = sigma (y - mu) / (s^2 + sigma^2), so (y - mu) / sqrt(s^2 + sigma^2) is
    constant. Hence x0 = mu + s (x_T - a_T mu) / sqrt(a_T^2 s^2 + b_T^2)."""
    ab_T = schedule.alphas_cumprod.double()[-1].item()
    a_T, b_T = math.sqrt(ab_T), math.sqrt(1 - ab_T)
    return MU + S * (x_T - a_T * MU) / math.sqrt(a_T**2 * S**2 + b_T**2)


def _check(name, value, expected, se, allowance=0.0):
    assert abs(value - expected) <= K_SE * se + allowance, (
        f"{name}: {value:.5f} vs {expected:.5f} (tolerance {K_SE} x SE {se:.5f} + {allowance:.4f})"
    )


# --- timesteps ---


@pytest.mark.parametrize("T,S", [(1000, 1), (1000, 10), (1000, 50), (1000, 333), (1000, 1000), (10, 7), (97, 13)])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_are_distinct_descending_in_range(T, S, spacing):
    ts = timesteps(T, S, spacing)
    assert ts.dtype == torch.long and ts.shape == (S,)
    assert bool((ts[:-1] > ts[1:]).all()) and int(ts.min()) >= 0 and int(ts.max()) <= T - 1
    if spacing == "linspace":
        assert int(ts[-1]) == 0 and (S == 1 or int(ts[0]) == T - 1)
    elif spacing == "leading":
        assert int(ts[-1]) == 0 and int(ts[0]) == (S - 1) * (T // S)
        assert set(torch.diff(ts).tolist()) <= {-(T // S)}
    else:
        assert int(ts[0]) == T - 1 and int(ts[-1]) == round(T / S) - 1


def test_timesteps_match_reference_formulas():
    assert torch.equal(timesteps(1000, 10, "linspace"), torch.linspace(0, 999, 10).round().long().flip(0))
    assert timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    for S in (10, 20, 50, 100, 250):  # no float ties or extra elements for these: the raw formula is reliable
        assert torch.equal(timesteps(1000, S, "trailing"), torch.round(torch.arange(1000, 0, -1000 / S)).long() - 1)
    # in general: round(T - i T/S) - 1 with exact round-half-to-even (the raw float formula can misround ties
    # such as T=100, S=24, or return S + 1 values)
    from fractions import Fraction

    for T, S in [(100, 24), (100, 48), (1000, 7), (1000, 48), (999, 37)]:
        expected = [round(Fraction(T) - Fraction(i * T, S)) - 1 for i in range(S)]
        assert timesteps(T, S, "trailing").tolist() == expected


@pytest.mark.parametrize("S", [0, -3, 1001])
def test_timesteps_out_of_range(S):
    with pytest.raises(ValueError, match=r"steps must be in \(0, T\]"):
        timesteps(1000, S, "linspace")


def test_timesteps_unknown_spacing():
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'"):
        timesteps(1000, 10, "uniform")


# --- the shared helper ---


def test_denoise_clips_x0_and_rederives_eps(schedule):
    x_t = torch.randn(64, 1, 2, 2, generator=_gen(3), dtype=torch.float64) * 3
    model = ExactDenoiser(schedule, [1.0], [0.0], [2.0], kind="x0")  # wide data: x0_pred often outside [-1, 1]
    t = 40
    x0_raw, _ = denoise(model, schedule, X0Objective(), x_t, t, clip_x0=False)
    x0_pred, eps_pred = denoise(model, schedule, X0Objective(), x_t, t, clip_x0=True)
    assert (x0_raw.abs() > 1).any()
    assert torch.equal(x0_pred, x0_raw.clamp(-1, 1))
    # eps is re-derived so that x_t = a x0_pred + b eps_pred holds for the clipped x0_pred
    a, b = schedule.sqrt_alphas_cumprod[t].item(), schedule.sqrt_one_minus_alphas_cumprod[t].item()
    torch.testing.assert_close(a * x0_pred + b * eps_pred, x_t, rtol=0, atol=1e-10)


def test_ddpm_clip_x0_keeps_samples_in_range(schedule):
    wide = ([1.0], [0.0], [2.0])
    x = torch.randn(64, 1, 2, 2, generator=_gen(4), dtype=torch.float64)
    clipped = ddpm(ExactDenoiser(schedule, *wide), schedule, EpsObjective(), x, clamp_final=False, generator=_gen())
    free = ddpm(ExactDenoiser(schedule, *wide), schedule, EpsObjective(), x, clip_x0=False, clamp_final=False,
                generator=_gen())
    assert clipped.abs().max() <= 1.0 + 1e-6 and free.abs().max() > 1.5
    clamped = ddim(ExactDenoiser(schedule, *wide), schedule, EpsObjective(), x, steps=10)  # clamp_final default
    assert clamped.abs().max() <= 1.0 and (clamped.abs() == 1.0).any()


# --- distributions: Gaussian data ---

DPM_LINSPACE_XFAIL = pytest.mark.xfail(
    strict=True,
    reason="known limitation: on the time-uniform (linspace) grid the 2nd-order step into t=0 has a tiny "
    "step ratio r = h_last/h and extrapolates x0_pred strongly (measured std +25% at 20 steps); a "
    "logSNR-uniform grid gives ~+1-3% -- see the samplers report",
)
GAUSS_CASES = [  # (id, sampler, kwargs, std allowance as a fraction of s)
    ("ddpm_fixed_small", ddpm, dict(variance="fixed_small"), 0.03),
    ("ddpm_fixed_large", ddpm, dict(variance="fixed_large"), 0.03),
    ("ddim_eta0_100", ddim, dict(steps=100), 0.08),
    ("ddim_eta0_100_leading", ddim, dict(steps=100, spacing="leading"), 0.08),
    ("ddim_eta0_100_trailing", ddim, dict(steps=100, spacing="trailing"), 0.08),
    ("ddim_eta1_100", ddim, dict(steps=100, eta=1.0), 0.15),
    pytest.param("dpm_solver_20_linspace", dpm_solver, dict(steps=20, spacing="linspace"), 0.08,
                 marks=DPM_LINSPACE_XFAIL),
    ("dpm_solver_10_linspace", dpm_solver, dict(steps=10, spacing="linspace"), 0.08),
    ("dpm_solver_20", dpm_solver, dict(steps=20), 0.03),  # default spacing: logsnr
    ("dpm_solver_10", dpm_solver, dict(steps=10), 0.04),
]


def _exact_moments(schedule, fn, kw):
    T = schedule.num_timesteps
    if fn is ddpm:
        return _ddpm_moments(schedule, kw["variance"])
    ts = timesteps(T, kw["steps"], kw.get("spacing", "linspace"), schedule).tolist()
    if fn is ddim:
        return _ddim_moments(schedule, ts, kw.get("eta", 0.0))
    # dpm_solver is deterministic and, for Gaussian data, affine in x_T: read it off at x_T = 0 and 1
    model = ExactDenoiser(schedule, [1.0], [MU], [S])
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    shift = fn(model, schedule, EpsObjective(), zero, clip_x0=False, clamp_final=False, **kw).item()
    gain = fn(model, schedule, EpsObjective(), zero + 1, clip_x0=False, clamp_final=False, **kw).item() - shift
    return shift, abs(gain)


@pytest.mark.parametrize("name,fn,kw,std_allowance", GAUSS_CASES)
def test_gaussian_sample_moments(schedule, x_T, name, fn, kw, std_allowance):
    out = _run(fn, schedule, x_T, **kw)
    assert out.shape == x_T.shape and out.dtype == x_T.dtype
    mean, std = out.mean().item(), out.std().item()
    se_mean, se_std = S / math.sqrt(N), S / math.sqrt(2 * N)
    exact_mean, exact_std = _exact_moments(schedule, fn, kw)
    print(f"{name}: mean {mean:.5f} std {std:.5f} | discretized exact {exact_mean:.5f} {exact_std:.5f} | "
          f"theory {MU} {S}")
    # against the data distribution N(mu, s^2): standard error + discretization allowance
    _check(f"{name} mean", mean, MU, se_mean, allowance=0.002)
    _check(f"{name} std", std, S, se_std, allowance=std_allowance * S)
    # against the exact moments of this discretization: standard error only
    _check(f"{name} mean (discretized)", mean, exact_mean, se_mean)
    _check(f"{name} std (discretized)", std, exact_std, exact_std / math.sqrt(2 * N))


def test_ddpm_variances_on_a_short_schedule(x_T):
    # on T = 20 steps the two variances differ a lot: each must match its own exact moments, not the other's
    short = linear(noise_steps=20, beta_start=0.01, beta_end=0.3)
    exact = {v: _ddpm_moments(short, v) for v in ("fixed_small", "fixed_large")}
    se = S / math.sqrt(2 * N)
    assert exact["fixed_large"][1] - exact["fixed_small"][1] > 20 * se
    for variance, (mean_th, std_th) in exact.items():
        out = _run(ddpm, short, x_T, variance=variance)
        print(f"T=20 ddpm {variance}: mean {out.mean():.5f} std {out.std():.5f} exact {mean_th:.5f} {std_th:.5f}")
        _check(f"{variance} mean", out.mean().item(), mean_th, std_th / math.sqrt(N))
        _check(f"{variance} std", out.std().item(), std_th, std_th / math.sqrt(2 * N))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_adds_no_noise_on_the_last_step(schedule, variance):
    # at t = 0: coef1 = 1, coef2 = 0, so the output must be exactly the last x0_pred
    x = torch.randn(64, 1, 2, 2, generator=_gen(12), dtype=torch.float64)
    traj = Trajectory(at=[schedule.num_timesteps - 1])
    out = _run(ddpm, schedule, x, variance=variance, callback=traj)
    assert traj.timesteps == [0]
    torch.testing.assert_close(out, traj.x0_pred[0], rtol=0, atol=1e-6)


# --- deterministic samplers against the exact ODE flow ---


def test_deterministic_samplers_follow_the_exact_flow_and_converge_at_their_order(schedule):
    x = torch.linspace(-3, 3, 13, dtype=torch.float64).view(-1, 1, 1, 1)
    target = _flow_map(schedule, x)

    def err(fn, steps):  # on one time-uniform grid, so the step count alone sets the error
        return (_run(fn, schedule, x, steps=steps, spacing="linspace") - target).abs().max().item()

    e_ddim = [err(ddim, S_) for S_ in (100, 200, 400)]
    e_dpm = [err(dpm_solver, S_) for S_ in (100, 200, 400)]
    print("flow-map max error ddim", e_ddim, "dpm_solver", e_dpm)
    assert e_ddim[0] < 0.05 and e_dpm[0] < 0.05
    # DDIM is first order (error halves when steps double), DPM-Solver++(2M) second order (error / ~4)
    for r in (e_ddim[0] / e_ddim[1], e_ddim[1] / e_ddim[2]):
        assert 1.6 < r < 2.6, e_ddim
    for r in (e_dpm[0] / e_dpm[1], e_dpm[1] / e_dpm[2]):
        assert 3.0 < r < 6.5, e_dpm
    assert e_dpm[2] < e_ddim[2] / 4


def test_dpm_solver_first_step_is_ddim_and_later_steps_are_second_order(schedule):
    x = torch.randn(8, 1, 2, 2, generator=_gen(5), dtype=torch.float64)
    traj_ddim, traj_dpm = Trajectory(), Trajectory()
    _run(ddim, schedule, x, steps=10, spacing="logsnr", callback=traj_ddim)
    _run(dpm_solver, schedule, x, steps=10, callback=traj_dpm)
    assert traj_ddim.timesteps == traj_dpm.timesteps
    # first order == DDIM (up to the float32 rounding of the schedule's sqrt(alpha_bar) that DDIM goes through)
    torch.testing.assert_close(traj_dpm.x_t[1], traj_ddim.x_t[1], rtol=0, atol=1e-6)
    assert (traj_dpm.x_t[-1] - traj_ddim.x_t[-1]).abs().max() > 1e-2  # the 2nd-order corrections add up


# --- distributions: two-mode mixture ---

MIX_CASES = [  # (id, sampler, kwargs, mean allowance, std allowance (fraction), fraction allowance)
    ("ddpm", ddpm, dict(), 0.005, 0.03, 0.01),
    ("ddim_eta0_100", ddim, dict(steps=100), 0.01, 0.05, 0.025),
    # eta=1 on 100 steps adds the too-small posterior variance of each long step: modes come out ~10% sharper
    ("ddim_eta1_100", ddim, dict(steps=100, eta=1.0), 0.01, 0.05, 0.06),
    pytest.param("dpm_solver_20_linspace", dpm_solver, dict(steps=20, spacing="linspace"), 0.01, 0.05, 0.015,
                 marks=DPM_LINSPACE_XFAIL),
    pytest.param("dpm_solver_10_linspace", dpm_solver, dict(steps=10, spacing="linspace"), 0.01, 0.05, 0.015,
                 marks=DPM_LINSPACE_XFAIL),
    ("dpm_solver_20", dpm_solver, dict(steps=20), 0.01, 0.03, 0.015),  # default spacing: logsnr
]


def _cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _mixture_theory():
    """Mean, std, P(x < midpoint of the modes) and P(|x - m_k| < s_k) for each mode k."""
    w, m, s = MIX
    mean = sum(wk * mk for wk, mk in zip(w, m))
    var = sum(wk * (sk**2 + mk**2) for wk, mk, sk in zip(w, m, s)) - mean**2
    threshold = 0.5 * (m[0] + m[1])
    p_low = sum(wj * _cdf((threshold - mj) / sj) for wj, mj, sj in zip(w, m, s))
    p_near = [
        sum(wj * (_cdf((mk + sk - mj) / sj) - _cdf((mk - sk - mj) / sj)) for wj, mj, sj in zip(w, m, s))
        for mk, sk in zip(m, s)
    ]
    return mean, math.sqrt(var), threshold, p_low, p_near


@pytest.mark.parametrize("name,fn,kw,mean_allow,std_allow,frac_allow", MIX_CASES)
def test_mixture_sample_moments_and_modes(schedule, x_T, name, fn, kw, mean_allow, std_allow, frac_allow):
    mean_th, std_th, threshold, p_low, p_near = _mixture_theory()
    out = _run(fn, schedule, x_T, data=MIX, **kw)
    mean, std, frac_low = out.mean().item(), out.std().item(), (out < threshold).double().mean().item()
    near = [((out - mk).abs() < sk).double().mean().item() for mk, sk in zip(MIX[1], MIX[2])]
    print(f"mixture {name}: mean {mean:.5f} (theory {mean_th:.5f}) std {std:.5f} ({std_th:.5f}) "
          f"low-mode fraction {frac_low:.5f} ({p_low:.5f}) within s_k of each mode {near} ({p_near})")
    _check(f"{name} mean", mean, mean_th, std_th / math.sqrt(N), mean_allow)
    # SE of a sample std is sigma sqrt((kurtosis - 1) / 4N); kurtosis of this mixture < 3, so the Gaussian SE bounds it
    _check(f"{name} std", std, std_th, std_th / math.sqrt(2 * N), std_allow * std_th)
    for label, frac, p in [("low-mode fraction", frac_low, p_low)] + [
        (f"fraction within s of mode {k}", near[k], p_near[k]) for k in range(2)
    ]:
        _check(f"{name} {label}", frac, p, math.sqrt(p * (1 - p) / N), frac_allow)


# --- determinism and parameterisation invariance ---


def test_ddim_eta0_is_deterministic_given_its_noise(schedule):
    x = torch.randn(16, 1, 4, 4, generator=_gen(6), dtype=torch.float64)
    first = _run(ddim, schedule, x, steps=20, seed=1)
    assert torch.equal(first, _run(ddim, schedule, x, steps=20, seed=2))  # no per-step noise drawn
    other = _run(ddim, schedule, torch.randn(x.shape, generator=_gen(7), dtype=torch.float64), steps=20)
    assert (other - first).abs().max() > 0.05


@pytest.mark.parametrize("fn,kw", [(ddpm, {}), (ddim, dict(steps=50, eta=1.0))], ids=["ddpm", "ddim_eta1"])
def test_stochastic_samplers_follow_their_generator(schedule, fn, kw):
    x = torch.randn(16, 1, 4, 4, generator=_gen(6), dtype=torch.float64)
    a, b = _run(fn, schedule, x, seed=1, **kw), _run(fn, schedule, x, seed=1, **kw)
    assert torch.equal(a, b)
    assert (_run(fn, schedule, x, seed=2, **kw) - a).abs().max() > 0.05


@pytest.mark.parametrize(
    "fn,kw",
    [(ddpm, {}), (ddim, dict(steps=100)), (ddim, dict(steps=100, eta=1.0)), (dpm_solver, dict(steps=20))],
    ids=["ddpm", "ddim_eta0", "ddim_eta1", "dpm_solver"],
)
def test_parameterisation_does_not_change_samples(schedule, fn, kw):
    # with the same x_T and the same per-step noise, eps-, x0- and v-predictors give the same samples
    x = torch.randn(256, 1, 4, 4, generator=_gen(8), dtype=torch.float64)
    outs = {kind: _run(fn, schedule, x, kind=kind, data=MIX, seed=3, **kw) for kind in OBJECTIVES}
    for kind in ("x0", "v"):
        diff = (outs[kind] - outs["eps"]).abs().max().item()
        assert diff < 1e-4, f"{kind} vs eps: {diff}"
    assert outs["eps"].std() > 0.3  # a real spread, not a collapsed output


def test_float32_and_any_batch_shape(schedule):
    x = torch.randn(3, 3, 5, 7, generator=_gen(9))
    for fn, kw in [(ddim, dict(steps=10)), (dpm_solver, dict(steps=10))]:
        out32 = _run(fn, schedule, x, **kw)
        out64 = _run(fn, schedule, x.double(), **kw)
        assert out32.dtype == torch.float32 and out32.shape == x.shape
        torch.testing.assert_close(out32.double(), out64, rtol=0, atol=1e-4)
    one = _run(ddim, schedule, x[:1], steps=10)
    torch.testing.assert_close(one, _run(ddim, schedule, x, steps=10)[:1], rtol=0, atol=1e-6)


# --- errors, registry, build_sampler, NFE, callbacks ---


@pytest.mark.parametrize("steps", [0, 1001, -1])
@pytest.mark.parametrize("fn", [ddim, dpm_solver], ids=["ddim", "dpm_solver"])
def test_steps_out_of_range(schedule, fn, steps):
    with pytest.raises(ValueError, match=r"steps must be in \(0, T\] = \(0, 1000\]"):
        _run(fn, schedule, torch.zeros(2, 1, 2, 2), steps=steps)


def test_ddpm_argument_errors(schedule):
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="ddpm runs all T = 1000 steps; got steps=50"):
        _run(ddpm, schedule, x, steps=50)
    with pytest.raises(ValueError, match="unknown ddpm variance 'learned'"):
        _run(ddpm, schedule, x, variance="learned")
    assert _run(ddpm, schedule, x, steps=1000).shape == x.shape


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_ddim_eta_out_of_range(schedule, eta):
    with pytest.raises(ValueError, match="eta must be in"):
        _run(ddim, schedule, torch.zeros(2, 1, 2, 2), steps=10, eta=eta)


def test_registry_and_build_sampler(schedule):
    assert {"ddpm", "ddim", "dpm_solver"} <= set(SAMPLERS.names())
    with pytest.raises(UnknownChoiceError, match="unknown sampler 'euler'; known: .*ddim"):
        build_sampler("euler")
    with pytest.raises(ValueError, match="sampler 'ddpm' does not take 'eta'; it takes: steps, variance"):
        build_sampler("ddpm", eta=0.0)
    with pytest.raises(ValueError, match="sampler 'dpm_solver' does not take 'eta'"):
        build_sampler("dpm_solver", eta=0.0)
    with pytest.raises(ValueError, match="does not take 'generator'"):
        build_sampler("ddim", generator=_gen())
    sampler = build_sampler("ddim", steps=10, eta=0.0, clip_x0=False, clamp_final=False)
    x = torch.randn(4, 1, 2, 2, generator=_gen(10), dtype=torch.float64)
    model = ExactDenoiser(schedule, [1.0], [MU], [S])
    assert torch.equal(sampler(model, schedule, EpsObjective(), x, generator=None),
                       _run(ddim, schedule, x, steps=10))


@pytest.mark.parametrize(
    "name,params,expected",
    [("ddpm", {}, 100), ("ddpm", {"variance": "fixed_large"}, 100), ("ddim", {}, 50),
     ("ddim", {"steps": 7, "eta": 1.0}, 7), ("dpm_solver", {}, 20), ("dpm_solver", {"steps": 5}, 5)],
)
def test_num_evaluations_counts_model_calls(name, params, expected):
    small = linear(noise_steps=100)
    assert num_evaluations(name, params, small.num_timesteps) == expected
    model = ExactDenoiser(small, [1.0], [MU], [S])
    build_sampler(name, **params)(model, small, EpsObjective(), torch.randn(2, 1, 2, 2), generator=_gen())
    assert model.calls == expected
    with pytest.raises(ValueError, match="does not take 'bogus'"):
        num_evaluations(name, {"bogus": 1}, 100)


@pytest.mark.parametrize("name,params", [("ddpm", {}), ("ddim", {"steps": 12}), ("dpm_solver", {"steps": 9})])
def test_callback_and_trajectory(name, params):
    small = linear(noise_steps=100)
    calls = []
    traj = Trajectory(at=[0, 3, 8])
    x = torch.randn(2, 1, 2, 2, generator=_gen(11))

    def callback(i, t, x_t, x0_pred):
        calls.append((i, t))
        traj(i, t, x_t, x0_pred)
        assert isinstance(t, int) and x_t.shape == x.shape and x0_pred.shape == x.shape

    out = build_sampler(name, **params)(ExactDenoiser(small, [1.0], [MU], [S]), small, EpsObjective(), x,
                                        callback=callback)
    n = num_evaluations(name, params, 100)
    assert [i for i, _ in calls] == list(range(n))
    spacing = "logsnr" if name == "dpm_solver" else "linspace"  # each sampler's default
    expected_ts = list(range(99, -1, -1)) if name == "ddpm" else timesteps(100, n, spacing, small).tolist()
    assert [t for _, t in calls] == expected_ts
    assert traj.steps == [0, 3, 8] and len(traj) == 3 and traj.timesteps == [expected_ts[i] for i in (0, 3, 8)]
    assert all(v.device.type == "cpu" for v in traj.x_t + traj.x0_pred)
    assert torch.equal(traj.x_t[0], x)  # the first x_t is x_T itself, cloned
    if name != "ddpm":  # deterministic samplers return the last x0_pred (clamped)
        all_steps = Trajectory()
        build_sampler(name, **params)(ExactDenoiser(small, [1.0], [MU], [S]), small, EpsObjective(), x,
                                      callback=all_steps)
        assert len(all_steps) == n and torch.equal(out, all_steps.x0_pred[-1].clamp(-1, 1))


def test_progress_bar_runs(schedule, capsys):
    out = _run(ddim, schedule, torch.zeros(1, 1, 2, 2), steps=5, progress=True)
    assert out.shape == (1, 1, 2, 2)


@pytest.mark.parametrize("steps", [10, 20])  # more steps: near t=0 adjacent integers set the jumps
def test_logsnr_spacing_takes_equal_steps_in_lambda(schedule, steps):
    ts = timesteps(schedule.num_timesteps, steps, "logsnr", schedule)
    ab = schedule.alphas_cumprod.double()[ts]
    lam = 0.5 * torch.log(ab / (1 - ab))
    h = lam.diff()
    assert len(set(ts.tolist())) == steps and ts[0] == schedule.num_timesteps - 1 and ts[-1] == 0
    assert bool((h > 0).all()) and (h.max() / h.min()).item() < 1.5, h  # integer t allows a little unevenness
    uniform = timesteps(schedule.num_timesteps, steps, "linspace")
    ab_u = schedule.alphas_cumprod.double()[uniform]
    h_u = (0.5 * torch.log(ab_u / (1 - ab_u))).diff()
    assert (h_u.max() / h_u.min()).item() > 5, "the time-uniform grid is very uneven in lambda (why logsnr exists)"


def test_logsnr_spacing_needs_the_schedule():
    with pytest.raises(ValueError, match="needs the schedule"):
        timesteps(100, 10, "logsnr")


def test_clip_x0_contains_ddim_eps_error_amplification_under_cosine():
    """Under cosine, alpha_bar_{T-1} = 2.4e-9: x0 = (x_t - b eps)/a turns an eps error d into d/a ~ 2e4 d.
    Clamp-at-the-end-only lets that through; clipping x0_pred every step (the app's config default) does not."""
    schedule = cosine(1000)
    exact = ExactDenoiser(schedule, [1.0], [MU], [S])

    def slightly_wrong(x_t, t):
        return exact(x_t, t) + 0.01  # a model with a small bias in eps_pred

    x = torch.randn(512, 1, 2, 2, generator=_gen(3), dtype=torch.float64)
    free = ddim(slightly_wrong, schedule, EpsObjective(), x, steps=20, clip_x0=False, clamp_final=False)
    clipped = ddim(slightly_wrong, schedule, EpsObjective(), x, steps=20, clip_x0=True, clamp_final=False)
    assert (free - MU).abs().mean() > 5 * S, "the unclipped sample blows up"
    assert abs(clipped.mean().item() - MU) < 0.1 and abs(clipped.std().item() - S) < 0.1
