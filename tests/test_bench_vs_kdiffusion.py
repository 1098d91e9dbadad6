"""experiments/bench_vs_kdiffusion.py: our Euler is k-diffusion's Euler step, and the benchmark runs on a tiny
budget (where k-diffusion's sampling.py, and for the flow part flow_matching, can be imported)."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.diffusion import grids
from diffusion_lab.diffusion.exact import ExactDenoiser
from diffusion_lab.diffusion.objectives import X0Objective
from diffusion_lab.diffusion.processes import EDMProcess
from diffusion_lab.diffusion.samplers import euler
from diffusion_lab.sampler_lab import make_mixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_vs_kdiffusion as bench  # noqa: E402


def kdiffusion_or_skip():
    """k-diffusion's sampling.py, or skip (pytest.importorskip semantics: CI does not install it)."""
    try:
        return bench.load_kdiffusion_sampling()
    except ImportError as error:
        pytest.skip(f"k-diffusion's sampling.py is not importable: {error}")


def test_our_euler_on_edm_is_the_kdiffusion_euler_step():
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (x_i - D(x_i, sigma_i)) / sigma_i on the same karras grid, to 0."""
    process, mixture = EDMProcess(), make_mixture(2, 3, 0.1, 0.7, seed=0)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D = ExactDenoiser(process, mixture, kind="x0")
    sigmas = grids.resolve("karras", process, 6).tolist() + [0.0]
    assert sigmas[0] == pytest.approx(80.0) and sigmas[-2] == pytest.approx(0.002)
    x = sigmas[0] * x_T
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    ours = euler(ExactDenoiser(process, mixture, kind="x0"), process, X0Objective(), x_T, steps=6, grid="karras",
                 clamp_final=False)
    assert torch.allclose(ours, x, rtol=0, atol=1e-12)
    assert not torch.allclose(ours, sigmas[0] * x_T, atol=1e-3)  # it moved: the check can fail


def test_most_steps_fits_the_budget():
    assert bench.most_steps(lambda s: 2 * s - 1, 8) == 4 and bench.most_steps(lambda s: s, 5) == 5
    assert bench.most_steps(lambda s: 2 * s, 1) == 1  # at least one step


def test_kdiffusion_karras_sigmas_are_our_karras_grid():
    k = kdiffusion_or_skip()
    theirs = k.get_sigmas_karras(7, bench.SIGMA_MIN, bench.SIGMA_MAX, rho=bench.RHO).double()
    ours = grids.resolve("karras", EDMProcess(), 7)
    assert theirs[-1] == 0 and torch.allclose(theirs[:-1], ours, rtol=1e-6)  # theirs in float32


def test_benchmark_runs_on_a_tiny_budget():
    k = kdiffusion_or_skip()
    flow_peer = importlib.util.find_spec("flow_matching") is not None
    rows = bench.bench("edm", [3], 200, [0], k) + bench.bench("flow", [4], 200, [0], flow_peer=flow_peer)
    who = {r["who"] for r in rows}
    assert {"ours", "k-diffusion"} <= who and (("flow_matching" in who) == flow_peer)
    assert all(r["nfe_used"] <= r["budget"] for r in rows)
    kd_euler = next(r for r in rows if r["who"] == "k-diffusion" and (r["name"], r["grid"]) == ("euler", "karras"))
    our_euler = next(r for r in rows if r["who"] == "ours" and (r["name"], r["grid"], r["process"]) ==
                     ("euler", "karras", "edm"))
    assert kd_euler["sw"] == pytest.approx(our_euler["sw"], rel=1e-6)  # same algorithm, same x_T; their sigmas are float32
    assert all(math.isfinite(r["sw"]) for r in rows if r["name"] in ("euler", "dpm_solver", "dpmpp_2m"))
    text = bench.markdown(bench.summarise(rows))
    assert "edm, NFE budget 3" in text and "ours beating both" in text
