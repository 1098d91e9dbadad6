"""Config composition and CLI helpers shared by the end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.config import CONF_DIR

REPO = CONF_DIR.parent

# A run small enough for a few seconds on a CPU that still exercises every artefact.
TINY = [
    "model.hidden_dims=[16,32]", "model.time_dim=32", "train.steps=6", "train.batch_size=16",
    "train.log_every=2", "train.sample_every=3", "train.checkpoint_every=3", "train.num_grid_samples=4",
    "train.warmup_steps=2", "sampler.steps=5", "eval.every=3", "eval.num_samples=64", "eval.batch_size=32",
    "eval.feature_extractor=small",
]


def compose_config(overrides: Sequence[str] = (), config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_cli(module: str, args: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args` in `cwd` with W&B offline; returns the completed process."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
