"""Continuous-time core in closed form: process formulas, parameterisation round trips, EDM preconditioning,
refusals and the loss recipe's weights and densities."""
import math

import pytest
import torch

from diffusion_lab.diffusion import grids, samplers  # noqa: F401  (registers grids and samplers)
from diffusion_lab.diffusion.exact import ExactDenoiser, GaussianMixture
from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.registry import GRIDS, OBJECTIVES, SAMPLERS, SCHEDULES

CONTINUOUS = ["vp", "ve", "edm", "flow"]
OBJ_NAMES = ["eps", "x0", "v", "flow", "edm"]
SD = 0.5  # sigma_data


def _process(name):
    return SCHEDULES.build(name)


def _interior(p, n=17):
    """Times strictly inside (t_min, t_max), away from the ends (float64)."""
    return torch.linspace(p.t_min, p.t_max, n + 2, dtype=torch.float64)[1:-1]


def _paper(name, t):
    """(alpha, sigma) of each process's paper, written independently of processes.py."""
    if name == "vp":  # Song et al. 2021: alpha = exp(-1/2 int_0^t beta), beta(s) = 0.1 + 19.9 s
        a = torch.exp(-0.5 * (0.1 * t + 0.5 * 19.9 * t**2))
        return a, torch.sqrt(1 - a**2)
    if name == "ve":  # sigma = 0.01 (50 / 0.01)^t
        return torch.ones_like(t), 0.01 * (50 / 0.01) ** t
    if name == "edm":
        return torch.ones_like(t), t
    return 1 - t, t  # flow


# -- 1. process closed forms -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CONTINUOUS)
def test_alpha_sigma_match_the_papers(name):
    p = _process(name)
    t = _interior(p)
    a, s = _paper(name, t)
    torch.testing.assert_close(p.alpha(t), a, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.sigma(t), s, rtol=1e-12, atol=0)
    torch.testing.assert_close(p.log_snr(t), torch.log(a / s), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_derivatives_match_central_differences(name):
    p = _process(name)
    t = _interior(p)
    h = 1e-6 * (p.t_max - p.t_min)
    for fn, d_fn in (("alpha", "d_alpha"), ("sigma", "d_sigma")):
        f = getattr(p, fn)
        fd = (f(t + h) - f(t - h)) / (2 * h)  # O(h^2) truncation, O(eps/h) rounding
        torch.testing.assert_close(getattr(p, d_fn)(t), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CONTINUOUS)
def test_t_of_log_snr_inverts_log_snr(name):
    p = _process(name)
    t = _interior(p)
    torch.testing.assert_close(p.t_of_log_snr(p.log_snr(t)), t, rtol=1e-9, atol=1e-12)


def test_vp_is_variance_preserving():
    p = _process("vp")
    t = torch.linspace(p.t_min, 1.0, 101, dtype=torch.float64)
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-14)
    assert p.variance_preserving and not _process("ve").variance_preserving


@pytest.mark.parametrize("name,c_noise", [("vp", lambda t, s: 999 * t), ("ve", lambda t, s: torch.log(s / 2)),
                                          ("edm", lambda t, s: torch.log(s) / 4)])
def test_c_noise_values(name, c_noise):
    p = _process(name)
    t = _interior(p)
    torch.testing.assert_close(p.c_noise(t), c_noise(t, p.sigma(t)), rtol=1e-12, atol=1e-12)


# -- 2. parameterisations --------------------------------------------------------------------------------------

def _refused(process_name, obj_name):
    return (obj_name == "flow" and process_name == "cosine") or (obj_name == "eps" and process_name == "flow")


COMBOS = [(p, o) for p in CONTINUOUS + ["cosine"] for o in OBJ_NAMES if not _refused(p, o)]


def _batch(p, seed=0):
    """float64 x0, eps [B, 3], times inside the range, x_t = alpha x0 + sigma eps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(50, 951, 100) if p.discrete else _interior(p, 9)
    x0 = torch.randn(len(t), 3, generator=g, dtype=torch.float64) * SD
    eps = torch.randn(len(t), 3, generator=g, dtype=torch.float64)
    a, s = p.coefficients(t, x0)  # the process's own coefficients (float32-stored for a discrete schedule)
    return x0, eps, t, a * x0 + s * eps


def _alpha_sigma(p, t):
    """float64 (alpha, sigma) [B, 1] (a discrete schedule's from its float64 alpha_bar)."""
    if p.discrete:
        ab = p.alphas_cumprod.double()[t]
        return ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    return p.alpha(t)[:, None], p.sigma(t)[:, None]


@pytest.mark.parametrize("pname,oname", COMBOS)
def test_target_round_trips_on_every_process(pname, oname):
    p, obj = _process(pname), OBJECTIVES.build(oname)
    x0, eps, t, x_t = _batch(p)
    target = obj.target(x0, eps, p, t)
    x0_back, eps_back = obj.to_x0_eps(target, x_t, p, t)
    tol = 1e-6 if p.discrete else 1e-10  # float32-stored alpha^2 + sigma^2 = 1 + O(1e-7) breaks v's identity
    torch.testing.assert_close(x0_back, x0, rtol=0, atol=tol)
    torch.testing.assert_close(eps_back, eps, rtol=0, atol=tol)


@pytest.mark.parametrize("pname,oname", COMBOS)
def test_x0_factor_maps_target_error_to_x0_error(pname, oname):
    p, obj = _process(pname), OBJECTIVES.build(oname)
    x0, eps, t, x_t = _batch(p, seed=1)
    target = obj.target(x0, eps, p, t)
    pred = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x0_pred, _ = obj.to_x0_eps(pred, x_t, p, t)
    x0_err, target_err = (x0 - x0_pred).pow(2).sum(1), (target - pred).pow(2).sum(1)
    torch.testing.assert_close(x0_err, obj.x0_factor(p, t) * target_err, rtol=1e-5 if p.discrete else 1e-9, atol=0)


def test_edm_preconditioning_is_karras_table_1():
    p, obj = _process("edm"), OBJECTIVES.build("edm")
    s = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = obj._coefs(p, s)
    torch.testing.assert_close(c_skip, SD**2 / (s**2 + SD**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_out, s * SD / torch.sqrt(s**2 + SD**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(c_in, 1 / torch.sqrt(s**2 + SD**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(obj.c_in(p, s), c_in)
    torch.testing.assert_close(p.c_noise(s), torch.log(s) / 4)


@pytest.mark.parametrize("pname", CONTINUOUS)
def test_edm_output_of_exact_denoiser_gives_posterior_mean(pname):
    p, obj = _process(pname), OBJECTIVES.build("edm")
    mix = GaussianMixture([0.3, 0.7], [-0.4, 0.6], [0.1, 0.2])
    _, _, t, x_t = _batch(p, seed=3)
    F = ExactDenoiser(p, mix, kind="edm")(x_t, t)
    x0_pred, eps_pred = obj.to_x0_eps(F, x_t, p, t)
    a, s = _alpha_sigma(p, t)
    rows = x_t.reshape(-1, 1)
    e_x0, e_eps = mix.posterior_means(rows, a.repeat_interleave(3, 0), s.repeat_interleave(3, 0))
    torch.testing.assert_close(x0_pred, e_x0.reshape(x_t.shape), rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_pred, e_eps.reshape(x_t.shape), rtol=0, atol=1e-9)


# -- 3. refusals -------------------------------------------------------------------------------------------------

def _one_line(excinfo):
    assert "\n" not in str(excinfo.value), str(excinfo.value)


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="objective=eps cannot be used with schedule=flow") as e:
        DiffusionLoss(_process("flow"), OBJECTIVES.build("eps"))
    _one_line(e)
    with pytest.raises(ValueError, match="objective=flow .* needs a continuous process") as e:
        DiffusionLoss(_process("cosine"), OBJECTIVES.build("flow"))
    _one_line(e)
    for grid in ("leading", "trailing"):
        with pytest.raises(ValueError, match=f"grid={grid} .*schedule=edm is continuous") as e:
            GRIDS.get(grid)(_process("edm"), 10)
        _one_line(e)
    x = torch.zeros(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="fixed_large needs a discrete schedule") as e:
        SAMPLERS.get("ddpm")(lambda x_t, t: x_t, _process("vp"), OBJECTIVES.build("eps"), x, variance="fixed_large")
    _one_line(e)


# -- 4. loss recipe ----------------------------------------------------------------------------------------------

def _x0_weights(pname, oname, weighting, **kw):
    """(weight * ||target - pred||^2 / ||x0 - x0_pred||^2, lambda) per sample: the loss's weight on the x0 error."""
    p, obj = _process(pname), OBJECTIVES.build(oname)
    recipe = DiffusionLoss(p, obj, weighting=weighting, **kw)
    x0, eps, t, x_t = _batch(p, seed=4)
    target = obj.target(x0, eps, p, t)
    pred = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0_pred, _ = obj.to_x0_eps(pred, x_t, p, t)
    w = recipe.weight(t).double()
    torch.testing.assert_close(recipe.mse(pred, x0, eps, t).double(), (w * (target - pred).pow(2).mean(1)).mean(),
                               rtol=1e-5, atol=0)
    return w * (target - pred).pow(2).sum(1) / (x0 - x0_pred).pow(2).sum(1), p.log_snr(t), w


WEIGHTINGS = {
    "min_snr": lambda lam: torch.exp(2 * lam).clamp(max=5.0),
    "edm": lambda lam: torch.exp(2 * lam) + 1 / SD**2,
    "sigmoid": lambda lam: torch.exp(2 * lam) * torch.sigmoid(2.0 - lam),
}


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize("pname,oname", [c for c in COMBOS if c[0] != "cosine"])
def test_weights_are_the_documented_x0_weights(pname, oname, weighting):
    x0_weight, lam, _ = _x0_weights(pname, oname, weighting, snr_gamma=5.0, sigmoid_bias=2.0)
    torch.testing.assert_close(x0_weight, WEIGHTINGS[weighting](lam), rtol=1e-5, atol=0)  # float32 weights


def test_min_snr_exercises_both_sides_of_the_clamp():
    _, lam, _ = _x0_weights("vp", "eps", "min_snr")
    snr = torch.exp(2 * lam)
    assert bool((snr > 5).any()) and bool((snr < 5).any())


@pytest.mark.parametrize("pname", ["edm", "ve", "vp"])
def test_edm_weighting_with_edm_objective_is_unit_on_the_target(pname):
    _, _, w = _x0_weights(pname, "edm", "edm")
    torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-6, atol=0)


N_DRAWS = 20000


def test_lognormal_on_edm_draws_log_sigma_normal():
    p = _process("edm")
    recipe = DiffusionLoss(p, OBJECTIVES.build("edm"), density="lognormal")
    t = recipe.sample_t(N_DRAWS, "cpu", torch.Generator().manual_seed(0))
    _assert_normal(torch.log(p.sigma(t)), -1.2, 1.2)


def test_logit_normal_on_flow_draws_logit_t_standard_normal():
    p = _process("flow")
    recipe = DiffusionLoss(p, OBJECTIVES.build("flow"), density="logit_normal")
    t = recipe.sample_t(N_DRAWS, "cpu", torch.Generator().manual_seed(0))
    assert bool((t > 0).all() and (t < 1).all())
    _assert_normal(torch.logit(t), 0.0, 1.0)


def _assert_normal(x, mean, std):
    """Sample mean and std within 5 standard errors (se(mean) = std/sqrt(n), se(std) ~ std/sqrt(2n))."""
    n = len(x)
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(n), x.mean().item()
    assert abs(x.std().item() - std) < 5 * std / math.sqrt(2 * n), x.std().item()
