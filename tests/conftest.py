"""Shared test settings: W&B never goes online from a test, every test runs on the CPU, and the cache of
reference statistics, floors and trained extractors is a fresh temporary dir (never ~/.cache)."""
import os
import tempfile

import pytest
import torch

os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["DIFFUSION_LAB_CACHE"] = tempfile.mkdtemp(prefix="diffusion_lab_cache_")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a busy machine torch's spinning threads cost 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
