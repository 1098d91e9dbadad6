"""The reference API: both processes construct, train, sample; documented defaults hold."""
import pytest
import torch

from diffusion_lab import DiffusionModel, DiffusionModelCIFAR, DiffusionProcess, DiffusionProcessCIFAR
from diffusion_lab.diffusion.schedules import cosine_betas, linear_betas


def digits_batch(n=8, size=8):
    from diffusion_lab.data.datasets import digits

    return digits(size).images[:n]


def test_diffusion_process_api():
    torch.manual_seed(0)
    p = DiffusionProcess(image_size=8, channels=1, hidden_dims=[16, 32], noise_steps=50, device="cpu")
    assert isinstance(p.model, DiffusionModel) and p.device.type == "cpu"
    assert isinstance(p.optimizer, torch.optim.Adam) and p.optimizer.param_groups[0]["lr"] == 1e-4
    assert not p.scaler.is_enabled(), "the AMP scaler is CUDA-only"
    assert torch.allclose(p.beta_schedule, cosine_betas(50).float())
    assert torch.allclose(p.alpha, 1 - p.beta_schedule)
    assert torch.allclose(p.alpha_cumprod, torch.cumprod(p.alpha.double(), 0).float())
    assert torch.allclose(p.sqrt_alpha_cumprod ** 2 + p.sqrt_one_minus_alpha_cumprod ** 2, torch.ones(50))
    x = digits_batch()
    x_t, noise = p.add_noise(x, torch.full((8,), 49))
    assert x_t.shape == noise.shape == x.shape
    loss = p.train_step(x)
    assert isinstance(loss, float) and loss > 0
    samples = p.sample(3)
    assert samples.shape == (3, 1, 8, 8) and samples.abs().max() <= 1
    assert p.sample_ddim(2, ddim_steps=10, eta=0.5).shape == (2, 1, 8, 8)
    for bad in (0, 51):
        with pytest.raises(ValueError, match="ddim_steps"):
            p.sample_ddim(1, ddim_steps=bad)


def test_cosine_ignores_beta_start_and_end():
    """Documented decision: beta_start/beta_end do not shape the cosine schedule."""
    a = DiffusionProcess(8, 1, [16, 32], beta_start=1e-4, beta_end=0.02, noise_steps=20, device="cpu")
    b = DiffusionProcess(8, 1, [16, 32], beta_start=1e-3, beta_end=0.5, noise_steps=20, device="cpu")
    assert torch.equal(a.beta_schedule, b.beta_schedule) and b.beta_end == 0.5


def test_diffusion_process_cifar_api():
    torch.manual_seed(0)
    p = DiffusionProcessCIFAR(image_size=8, channels=1, hidden_dims=[32, 32], noise_steps=40, dropout=0.1,
                              ema_decay=0.9, device="cpu")
    assert isinstance(p.model, DiffusionModelCIFAR)
    assert torch.allclose(p.beta_schedule, linear_betas(40, 1e-4, 0.02).float())
    group = p.optimizer.param_groups[0]
    assert isinstance(p.optimizer, torch.optim.AdamW)
    assert (group["lr"], group["weight_decay"], group["betas"]) == (2e-4, 1e-5, (0.9, 0.999))
    ab, ab_prev = p.alpha_cumprod.double(), torch.cat([torch.ones(1), p.alpha_cumprod[:-1]]).double()
    assert torch.allclose(p.posterior_variance.double(), p.beta_schedule.double() * (1 - ab_prev) / (1 - ab), rtol=1e-3)
    assert p.posterior_mean_coef1.shape == p.posterior_mean_coef2.shape == (40,)
    before = {k: v.clone() for k, v in p.ema_model.state_dict().items()}
    for _ in range(3):
        p.train_step(digits_batch())
    ema, model = p.ema_model.state_dict(), p.model.state_dict()
    assert any(not torch.equal(ema[k], before[k]) for k in ema), "the EMA moves"
    assert any(not torch.allclose(ema[k], model[k]) for k in ema), "and lags the model"
    assert p.sample(2).shape == (2, 1, 8, 8)
    out = p.sample_ddim(2, ddim_steps=5)
    assert out.shape == (2, 1, 8, 8) and out.abs().max() <= 1


def test_cifar_ema_equals_model_at_decay_zero():
    p = DiffusionProcessCIFAR(8, 1, [32, 32], noise_steps=20, ema_decay=0.0, device="cpu")
    p.train_step(digits_batch())
    for key, value in p.model.state_dict().items():
        assert torch.equal(value, p.ema_model.state_dict()[key]), key


def test_gradient_clipping_at_one():
    torch.manual_seed(0)  # unclipped, this step's gradient norm is 2.16
    p = DiffusionProcessCIFAR(8, 1, [32, 32], noise_steps=20, device="cpu")
    assert p._step.grad_clip == 1.0
    p.train_step(digits_batch() * 50)  # a huge loss: clipping must bound the update
    norm = torch.sqrt(sum(q.grad.pow(2).sum() for q in p.model.parameters() if q.grad is not None))
    assert norm <= 1.0 + 1e-4


def _zero_net(p):
    """A copy of the process's network with every weight zeroed: it predicts eps = 0 (output bias 0)."""
    import copy

    net = copy.deepcopy(p.model)
    with torch.no_grad():
        for q in net.parameters():
            q.zero_()
    return net


def test_assigning_ema_model_changes_what_sample_uses():
    torch.manual_seed(0)
    p = DiffusionProcessCIFAR(8, 1, [32, 32], noise_steps=20, device="cpu")
    zero = _zero_net(p)
    p.ema_model = zero
    assert all(torch.equal(a, b) for a, b in zip(p.ema_model.parameters(), zero.parameters()))
    # eps = 0 everywhere: DDIM's x0_pred is x_t / sqrt(ab), and the sample is the deterministic image of x_T
    g = torch.Generator().manual_seed(3)
    out = p.sample_ddim(2, ddim_steps=4, generator=g)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ab = p.alpha_cumprod.double()
    expected = (x_T.double() / ab[19].sqrt()).clamp(-1, 1).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    p.train_step(digits_batch())  # training keeps averaging into the assigned EMA
    assert any(not torch.equal(a, b) for a, b in zip(p.ema_model.parameters(), zero.parameters()))


@pytest.mark.parametrize("process, network, optimizer, lr", [
    (DiffusionProcess, DiffusionModel, torch.optim.Adam, 1e-4),
    (DiffusionProcessCIFAR, DiffusionModelCIFAR, torch.optim.AdamW, 2e-4),  # AdamW: its defaults hold a key
])                                                                          # its constructor refuses
def test_assigning_model_changes_what_training_and_sampling_use(process, network, optimizer, lr):
    torch.manual_seed(0)
    p = process(8, 1, [32, 32], noise_steps=20, device="cpu")
    new = network(8, 1, [32, 32])
    p.model = new
    assert p.model is new and p.optimizer.param_groups[0]["params"][0] is next(new.parameters())
    assert p.optimizer.param_groups[0]["lr"] == lr and type(p.optimizer) is optimizer
    assert p.optimizer.defaults == process(8, 1, [32, 32], noise_steps=20, device="cpu").optimizer.defaults
    before = [q.clone() for q in new.parameters()]
    p.train_step(digits_batch())
    assert any(not torch.equal(a, b) for a, b in zip(new.parameters(), before)), "training updates the new model"
    zero = _zero_net(p)
    p.model = zero
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = p.sample_ddim(2, ddim_steps=3, generator=torch.Generator().manual_seed(4))
    expected = (x_T.double() / p.alpha_cumprod.double()[19].sqrt()).clamp(-1, 1).float()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_assigning_schedule_arrays_changes_what_training_and_sampling_use():
    p = DiffusionProcessCIFAR(8, 1, [32, 32], noise_steps=20, device="cpu")
    new_betas = torch.linspace(1e-3, 0.3, 30)
    p.beta_schedule = new_betas
    assert p.noise_steps == 30 and p.schedule.num_timesteps == 30
    torch.testing.assert_close(p.beta_schedule, new_betas)
    torch.testing.assert_close(p.alpha_cumprod, torch.cumprod(1 - new_betas.double(), 0).float())
    p.sqrt_alpha_cumprod = torch.zeros(30)
    p.sqrt_one_minus_alpha_cumprod = torch.ones(30)
    x = torch.rand(4, 1, 8, 8)
    x_t, noise = p.add_noise(x, torch.full((4,), 3))
    assert torch.equal(x_t, noise), "add_noise uses the assigned arrays"
    assert p.sample(1).shape == (1, 1, 8, 8)  # ddpm now runs all 30 steps
