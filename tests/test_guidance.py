"""Classifier-free guidance: the wrapper's arithmetic, and every sampler driven by an EXACT class-conditional
denoiser (``diffusion_lab.diffusion.exact.ConditionalDenoiser``) checked against closed forms.

The guided Gaussian case in closed form. Class y: N(m_c, s_c^2), null class: N(m_u, s_u^2). In y = x / alpha and
sigma = sigma_t / alpha_t (VE form) the exact predictor is eps(y, sigma) = sigma (y - m) / (s^2 + sigma^2), and the
probability-flow ODE is dy/dsigma = eps. Guidance makes it linear in y: dy/dsigma = A y - B with
    A = sigma ((1 - w) / (s_u^2 + sigma^2) + w / (s_c^2 + sigma^2)),  B = sigma ((1 - w) m_u / (s_u^2 + sigma^2) + w m_c / (..)),
so with Phi(sigma) = (s_u^2 + sigma^2)^((1-w)/2) (s_c^2 + sigma^2)^(w/2) (Phi' = A Phi), from y_T at sigma_T:
    y(0) = Phi(0) (y_T / Phi(sigma_T) + int_0^sigma_T B / Phi dsigma).
The end point's spread is Phi(0) / (Phi(sigma_T) alpha_T) per unit of x_T ~ N(0, 1): for sigma_T -> inf it is
s_u^(1 - w) s_c^w, the geometric interpolation of the two stds, NOT the std of the tilted density
p_u^(1-w) p_c^w, ((1 - w) / s_u^2 + w / s_c^2)^(-1/2): w > 1 sharpens geometrically.
"""
import math

import pytest
import torch
from scipy import integrate

from diffusion_lab.diffusion.exact import ConditionalDenoiser, ExactDenoiser, GaussianMixture, gaussian
from diffusion_lab.diffusion.guidance import Guidance, GuidedModel
from diffusion_lab.diffusion.objectives import EpsObjective, VObjective, X0Objective
from diffusion_lab.diffusion.samplers import Trajectory, build_sampler
from diffusion_lab.diffusion.schedules import linear
from diffusion_lab.registry import SAMPLERS

MIX = GaussianMixture([0.3, 0.7], [-0.5, 0.4], [0.1, 0.15])  # class 0 and class 1, one component each
OBJECTIVES = {"eps": EpsObjective(), "x0": X0Objective(), "v": VObjective()}
FAST = {"ddim": {"steps": 50}, "ddpm": {}, "dpm_solver": {"steps": 20}, "dpm_solver_3m": {"steps": 20},
        "heun": {"steps": 20}, "euler_ancestral": {"steps": 50}, "pc": {"steps": 50}, "euler": {"steps": 50},
        "edm": {"steps": 20}, "consistency": {"steps": 4}}


@pytest.fixture(scope="module")
def schedule():
    return linear()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- the wrapper itself


class Recorder:
    """A conditional 'model' whose output is x * (1 + y): records the labels of every call."""

    num_classes = 3

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((t.clone(), y.clone()))
        return x * (1.0 + y.view(-1, 1, 1, 1).to(x.dtype))


def test_guided_model_combines_both_predictions_in_one_batched_call():
    x, t, y = torch.randn(4, 1, 2, 2), torch.full((4,), 150), torch.tensor([0, 1, 2, 1])
    cond, uncond = x * (1.0 + y.view(-1, 1, 1, 1)), x * 4.0  # null class 3
    for w, calls, expected in ((2.5, [(0, 1, 2, 1, 3, 3, 3, 3)], uncond + 2.5 * (cond - uncond)),
                               (1.0, [(0, 1, 2, 1)], cond), (0.0, [(3, 3, 3, 3)], uncond)):
        model = Recorder()
        torch.testing.assert_close(GuidedModel(model, y, Guidance(w))(x, t), expected)
        assert [tuple(labels.tolist()) for _, labels in model.calls] == calls
    inside = Guidance(3.0, interval=(100, 200))  # Kynkaanniemi et al.: guided inside, conditional outside
    torch.testing.assert_close(GuidedModel(Recorder(), y, inside)(x, t), uncond + 3.0 * (cond - uncond))
    torch.testing.assert_close(GuidedModel(Recorder(), y, inside)(x, torch.full((4,), 50)), cond)


def test_guidance_rescale_matches_the_conditional_std():
    x, t, y = torch.randn(4, 1, 4, 4), torch.full((4,), 10), torch.tensor([0, 1, 2, 0])
    cond = x * (1.0 + y.view(-1, 1, 1, 1))
    plain = GuidedModel(Recorder(), y, Guidance(5.0))(x, t)
    full = GuidedModel(Recorder(), y, Guidance(5.0, rescale=1.0))(x, t)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    half = GuidedModel(Recorder(), y, Guidance(5.0, rescale=0.5))(x, t)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)


def test_guidance_refuses_bad_settings():
    with pytest.raises(ValueError, match="guidance_interval"):
        Guidance(2.0, interval=(300, 100))
    with pytest.raises(ValueError, match="guidance_rescale"):
        Guidance(2.0, rescale=1.5)
    with pytest.raises(ValueError, match="labels must be in"):
        GuidedModel(Recorder(), torch.tensor([0, 3]), Guidance(2.0))
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedModel(lambda x, t: x, torch.tensor([0]), Guidance(2.0))
    with pytest.raises(ValueError, match="does not take"):
        build_sampler("ddim", guidance_scales=2.0)


# ------------------------------------------------------------------------------ exact conditional sampling


@pytest.mark.parametrize("name", sorted(FAST))
def test_w0_is_unconditional_sampling_for_every_sampler(schedule, name):
    """w = 0 with labels gives exactly the samples of the unconditional exact denoiser from the same noise."""
    assert set(FAST) == set(SAMPLERS.names())
    x_T = torch.randn((64, 1, 2, 2), generator=_gen(1))
    labels = torch.arange(64) % 2
    guided = build_sampler(name, guidance_scale=0.0, **FAST[name])(
        ConditionalDenoiser.from_mixture(schedule, MIX), schedule, EpsObjective(), x_T, y=labels, generator=_gen())
    plain = build_sampler(name, **FAST[name])(ExactDenoiser(schedule, MIX), schedule, EpsObjective(), x_T,
                                                generator=_gen())
    torch.testing.assert_close(guided, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,allowance", [("dpm_solver", 0.03), ("heun", 0.03)])
def test_conditional_sampling_reproduces_each_class(schedule, name, allowance):
    """w = 1: the samples of label k have component k's mean and std (5 standard errors plus a discretisation
    allowance on the std, the size the unconditional tests of these samplers need)."""
    x_T = torch.randn((512, 1, 4, 4), generator=_gen(2))  # 16 draws per sample, 4096 per class
    labels = torch.arange(512) % 2
    out = build_sampler(name, clip_x0=False, clamp_final=False, **FAST[name])(
        ConditionalDenoiser.from_mixture(schedule, MIX), schedule, EpsObjective(), x_T, y=labels,
        generator=_gen()).double()
    for k in range(2):
        draws = out[labels == k].flatten()
        mean, std = MIX.means[k].item(), MIX.stds[k].item()
        assert abs(draws.mean().item() - mean) < 5 * std / math.sqrt(len(draws)) + allowance * std, (k, draws.mean())
        assert abs(draws.std().item() / std - 1) < 5 / math.sqrt(2 * len(draws)) + allowance, (k, draws.std())


def _guided_endpoint(w, m_c, s_c, m_u, s_u, alpha_T, sigma_T):
    """Slope and intercept of x0 = slope x_T + intercept for the guided probability-flow ODE (module docstring)."""
    def phi(s):
        return (s_u**2 + s**2) ** ((1 - w) / 2) * (s_c**2 + s**2) ** (w / 2)

    def b_over_phi(s):
        return s * ((1 - w) * m_u / (s_u**2 + s**2) + w * m_c / (s_c**2 + s**2)) / phi(s)

    integral = integrate.quad(lambda u: b_over_phi(math.exp(u)) * math.exp(u), -30.0, math.log(sigma_T),
                              epsabs=1e-13, epsrel=1e-12, limit=200)[0]  # sigma = e^u; the part below e^-30 is < 1e-26
    return phi(0.0) / (phi(sigma_T) * alpha_T), phi(0.0) * integral


@pytest.mark.parametrize("kind", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.0, 4.0])
def test_guided_gaussian_spread_follows_the_closed_form(schedule, kind, w):
    """The ODE end point of guided sampling (DPM-Solver++(3M), 100 steps) is x0 = slope x_T + intercept with the
    closed-form slope (the spread) and intercept (the mean) of the guided ODE; the same for eps-, x0- and
    v-models, since guiding the model output is guiding eps. The tilted density's std is far off for w > 1."""
    m_c, s_c, m_u, s_u = 0.5, 0.5, 0.0, 1.0
    model = ConditionalDenoiser(schedule, [gaussian(m_c, s_c)], gaussian(m_u, s_u), kind)
    trajectory = Trajectory(at=[0])
    x_T = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)  # the map is affine: two points give it
    x0 = build_sampler("dpm_solver_3m", steps=100, clip_x0=False, clamp_final=False, guidance_scale=w)(
        model, schedule, OBJECTIVES[kind], x_T, y=torch.zeros(2, dtype=torch.long), callback=trajectory).flatten()
    alpha_bar = schedule.alphas_cumprod[trajectory.timesteps[0]].double().item()
    slope, intercept = _guided_endpoint(w, m_c, s_c, m_u, s_u, math.sqrt(alpha_bar),
                                        math.sqrt((1 - alpha_bar) / alpha_bar))
    assert slope == pytest.approx(s_u ** (1 - w) * s_c**w, rel=1e-3)  # sigma_T is large: the limit formula
    assert (x0[1] - x0[0]).item() == pytest.approx(slope, rel=2e-3)
    assert x0[0].item() == pytest.approx(intercept, abs=2e-3 * s_c)
    tilted_std = ((1 - w) / s_u**2 + w / s_c**2) ** -0.5
    assert w <= 1 or abs(slope / tilted_std - 1) > 0.25  # 34% at w = 2, 77% at w = 4
