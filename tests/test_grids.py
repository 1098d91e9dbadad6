"""Time grids: every grid gives distinct descending timesteps; reference formulas; the lambda clip; Karras."""
from fractions import Fraction

import pytest
import torch

from diffusion_lab.diffusion import grids
from diffusion_lab.diffusion.schedules import NoiseSchedule, cosine, linear, linear_betas
from diffusion_lab.registry import GRIDS, UnknownChoiceError


def literal(T):
    """A T-step schedule without the app's checks (time-only grids do not look at the betas)."""
    return NoiseSchedule(linear_betas(T, 1e-4, 0.02))


def lam(schedule, ts):
    return grids.log_snr(schedule)[ts]


@pytest.mark.parametrize("T,S", [(1000, 1), (1000, 10), (1000, 50), (1000, 333), (1000, 1000), (10, 7), (97, 13)])
@pytest.mark.parametrize("name", ["linspace", "leading", "trailing"])
def test_time_grids_are_distinct_descending_in_range(T, S, name):
    ts = grids.resolve(name, literal(T), S)
    assert ts.dtype == torch.long and ts.shape == (S,)
    assert bool((ts[:-1] > ts[1:]).all()) and int(ts.min()) >= 0 and int(ts.max()) <= T - 1
    if name == "linspace":
        assert int(ts[-1]) == 0 and (S == 1 or int(ts[0]) == T - 1)
    elif name == "leading":
        assert int(ts[-1]) == 0 and int(ts[0]) == (S - 1) * (T // S)
        assert set(torch.diff(ts).tolist()) <= {-(T // S)}
    else:
        assert int(ts[0]) == T - 1 and int(ts[-1]) == round(T / S) - 1


@pytest.mark.parametrize("schedule", [linear(), cosine(), linear(250), cosine(4000)], ids=["lin", "cos", "lin250", "cos4k"])
@pytest.mark.parametrize("name", ["linspace", "leading", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("S", [1, 2, 5, 10, 50])
def test_every_grid_is_strictly_decreasing_in_range(schedule, name, S):
    ts = grids.resolve(name, schedule, S)
    assert ts.shape == (S,) and bool((ts[:-1] > ts[1:]).all()) and 0 <= int(ts.min()) <= int(ts.max()) < schedule.num_timesteps


def test_time_grids_match_reference_formulas():
    s = literal(1000)
    assert torch.equal(grids.linspace(s, 10), torch.linspace(0, 999, 10).round().long().flip(0))
    assert grids.leading(s, 10).tolist() == list(range(900, -1, -100))
    for S in (10, 20, 50, 100, 250):  # no float ties or extra elements for these: the raw formula is reliable
        assert torch.equal(grids.trailing(s, S), torch.round(torch.arange(1000, 0, -1000 / S)).long() - 1)
    # in general: round(T - i T/S) - 1 with exact round-half-to-even (the raw float formula can misround ties
    # such as T=100, S=24, or return S + 1 values)
    for T, S in [(100, 24), (100, 48), (1000, 7), (1000, 48), (999, 37)]:
        expected = [round(Fraction(T) - Fraction(i * T, S)) - 1 for i in range(S)]
        assert grids.trailing(literal(T), S).tolist() == expected


@pytest.mark.parametrize("S", [0, -3, 1001])
@pytest.mark.parametrize("name", ["linspace", "leading", "trailing", "logsnr", "karras"])
def test_steps_out_of_range(name, S):
    with pytest.raises(ValueError, match=r"steps must be in \(0, T\]"):
        grids.resolve(name, linear(), S)


def test_registry_and_other_forms():
    assert set(GRIDS.names()) == {"linspace", "leading", "trailing", "logsnr", "karras", "shift"}
    with pytest.raises(UnknownChoiceError, match="unknown grid 'uniform'; known: karras, leading"):
        grids.resolve("uniform", linear(), 10)
    s = linear()
    assert grids.resolve([999, 500, 3], s, 7).tolist() == [999, 500, 3]  # a list sets its own length
    for bad in ([500, 999], [999, 999], [1000, 3], [5, -1], []):
        with pytest.raises(ValueError, match="distinct descending timesteps in"):
            grids.resolve(bad, s, 3)
    assert torch.equal(grids.resolve({"name": "karras", "rho": 3.0}, s, 8), grids.karras(s, 8, rho=3.0))
    assert not torch.equal(grids.karras(s, 8, rho=3.0), grids.karras(s, 8))
    assert grids.resolve(lambda sched, n: torch.arange(n).flip(0) * 3, s, 4).tolist() == [9, 6, 3, 0]
    assert grids.is_list([3, 2]) and not grids.is_list("linspace") and not grids.is_list({"name": "karras"})


@pytest.mark.parametrize("steps", [10, 20])  # more steps: near t=0 adjacent integers set the jumps
def test_logsnr_takes_equal_steps_in_lambda(steps):
    s = linear()
    ts = grids.logsnr(s, steps)
    h = lam(s, ts).diff()
    assert ts[0] == 999 and ts[-1] == 0, "linear's lambda(T-1) = -5.06 is above the -5.1 clip"
    assert bool((h > 0).all()) and (h.max() / h.min()).item() < 1.5, h  # integer t allows a little unevenness
    h_u = lam(s, grids.linspace(s, steps)).diff()
    assert (h_u.max() / h_u.min()).item() > 5, "the time-uniform grid is very uneven in lambda (why logsnr exists)"


def test_logsnr_lambda_clip_keeps_cosine_steps_off_the_max_beta_jump():
    """Under cosine, beta_{T-1} = max_beta makes lambda jump from -6.5 to -10 at t = T-1: an unclipped
    lambda-uniform grid puts many of its points at t >= 991 (the issue measured 8 of 20)."""
    s = cosine()
    unclipped = grids.logsnr(s, 20, lambda_min_clipped=-float("inf"))
    clipped = grids.logsnr(s, 20)
    assert int((unclipped >= 991).sum()) >= 5 and unclipped[0] == 999
    assert int((clipped >= 991).sum()) <= 2
    assert lam(s, clipped)[0].item() >= -5.1 and lam(s, clipped[0] + 1).item() < -5.1  # first t above the clip
    with pytest.raises(ValueError, match="leaves"):
        grids.logsnr(s, 20, lambda_min_clipped=4.0)


def test_karras_follows_eq5_in_sigma():
    s = linear()
    ts = grids.karras(s, 10)
    sigma = (-lam(s, ts)).exp()
    sigma_all = (-grids.log_snr(s)).exp()
    ramp = torch.linspace(0, 1, 10, dtype=torch.float64)
    rho = 7.0
    target = (sigma_all[-1] ** (1 / rho) + ramp * (sigma_all[0] ** (1 / rho) - sigma_all[-1] ** (1 / rho))) ** rho
    assert ts[0] == 999 and ts[-1] == 0
    assert grids.karras(cosine(), 10)[0] < 999, "under cosine the lambda clip sets sigma_max, as for logsnr"
    # nearest integer timestep: the relative sigma error is at most the step between adjacent timesteps
    torch.testing.assert_close(sigma.log(), target.log(), rtol=0, atol=0.05)
