"""The learning-rate schedule TrainStep applies, checked step by step against its closed form."""
import math

import pytest
import torch

from diffusion_lab.optim import LR_SCHEDULES, TrainStep, build_optimizer

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


def test_the_schedule_resumes_where_it_stopped():
    whole = run_steps(make_step("cosine"), TOTAL)
    first = make_step("cosine")
    head = run_steps(first, 6)
    second = make_step("cosine")
    second.load_state_dict(first.state_dict())
    assert head + run_steps(second, TOTAL - 6) == pytest.approx(whole, rel=1e-12)
