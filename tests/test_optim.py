"""The learning-rate schedule TrainStep applies, checked step by step against its closed form."""
import math
from pathlib import Path

import pytest
import torch

from diffusion_lab.diffusion.losses import DiffusionLoss
from omegaconf import OmegaConf

from diffusion_lab.training.progress import shorten
from diffusion_lab.training.step import LR_SCHEDULES, TrainStep, build_optimizer, clipped_warmup, lr_factor, warmup_note

PEAK, WARMUP, TOTAL = 0.1, 4, 14


def expected_lr(name: str, k: int) -> float:
    """lr of 0-based optimizer step k: (k+1)/W * peak during warm-up, then the decay of p = (k-W)/(T-W)."""
    if k < WARMUP:
        return PEAK * (k + 1) / WARMUP
    p = (k - WARMUP) / (TOTAL - WARMUP)
    return PEAK * {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p}[name]


def make_step(name: str) -> TrainStep:
    model = torch.nn.Linear(3, 1)
    optimizer = build_optimizer(model.parameters(), "adamw", PEAK)
    return TrainStep(model, optimizer, "cpu", "fp32", warmup_steps=WARMUP, lr_schedule=name, total_steps=TOTAL)


def run_steps(step: TrainStep, n: int) -> list:
    """The lr each of n optimizer steps used."""
    used = []
    for _ in range(n):
        used.append(step.lr)
        step(lambda: step.model(torch.ones(2, 3)).square().mean())
    return used


def test_the_registry_holds_the_three_schedules():
    assert LR_SCHEDULES.names() == ["constant", "cosine", "linear"]


@pytest.mark.parametrize("name", ["constant", "cosine", "linear"])
def test_lr_follows_warmup_then_the_closed_form_decay(name):
    used = run_steps(make_step(name), TOTAL)
    assert used == pytest.approx([expected_lr(name, k) for k in range(TOTAL)], rel=1e-12)
    assert used[WARMUP - 1] == pytest.approx(PEAK)  # warm-up ends at the peak
    if name != "constant":
        assert used[-1] < 0.2 * PEAK  # and the decay reaches near zero by the last step


def test_a_short_run_warms_up_over_a_fifth_of_its_steps():
    assert clipped_warmup(100, 750) == 100  # the default run keeps its 100 steps
    warmup = clipped_warmup(100, 100)  # train.steps=100 would otherwise peak at its last step
    assert warmup == 20
    factors = [lr_factor(k, warmup, 100, LR_SCHEDULES.get("cosine")) for k in range(100)]
    assert max(factors) == factors[warmup - 1] == 1.0 and factors[-1] < 0.01
    short = OmegaConf.create({"warmup_steps": 100, "steps": 100, "lr": 2e-3, "lr_schedule": "cosine"})
    assert warmup_note(short) == ("lr: warm-up 20 steps (train.warmup_steps=100 clipped to 20% of train.steps=100) "
                                  "to 0.002, then cosine to step 100")
    assert shorten(warmup_note(short), Path("train.log")) == warmup_note(short)  # the console shows it whole


def test_the_schedule_resumes_where_it_stopped():
    whole = run_steps(make_step("cosine"), TOTAL)
    first = make_step("cosine")
    head = run_steps(first, 6)
    second = make_step("cosine")
    second.load_state_dict(first.state_dict())
    assert head + run_steps(second, TOTAL - 6) == pytest.approx(whole, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches of B/k are one step on a batch of B.

B, K, STEPS = 8, 4, 3


def tiny_unet_step(grad_accum_steps: int, optimizer: str, grad_clip: float, seed: int = 0) -> TrainStep:
    """The real base U-Net (tiny, float64 so rounding cannot hide a difference) with an EMA."""
    from diffusion_lab.models.unet import DiffusionModel
    from diffusion_lab.training.ema import EMA

    torch.manual_seed(seed)
    model = DiffusionModel(image_size=8, channels=1, hidden_dims=(8, 16), time_dim=16, num_heads=2,
                           norm_groups=4).double()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd"
           else build_optimizer(model.parameters(), "adamw", 1e-2))
    return TrainStep(model, opt, "cpu", "fp32", grad_clip=grad_clip, warmup_steps=2, ema=EMA(model, decay=0.9),
                     lr_schedule="cosine", total_steps=STEPS, grad_accum_steps=grad_accum_steps)


def fixed_batches() -> list:
    """STEPS batches of (x0, t, eps) for the eps loss on the linear schedule: the same data and noise for both runs."""
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(B, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1,
             torch.randint(0, 1000, (B,), generator=g), torch.randn(B, 1, 8, 8, generator=g, dtype=torch.float64))
            for _ in range(STEPS)]


def train_on(step: TrainStep, batches: list, chunks: int) -> list:
    """Run one optimizer step per batch, each fed to loss_fn as `chunks` consecutive slices; returns (loss, norm)s."""
    from diffusion_lab.config.build import OBJECTIVES, SCHEDULES

    schedule, objective = SCHEDULES.build("linear").to(torch.float64), OBJECTIVES.build("eps")
    pieces = iter([tuple(part.chunk(chunks)[i] for part in batch) for batch in batches for i in range(chunks)])

    def loss_fn():
        x0, t, eps = next(pieces)
        x_t, _ = schedule.add_noise(x0, t, eps)
        return DiffusionLoss(schedule, objective).mse(step.model(x_t, t), x0, eps, t)

    return [step(loss_fn) for _ in batches]


@pytest.mark.parametrize("optimizer,grad_clip", [("sgd", 0.0), ("adamw", 0.05)])
@pytest.mark.usefixtures("one_thread")
def test_k_micro_batches_give_the_weights_of_one_batch_k_times_larger(optimizer, grad_clip):
    batches = fixed_batches()
    whole, parts = tiny_unet_step(1, optimizer, grad_clip), tiny_unet_step(K, optimizer, grad_clip)
    whole_log, parts_log = train_on(whole, batches, 1), train_on(parts, batches, K)
    flat = lambda log: [value for pair in log for value in pair]  # noqa: E731
    assert flat(parts_log) == pytest.approx(flat(whole_log), rel=1e-6)  # mean loss, pre-clip norm (as float32)
    if grad_clip:
        assert all(norm > grad_clip for _, norm in whole_log)  # the clip really acted
    for a, b in zip([*whole.model.parameters(), *whole.ema.module.parameters()],
                    [*parts.model.parameters(), *parts.ema.module.parameters()]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert parts.lr == pytest.approx(whole.lr) and parts.lr_scheduler.last_epoch == STEPS
    start = tiny_unet_step(1, optimizer, grad_clip)
    assert max((p - q).abs().max().item() for p, q in zip(start.model.parameters(), whole.model.parameters())) > 1e-4


def test_a_non_finite_micro_batch_skips_the_whole_step():
    batches = fixed_batches()[:1]
    batches[0][0][B - 1] = float("nan")  # only the last micro-batch holds the bad image
    step = tiny_unet_step(K, "adamw", 1.0)
    before = [p.detach().clone() for p in step.model.parameters()]
    loss, _ = train_on(step, batches, K)[0]
    assert step.skipped and not math.isfinite(loss)
    assert all(torch.equal(p, q) for p, q in zip(before, step.model.parameters()))
    assert step.lr_scheduler.last_epoch == 0 and step.ema.num_updates == 0


@pytest.mark.usefixtures("one_thread")
def test_the_loss_scaler_scales_every_micro_batch_and_unscales_once():
    """A loss scale (fp16's GradScaler, here on the CPU) must not change the update; a NaN lowers it."""
    batches = fixed_batches()
    plain, scaled = tiny_unet_step(K, "sgd", 0.0), tiny_unet_step(K, "sgd", 0.0)
    for step in (plain, scaled):
        step.model.float()
        step.ema = None
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    batches = [tuple(part.float() if part.is_floating_point() else part for part in batch) for batch in batches]
    scaled_log, plain_log = train_on(scaled, batches, K), train_on(plain, batches, K)
    assert [v for pair in scaled_log for v in pair] == pytest.approx([v for pair in plain_log for v in pair], rel=1e-5)
    for a, b in zip(plain.model.parameters(), scaled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    batches[0][0][0] = float("nan")
    train_on(scaled, batches[:1], K)
    assert scaled.skipped and scaled.scaler.get_scale() == 2.0 ** 11


def test_grad_accum_steps_must_divide_the_batch():
    from diffusion_lab.training.step import micro_batch_size

    assert micro_batch_size(128, 4) == 32
    with pytest.raises(ValueError, match="multiple"):
        micro_batch_size(10, 4)
    with pytest.raises(ValueError, match=">= 1"):
        tiny_unet_step(0, "sgd", 0.0)


def test_last_lr_is_the_lr_the_step_used():
    """What training logs: at the last step of a decay the lr used is > 0 (the next one would be 0)."""
    step = make_step("linear")
    used = run_steps(step, TOTAL)
    assert step.last_lr == used[-1] > 0 and step.lr == pytest.approx(0.0, abs=1e-15)


def test_a_resume_keeps_the_runs_clipped_warm_up():
    """The warm-up is clipped to a fraction of train.steps; a resume that raises train.steps keeps the warm-up
    the run started with (saved in the step's state), so its learning rates continue as they were."""
    def step_fn(warmup):
        model = torch.nn.Linear(2, 1)
        return TrainStep(model, torch.optim.SGD(model.parameters(), lr=1.0), "cpu", warmup_steps=warmup,
                         lr_schedule="constant", total_steps=100)

    first = step_fn(warmup=4)
    for _ in range(2):
        first(lambda: first.model(torch.ones(1, 2)).sum())
    resumed = step_fn(warmup=20)  # the clip of a longer train.steps
    resumed.load_state_dict(first.state_dict())
    assert resumed.warmup_steps == 4 and resumed.lr == first.lr == 0.75
