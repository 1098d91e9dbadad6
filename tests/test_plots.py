"""Picture helpers: the moving average has no lag and keeps the length; figures are written."""
import numpy as np
import pytest
import torch

from diffusion_lab.diffusion.schedules import cosine, linear
from diffusion_lab.evaluation.plots import forward_diffusion, plot_loss, smooth


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_smooth_keeps_length_and_has_no_lag(n):
    line = list(np.arange(n, dtype=float))
    out = smooth(line, fraction=0.2)
    assert len(out) == n
    interior = slice(n // 5, n - n // 5) if n > 10 else slice(0, n)
    assert np.allclose(np.array(out)[interior], np.array(line)[interior], atol=1e-9 if n > 10 else 0.5)


def test_forward_diffusion_and_loss_pictures(tmp_path):
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    path = forward_diffusion(x0, {"linear": linear(100), "cosine": cosine(100)}, [0, 50, 99], tmp_path / "f.png")
    assert path.stat().st_size > 1000
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n')
    assert plot_loss(tmp_path / "m.jsonl", tmp_path / "loss.png").stat().st_size > 1000
