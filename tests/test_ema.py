"""EMA of weights: update formula, decay extremes, store/restore, state_dict."""
import pytest
import torch
from torch import nn

from diffusion_lab.training.ema import EMA


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def train_steps(model, n=5):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(n):
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(i))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_shadow_is_separate_frozen_eval_copy():
    model = small_model()
    ema = EMA(model)
    assert ema.module is not model and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert states_equal(ema.module, model)


def test_ema_lags_with_high_decay_and_tracks_with_zero_decay():
    model = small_model()
    slow, instant = EMA(model, decay=0.999, warmup=False), EMA(model, decay=0.0)
    for _ in range(3):
        train_steps(model, 1)
        slow.update(model)
        instant.update(model)
    assert not torch.equal(slow.module[0].weight, model[0].weight)
    assert states_equal(instant.module, model)  # params and buffers (BatchNorm running stats)
    assert torch.equal(slow.module[1].running_mean, model[1].running_mean)  # buffers are copied


@pytest.mark.parametrize("warmup", [True, False])
def test_update_formula_by_hand(warmup):
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.5, warmup=warmup)
    expected = 1.0
    for n, value in enumerate([3.0, -2.0, 5.0, 0.25]):
        with torch.no_grad():
            model.weight.fill_(value)
        decay = min(0.5, (1 + n) / (10 + n)) if warmup else 0.5
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(model)
        expected = decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert ema.num_updates == 4
    # warmup: n=0 -> decay 0.1, n=1 -> 2/11, n=2 -> 0.25, n=3 -> 4/13 (all below 0.5)
    if warmup:
        assert EMA(model, decay=0.9).current_decay() == pytest.approx(0.1)


def test_store_restore_bit_identical():
    model = small_model()
    ema = EMA(model, decay=0.9)
    train_steps(model, 3)
    ema.update(model)
    train_steps(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swap_into(model) as swapped:
        assert swapped is model
        assert states_equal(model, ema.module)
        assert not torch.equal(model[0].weight, before["0.weight"])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model[0].weight.requires_grad  # still the training parameters
    with pytest.raises(RuntimeError, match="without a matching"):
        ema.restore(model)


def test_restore_after_exception():
    model = small_model()
    ema = EMA(model, decay=0.0)
    train_steps(model, 1)
    before = model[0].weight.clone()
    with pytest.raises(KeyError):
        with ema.swap_into(model):
            raise KeyError("boom")
    assert torch.equal(model[0].weight, before)


def test_state_dict_round_trip():
    model = small_model()
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        train_steps(model, 1)
        ema.update(model)
    state = ema.state_dict()
    fresh = EMA(small_model(), decay=0.99)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 3 and fresh.current_decay() == ema.current_decay()
    assert states_equal(fresh.module, ema.module)
    train_steps(model, 1)
    ema.update(model)
    fresh.update(model)  # loading keeps the cached parameter lists valid
    assert states_equal(fresh.module, ema.module)


def test_mismatched_model_rejected():
    ema = EMA(small_model())
    with pytest.raises(ValueError, match="not the model the EMA was built from"):
        ema.update(nn.Linear(4, 2))
