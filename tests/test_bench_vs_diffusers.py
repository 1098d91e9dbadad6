"""experiments/bench_vs_diffusers.py compares like with like: the same architecture on both sides."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import bench_vs_diffusers as bench  # noqa: E402

DDPM_CIFAR10_PARAMETERS = 35_746_307  # Ho et al. 2020's CIFAR-10 network


@pytest.mark.slow  # two 35.7M-parameter networks and the diffusers import: ~10-40 s on 2 cores
def test_both_networks_are_the_ddpm_cifar10_unet():
    nets = {name: bench.build(name, torch.device("cpu"), channels_last=False) for name in bench.NAMES}
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    assert counts == {name: DDPM_CIFAR10_PARAMETERS for name in bench.NAMES}
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0, 999])
    with torch.no_grad():
        for net in nets.values():
            assert net.eval()(x, t).shape == x.shape
