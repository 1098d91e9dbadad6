"""Noise schedules: endpoints, the cosine formula, posterior identities, SNR, q(x_t | x0) by Monte Carlo."""
import math

import pytest
import torch

from diffusion_lab.config.validation import validate
from diffusion_lab.diffusion.schedules import NoiseSchedule, cosine, extract, linear, linear_betas, terminal_signal
from diffusion_lab.errors import ConfigError
from diffusion_lab.registry import SCHEDULES, UnknownChoiceError
from tests.helpers import compose_config, run_cli

TENSORS = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "snr",
)
SCHEDULE_NAMES = ["linear", "cosine"]


def _f64(schedule, name):
    return getattr(schedule, name).to(torch.float64)


def _one_minus_ab(schedule):
    """1 - alpha_bar_t without the cancellation of 1 - float32(alpha_bar_t) near t = 0, and its t-1 version."""
    one_minus = _f64(schedule, "sqrt_one_minus_alphas_cumprod") ** 2
    return one_minus, torch.cat([one_minus.new_zeros(1), one_minus[:-1]])


@pytest.fixture(params=SCHEDULE_NAMES)
def schedule(request):
    return SCHEDULES.build(request.param)


def test_linear_endpoints_and_length():
    """The app's linear betas are DDPM's at T = 1000 and scale with 1000/T (improved-diffusion)."""
    for T in (1000, 50, 4000):
        s = linear(noise_steps=T)
        scale = 1000 / T
        assert s.num_timesteps == T and s.betas.shape == (T,)
        assert s.betas[0].item() == pytest.approx(1e-4 * scale, rel=1e-6)
        assert s.betas[-1].item() == pytest.approx(0.02 * scale, rel=1e-6)
        step = torch.full((T - 1,), (0.02 - 1e-4) * scale / (T - 1), dtype=torch.float64)
        torch.testing.assert_close(_f64(s, "betas").diff(), step, rtol=1e-3, atol=0)  # float32 storage


@pytest.mark.parametrize("T", [50, 100, 250, 500, 1000, 2000, 4000])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_terminal_signal_stays_below_one_percent_at_any_T(name, T):
    """Every sampler starts from pure N(0, I): sqrt(alpha_bar_{T-1}) must be ~0 (the literal DDPM formula
    leaves 0.60 at T = 100 and 0.28 at T = 250)."""
    assert terminal_signal(SCHEDULES.build(name, noise_steps=T)) < 0.01
    literal = NoiseSchedule(linear_betas(T, 1e-4, 0.02))
    if T <= 250:
        assert terminal_signal(literal) > 0.25, "why the app scales: the literal formula keeps signal at small T"


def test_terminal_signal_threshold_refuses_in_one_line():
    with pytest.raises(ValueError, match=r"sqrt\(alpha_bar\) = 0.6.* > max_terminal_signal = 0.01 at t = T-1 = 99"):
        linear(noise_steps=100, beta_start=1e-5, beta_end=2e-3)  # the literal T=100 DDPM betas, unscaled
    allowed = linear(noise_steps=100, beta_start=1e-5, beta_end=2e-3, max_terminal_signal=1.0)
    assert terminal_signal(allowed) == pytest.approx(0.60, abs=0.01)
    with pytest.raises(ValueError, match="beta_end \\* 1000/T = 2 >= 1"):
        linear(noise_steps=10)
    cfg = compose_config(["schedule=linear", "schedule.beta_end=0.002", "schedule.noise_steps=100"])
    with pytest.raises(ConfigError, match="max_terminal_signal"):
        validate(cfg)


@pytest.mark.slow
def test_terminal_signal_refusal_on_the_command_line(tmp_path):
    result = run_cli("diffusion_lab.train", ["schedule=linear", "schedule.beta_end=0.002", "schedule.noise_steps=100", "logger=none"],
                     tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("error: schedule leaves sqrt(alpha_bar) =")
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_zero_terminal_snr_rescale(name):
    """Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) shifted to 0 at T-1 and scaled to keep t = 0; in between it is
    an affine map of the original, so it stays strictly decreasing."""
    base, z = SCHEDULES.build(name), SCHEDULES.build(name, zero_terminal_snr=True)
    a, a_z = _f64(base, "sqrt_alphas_cumprod"), _f64(z, "sqrt_alphas_cumprod")
    assert a_z[-1].item() == 0.0 and z.betas[-1].item() == 1.0 and z.snr[-1].item() == 0.0
    assert a_z[0].item() == pytest.approx(a[0].item(), rel=1e-6)
    torch.testing.assert_close(a_z, (a - a[-1]) * a[0] / (a[0] - a[-1]), rtol=1e-4, atol=1e-6)
    assert bool((a_z[1:] < a_z[:-1]).all())
    assert bool(torch.isfinite(z.posterior_variance).all() and torch.isfinite(z.posterior_mean_coef1).all())


def test_zero_terminal_snr_needs_v_or_x0():
    with pytest.raises(ConfigError, match="zero_terminal_snr=true needs objective=v or x0"):
        validate(compose_config(["schedule.zero_terminal_snr=true"]))
    validate(compose_config(["schedule.zero_terminal_snr=true", "objective=v"]))


def test_cosine_alpha_bar_follows_the_formula():
    """Index t (0-based) of alphas_cumprod is f((t+1)/T) / f(0), f(u) = cos^2((u + s)/(1 + s) pi/2):
    beta_t = 1 - abar((t+1)/T)/abar(t/T), so prod_{i<=t} (1 - beta_i) telescopes to f((t+1)/T) / f(0).
    Only the last beta is clipped (f(1) = 0), so every index but T-1 follows the formula."""
    T, s_off = 1000, 0.008
    sched = cosine(noise_steps=T, s=s_off)
    f = lambda u: math.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 1, 250, 499, 500, 750, 990, 998):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-5, abs=1e-9)
    # and not f(t/T)/f(0): the off-by-one is visible at the mid-point
    assert abs(sched.alphas_cumprod[500].item() - f(500 / T) / f(0)) > 1e-3
    assert sched.betas[-1].item() == pytest.approx(0.999, rel=1e-6) and bool((sched.betas[:-1] < 0.999).all())


def test_betas_bounds_and_cumprod(schedule):
    betas, ab = _f64(schedule, "betas"), _f64(schedule, "alphas_cumprod")
    assert bool((betas > 0).all()) and bool((betas <= 0.999 + 1e-6).all())
    # beta_t = 1 - ab_t / ab_{t-1}  (and beta_0 = 1 - ab_0)
    torch.testing.assert_close(1 - ab[1:] / ab[:-1], betas[1:], rtol=1e-4, atol=1e-7)
    assert ab[0].item() == pytest.approx(1 - betas[0].item(), rel=1e-6)
    torch.testing.assert_close(_f64(schedule, "alphas_cumprod_prev")[1:], ab[:-1])
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    a, b = _f64(schedule, "sqrt_alphas_cumprod"), _f64(schedule, "sqrt_one_minus_alphas_cumprod")
    torch.testing.assert_close(a**2 + b**2, torch.ones_like(ab), rtol=0, atol=1e-6)


def test_all_constants_are_float32_and_move_together(schedule):
    for name in TENSORS:
        value = getattr(schedule, name)
        assert value.dtype == torch.float32 and value.shape == (schedule.num_timesteps,), name
        assert bool(torch.isfinite(value).all()), name
    assert schedule.to("cpu") is schedule and schedule.device.type == "cpu"


def test_posterior_identities(schedule):
    betas, alphas = _f64(schedule, "betas"), _f64(schedule, "alphas")
    sqrt_ab, ab_prev = _f64(schedule, "sqrt_alphas_cumprod"), _f64(schedule, "alphas_cumprod_prev")
    one_minus_ab, one_minus_ab_prev = _one_minus_ab(schedule)
    c1, c2 = _f64(schedule, "posterior_mean_coef1"), _f64(schedule, "posterior_mean_coef2")
    var = _f64(schedule, "posterior_variance")
    # (1) Bayes for two Gaussians (x_{t-1} | x0 prior, x_t | x_{t-1} likelihood): precisions add
    #     1/var_t = 1/(1 - ab_{t-1}) + alpha_t/beta_t   for t >= 1
    torch.testing.assert_close(1 / var[1:], 1 / one_minus_ab_prev[1:] + alphas[1:] / betas[1:], rtol=1e-5, atol=0)
    # (2) a noiseless x_t = sqrt(ab_t) x0 maps to the noiseless x_{t-1} = sqrt(ab_{t-1}) x0
    torch.testing.assert_close(c1 + c2 * sqrt_ab, ab_prev.sqrt(), rtol=1e-5, atol=1e-6)
    # (3) marginal variance: Var[c2 x_t] + var_t = 1 - ab_{t-1} when x_t ~ q(x_t | x0)
    torch.testing.assert_close(c2**2 * one_minus_ab + var, one_minus_ab_prev, rtol=1e-5, atol=1e-9)
    # t = 0: the posterior is x0 itself; the clipped log-variance uses the t = 1 value
    assert var[0].item() == 0.0 and c1[0].item() == pytest.approx(1.0, rel=1e-6) and c2[0].item() == 0.0
    assert schedule.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(var[1].item()), rel=1e-5)
    log_var = _f64(schedule, "posterior_log_variance_clipped")
    torch.testing.assert_close(log_var[1:], var[1:].log(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [1, 10, 300, 900])
def test_posterior_by_monte_carlo(schedule, t):
    """Draw x_{t-1} ~ q(x_{t-1} | x0), then x_t ~ q(x_t | x_{t-1}); the residual x_{t-1} - (c1 x0 + c2 x_t)
    must have mean 0, variance posterior_variance[t], and no correlation with x_t (it is the posterior)."""
    n = 400_000
    g = torch.Generator().manual_seed(t)
    x0 = 0.7
    ab_prev, beta = _f64(schedule, "alphas_cumprod_prev")[t].item(), _f64(schedule, "betas")[t].item()
    x_prev = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * torch.randn(n, generator=g, dtype=torch.float64)
    c1, c2 = schedule.posterior_mean_coef1[t].item(), schedule.posterior_mean_coef2[t].item()
    resid = x_prev - (c1 * x0 + c2 * x_t)
    var = schedule.posterior_variance[t].item()
    assert abs(resid.mean().item()) < 5 * math.sqrt(var / n)
    assert abs(resid.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1)) + 1e-6 * var
    corr = torch.corrcoef(torch.stack([resid, x_t]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(n)


def test_snr_strictly_decreasing(schedule):
    snr = _f64(schedule, "snr")
    assert bool((snr[1:] < snr[:-1]).all())
    torch.testing.assert_close(snr, _f64(schedule, "alphas_cumprod") / _one_minus_ab(schedule)[0], rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_q_sample_mean_and_variance_by_monte_carlo(schedule, t):
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), -0.4)
    tt = torch.full((n,), t, dtype=torch.long)
    x_t, eps = schedule.add_noise(x0, tt, generator=torch.Generator().manual_seed(t))
    mean, var = schedule.sqrt_alphas_cumprod[t].item() * -0.4, _one_minus_ab(schedule)[0][t].item()
    x = x_t.double().flatten()
    assert abs(x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / (n - 1))
    # the returned eps is the noise that was used
    a, b = schedule.sqrt_alphas_cumprod[t], schedule.sqrt_one_minus_alphas_cumprod[t]
    torch.testing.assert_close(x_t, a * x0 + b * eps)


def test_add_noise_with_given_noise_and_extract_shapes(schedule):
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 5, 999])
    noise = torch.randn_like(x0)
    x_t, eps = schedule.add_noise(x0, t, noise=noise)
    assert eps is noise and x_t.dtype == torch.float64
    coef = extract(schedule.sqrt_alphas_cumprod, t, x0)
    assert coef.shape == (3, 1, 1, 1) and coef.dtype == torch.float64
    a = _f64(schedule, "sqrt_alphas_cumprod")[t].view(3, 1, 1, 1)
    b = _f64(schedule, "sqrt_one_minus_alphas_cumprod")[t].view(3, 1, 1, 1)
    torch.testing.assert_close(x_t, a * x0 + b * noise, rtol=0, atol=1e-12)
    ts = schedule.sample_timesteps(10_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert int(ts.min()) == 0 and int(ts.max()) == schedule.num_timesteps - 1


def test_schedule_registry():
    assert set(SCHEDULE_NAMES) <= set(SCHEDULES.names())
    with pytest.raises(UnknownChoiceError) as info:
        SCHEDULES.build("sigmoid")
    assert str(info.value) == f"unknown schedule 'sigmoid'; known: {', '.join(SCHEDULES.names())}"
    assert "cosine" in str(info.value) and "linear" in str(info.value)
    assert SCHEDULES.build("linear", noise_steps=50).num_timesteps == 50


@pytest.mark.parametrize("betas", [torch.tensor([1.0, 0.1]), torch.tensor([0.1, 1.5]), torch.tensor([0.0, 0.1]), torch.ones(2, 2) * 0.1])
def test_bad_betas_rejected(betas):
    with pytest.raises(ValueError, match="betas must be a 1-D tensor"):
        NoiseSchedule(betas)
    assert NoiseSchedule(torch.tensor([0.1, 0.5, 1.0])).alphas_cumprod[-1].item() == 0.0  # zero terminal SNR
