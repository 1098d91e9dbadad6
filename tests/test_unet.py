"""U-Nets: shapes, errors, DDPM parameter count, registry, dropout, attention, and a tiny overfit run."""
import math

import pytest
import torch

from diffusion_lab.diffusion.losses import DiffusionLoss
from torch import nn

from diffusion_lab.diffusion.objectives import EpsObjective
from diffusion_lab.diffusion.schedules import linear
from diffusion_lab.models import DiffusionModel, DiffusionModelCIFAR, count_parameters
from diffusion_lab.models.unet import ResBlock, SelfAttention, TimeEmbedding
from diffusion_lab.registry import MODELS

DDPM_CIFAR10_PARAMS = 35_746_307  # diffusion_tf, ch=128, ch_mult=(1,2,2,2), 2 res blocks, attention at 16


def small_base(image_size, channels, **kw):
    return DiffusionModel(image_size, channels, hidden_dims=[8, 16, 16], time_dim=16, num_heads=2, norm_groups=4, **kw)


def small_cifar(image_size, channels, **kw):
    kw = {"hidden_dims": [8, 16, 16], "time_dim": 32, "num_res_blocks": 1, "attention_resolutions": (image_size // 2,),
          "num_heads": 2, "norm_groups": 4, **kw}
    return DiffusionModelCIFAR(image_size, channels, **kw)


@pytest.mark.parametrize("build", [small_base, small_cifar], ids=["base", "cifar"])
@pytest.mark.parametrize("image_size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape_matches_input(build, image_size, channels):
    torch.manual_seed(0)
    model = build(image_size, channels)
    x = torch.randn(2, channels, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_default_base_on_digits_shape():
    model = DiffusionModel(8, 1)
    with torch.no_grad():
        assert model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])).shape == (3, 1, 8, 8)


def test_ddpm_cifar_structure_has_attention_at_16_only():
    model = small_cifar(32, 3, hidden_dims=[8, 16, 16, 16], num_res_blocks=2, attention_resolutions=(16,))
    n_attn = sum(isinstance(m, SelfAttention) for m in model.modules())
    assert n_attn == 2 + 3 + 1  # encoder level 16 (2 blocks), decoder level 16 (3 blocks), bottleneck
    assert [len(up.res_blocks) for up in model.up_blocks] == [3, 3, 3, 3]


@pytest.mark.parametrize("cls", [DiffusionModel, DiffusionModelCIFAR])
def test_image_size_not_divisible(cls):
    with pytest.raises(ValueError, match=r"image_size=30 .*2\*\*3=8 \(3 downsamplings.*image_size=32"):
        cls(30, 3, hidden_dims=[8, 8, 8, 8], norm_groups=4)


@pytest.mark.parametrize("build", [small_base, small_cifar], ids=["base", "cifar"])
def test_channel_mismatch(build):
    model = build(8, 1)
    with pytest.raises(ValueError, match=r"channels=1.*got shape \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


def test_empty_hidden_dims_and_bad_groups():
    with pytest.raises(ValueError, match="hidden_dims must be a non-empty"):
        DiffusionModel(8, 1, hidden_dims=[])
    with pytest.raises(ValueError, match="norm_groups=8 does not divide the 12 channels"):
        DiffusionModel(8, 1, hidden_dims=[12, 24])


def test_ddpm_recipe_parameter_count():
    """experiment=ddpm_cifar10 builds the paper's network: DDPM's 35,746,307 parameters exactly."""
    from diffusion_lab.config.build import build_model
    from tests.helpers import compose_config

    cfg = compose_config(["experiment=ddpm_cifar10"])
    model = build_model(cfg, image_size=32, channels=3)
    assert (cfg.model.resample, cfg.model.zero_init) == ("ddpm", True)
    assert count_parameters(model) == DDPM_CIFAR10_PARAMS == 35_746_307
    assert not any(isinstance(m, nn.ConvTranspose2d) or getattr(m, "kernel_size", None) == (4, 4)
                   for m in model.modules())
    with torch.no_grad():  # a single tiny forward
        assert model.eval()(torch.randn(1, 3, 32, 32), torch.tensor([10])).shape == (1, 3, 32, 32)


def test_reference_classes_keep_the_reference_resampling():
    """DiffusionModelCIFAR's defaults (the reference) keep 4x4 resampling: 7/16 of every resampling weight more."""
    model = DiffusionModelCIFAR(32, 3)
    n = count_parameters(model)
    resample = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.kernel_size == (4, 4)]
    assert len(resample) == 6
    extra = sum(m.weight.numel() * 7 // 16 for m in resample)
    assert n - extra == DDPM_CIFAR10_PARAMS and n == 38_154_755
    assert any(p.abs().sum() > 0 for p in model.out_conv.parameters()), "no zero init in the reference"
    with pytest.raises(ValueError, match="unknown resample 'bilinear'; known: reference, ddpm"):
        DiffusionModelCIFAR(32, 3, [32, 32], resample="bilinear")


@pytest.mark.parametrize("build", [small_base, small_cifar], ids=["base", "cifar"])
def test_zero_init_makes_every_residual_branch_start_at_zero(build):
    torch.manual_seed(0)
    model = build(8, 1, resample="ddpm", zero_init=True)
    zeroed = [m.conv2 for m in model.modules() if isinstance(m, ResBlock)] + [model.out_conv]
    zeroed += [m.proj for m in model.modules() if isinstance(m, SelfAttention)]
    assert len(zeroed) > 3 and all(p.abs().sum() == 0 for layer in zeroed for p in layer.parameters())
    with torch.no_grad():
        out = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]))
    assert torch.equal(out, torch.zeros_like(out)), "DDPM's network predicts 0 at initialisation"
    loss = model(torch.randn(2, 1, 8, 8), torch.tensor([3, 700])).sub(1).pow(2).mean()
    loss.backward()
    assert model.out_conv.weight.grad.abs().sum() > 0, "and still learns"


def test_registry_builds_both():
    assert {"base", "cifar"} <= set(MODELS.names())
    base = MODELS.build("base", image_size=8, channels=1)
    assert isinstance(base, DiffusionModel) and base.hidden_dims == [32, 64, 128]
    cifar = MODELS.build("cifar", image_size=16, channels=1, base_channels=16, channel_mult=[1, 2], num_res_blocks=1,
                         attention_resolutions=[8], norm_groups=8, dropout=0.0)
    assert isinstance(cifar, DiffusionModelCIFAR) and cifar.hidden_dims == [16, 32]
    assert cifar.time_mlp.out_dim == 64  # time_dim defaults to 4 * base_channels, as in DDPM


def test_dropout_train_vs_eval():
    torch.manual_seed(0)
    model = small_cifar(8, 1, dropout=0.3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 500])
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(x, t), model(x, t))
        model.eval()
        assert torch.equal(model(x, t), model(x, t))


def naive_attention(attn: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    qkv = attn.qkv(attn.norm(x)).reshape(b, 3, heads, d, h * w)
    out = torch.empty(b, heads, d, h * w)
    for i in range(b):
        for j in range(heads):
            q, k, v = qkv[i, 0, j].T, qkv[i, 1, j].T, qkv[i, 2, j].T  # [HW, d]
            weights = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            out[i, j] = (weights @ v).T
    return x + attn.proj(out.reshape(b, c, h, w))


@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_matches_naive(channels_last):
    torch.manual_seed(0)
    attn = SelfAttention(16, num_heads=4, norm_groups=4)
    x = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        expected = naive_attention(attn, x)
        if channels_last:
            attn, x = attn.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    model = small_cifar(16, 3).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        ref = model(x, t)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.to(memory_format=torch.channels_last)
        out = model_cl(x_cl, t)
        assert torch.allclose(out, ref, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x_cl, t)
    assert out_bf16.shape == x.shape
    assert (out_bf16.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_time_embedding_is_sinusoidal():
    emb = TimeEmbedding(8)
    t = torch.tensor([0, 3])
    s = emb.sinusoidal(t)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 3)
    assert torch.allclose(s[1], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    assert torch.equal(s[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert emb(t).shape == (2, 8) and emb.mlp[0].out_features == 32


def digits_batch(n=16):
    try:
        from sklearn.datasets import load_digits

        images = torch.from_numpy(load_digits().images[:n]).float() / 8.0 - 1.0
    except ImportError:  # digits-like fallback: blocky random strokes
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(n, 4, 4, generator=g) > 0.5).float().repeat_interleave(2, 1).repeat_interleave(2, 2) * 2 - 1
    return images.unsqueeze(1)


def test_base_overfits_fixed_batch():
    torch.manual_seed(0)
    x0 = digits_batch()
    schedule, objective = linear(), EpsObjective()
    g = torch.Generator().manual_seed(0)
    t = schedule.sample_timesteps(x0.shape[0], "cpu", generator=g)
    x_t, eps = schedule.add_noise(x0, t, generator=g)
    model = DiffusionModel(8, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):  # fixed t and noise: the loss halves within ~5 steps, 30 leaves a wide margin
        loss = DiffusionLoss(schedule, objective).mse(model(x_t, t), x0, eps, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------------------------------------------- class conditioning


@pytest.mark.parametrize("name,kwargs", [("base", {"hidden_dims": [8, 16], "time_dim": 16, "norm_groups": 4}),
                                         ("cifar", {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                    "attention_resolutions": [4], "norm_groups": 4})])
def test_class_conditional_unet(name, kwargs):
    """num_classes adds Embedding(K + 1, time_dim) to the time embedding; y=None is the null class K."""
    torch.manual_seed(0)
    plain = MODELS.build(name, image_size=8, channels=1, **kwargs).eval()  # eval: no dropout
    torch.manual_seed(0)
    cond = MODELS.build(name, image_size=8, channels=1, num_classes=3, **kwargs).eval()
    time_dim = cond.time_mlp.out_dim
    assert cond.num_classes == 3 and plain.num_classes is None
    assert count_parameters(cond) - count_parameters(plain) == 4 * time_dim
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 50, 500, 900])
    with torch.no_grad():
        outs = [cond(x, t, torch.full((4,), k)) for k in range(4)]
        torch.testing.assert_close(cond(x, t), outs[3], rtol=0, atol=0)  # no labels = the null class
        c_noise = torch.log(torch.tensor([0.01, 0.5, 2.0, 80.0])) / 4  # a continuous process's float noise input
        torch.testing.assert_close(cond(x, c_noise), cond(x, c_noise, torch.full((4,), 3)), rtol=0, atol=0)
        assert all((outs[i] - outs[j]).abs().max() > 1e-4 for i in range(4) for j in range(i))
        cond.label_emb.weight.zero_()  # a zero label embedding is the unconditional network exactly
        cond.load_state_dict({**plain.state_dict(), "label_emb.weight": cond.label_emb.weight})
        torch.testing.assert_close(cond(x, t, torch.tensor([0, 1, 2, 3])), plain(x, t), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        MODELS.build(name, image_size=8, channels=1, num_classes=0, **kwargs)
