"""Objectives: target <-> (x0, eps) round trips and the x0-space meaning of the loss weightings."""
import math

import pytest
import torch

from diffusion_lab.diffusion.losses import DiffusionLoss
from diffusion_lab.diffusion.objectives import EpsObjective, Objective, VObjective, X0Objective
from diffusion_lab.diffusion.schedules import cosine, linear
from diffusion_lab.registry import OBJECTIVES, UnknownChoiceError

NAMES = ["eps", "x0", "v"]
GAMMA = 5.0


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return {"linear": linear, "cosine": cosine}[request.param]()


def _batch(schedule, seed=0):
    """float64 x0, eps, every 7th timestep plus both ends, and x_t = a x0 + b eps."""
    g = torch.Generator().manual_seed(seed)
    T = schedule.num_timesteps
    t = torch.cat([torch.arange(0, T, 7), torch.tensor([T - 1])])
    x0 = torch.rand(len(t), 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    x_t, _ = schedule.add_noise(x0, t, noise=eps)
    return x0, eps, t, x_t


def _snr64(schedule, t):
    """SNR = a^2 / b^2 from the stored sqrt coefficients (float64, shape [B])."""
    a = schedule.sqrt_alphas_cumprod.double()[t]
    b = schedule.sqrt_one_minus_alphas_cumprod.double()[t]
    return a**2 / b**2


@pytest.mark.parametrize("name", NAMES)
def test_target_round_trips_to_x0_and_eps(schedule, name):
    obj = OBJECTIVES.build(name)
    x0, eps, t, x_t = _batch(schedule)
    target = obj.target(x0, eps, schedule, t)
    assert target.dtype == torch.float64
    x0_pred, eps_pred = obj.to_x0_eps(target, x_t, schedule, t)
    torch.testing.assert_close(x0_pred, x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_pred, eps, rtol=0, atol=1e-6)


def test_targets_are_what_the_names_say(schedule):
    x0, eps, t, x_t = _batch(schedule, seed=1)
    a = schedule.sqrt_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    b = schedule.sqrt_one_minus_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    assert torch.equal(EpsObjective().target(x0, eps, schedule, t), eps)
    assert torch.equal(X0Objective().target(x0, eps, schedule, t), x0)
    torch.testing.assert_close(VObjective().target(x0, eps, schedule, t), a * eps - b * x0)


@pytest.mark.parametrize("name", NAMES)
def test_predictions_are_consistent_with_x_t(schedule, name):
    # any prediction (not only the true target) gives x0_pred, eps_pred with x_t = a x0_pred + b eps_pred
    obj = OBJECTIVES.build(name)
    _, _, t, x_t = _batch(schedule, seed=2)
    pred = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0_pred, eps_pred = obj.to_x0_eps(pred, x_t, schedule, t)
    a = schedule.sqrt_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    b = schedule.sqrt_one_minus_alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a * x0_pred + b * eps_pred, x_t, rtol=1e-6, atol=1e-6)


def _x0_space(schedule, name, weighting):
    """(weight * ||target - pred||^2, ||x0 - x0_pred||^2) per sample, for a perturbed prediction at fixed x_t."""
    obj = OBJECTIVES.build(name)
    recipe = DiffusionLoss(schedule, obj, weighting=weighting, snr_gamma=GAMMA)
    x0, eps, t, x_t = _batch(schedule, seed=4)
    target = obj.target(x0, eps, schedule, t)
    # a perturbation of order 1: float32 storage makes a^2 + b^2 = 1 + O(1e-7), which adds O(1e-7) x0 to x0_pred
    # for v; against a tiny perturbation at t = 0 (b ~ 2e-3) that would dominate the comparison
    pred = target + torch.randn(target.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0_pred, _ = obj.to_x0_eps(pred, x_t, schedule, t)
    weight = recipe.weight(t)
    weight = torch.ones(t.shape, dtype=torch.float64) if weight is None else weight.double()
    assert weight.shape == t.shape
    target_err = (target - pred).pow(2).flatten(1).mean(1)
    x0_err = (x0 - x0_pred).pow(2).flatten(1).mean(1)
    loss = recipe.mse(pred, x0, eps, t)
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), (weight * target_err).mean(), rtol=1e-5, atol=0)
    return weight * target_err, x0_err, t


@pytest.mark.parametrize("name", NAMES)
def test_min_snr_weights_x0_error_by_min_snr_gamma(schedule, name):
    weighted, x0_err, t = _x0_space(schedule, name, "min_snr")
    snr = _snr64(schedule, t)
    assert bool((snr > GAMMA).any()) and bool((snr < GAMMA).any())  # both sides of the clamp are exercised
    torch.testing.assert_close(weighted, snr.clamp(max=GAMMA) * x0_err, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name,x0_weight", [("eps", lambda snr: snr), ("x0", lambda snr: torch.ones_like(snr)),
                                            ("v", lambda snr: snr + 1)])
def test_uniform_weights(schedule, name, x0_weight):
    weighted, x0_err, t = _x0_space(schedule, name, "uniform")
    assert DiffusionLoss(schedule, OBJECTIVES.build(name)).weight(t) is None  # no weight: plain MSE
    # plain MSE on the target = the documented implicit weight on the x0 error
    torch.testing.assert_close(weighted, x0_weight(_snr64(schedule, t)) * x0_err, rtol=1e-5, atol=0)


def test_bad_weighting_and_gamma():
    with pytest.raises(ValueError, match="unknown loss weighting 'p2'; known: edm, min_snr, sigmoid, uniform"):
        DiffusionLoss(linear(), EpsObjective(), weighting="p2")
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        DiffusionLoss(linear(), VObjective(), weighting="min_snr", snr_gamma=0.0)
    with pytest.raises(NotImplementedError):
        Objective().target(None, None, None, None)


def test_objective_registry():
    assert set(NAMES) <= set(OBJECTIVES.names())
    with pytest.raises(UnknownChoiceError, match="unknown objective 'score'; known: .*eps"):
        OBJECTIVES.build("score")
    recipe = DiffusionLoss(linear(), OBJECTIVES.build("x0"), weighting="min_snr", snr_gamma=2.5)
    assert isinstance(recipe.objective, X0Objective) and recipe.weighting == "min_snr" and recipe.snr_gamma == 2.5
    assert math.isclose(recipe.weight(torch.tensor([999])).item(), linear().snr[999].item(), rel_tol=1e-6)
