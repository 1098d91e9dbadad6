"""`python -m diffusion_lab.train`: config -> registry builds -> training loop -> logs, checkpoints, pictures.

A run reads in phases: build (here: the config becomes a `training.loop.Run`), restore, loop (with evaluate),
finish, around one `RunState` that a checkpoint saves and loads (`training/`). Data-parallel under torchrun:
every rank runs this, `Outputs` writes on rank 0 only.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("config", "train")  # --help and shell completion answer here, before torch is imported

import contextlib
import random
import signal
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from . import console
from .config import CONF_DIR
from .config.build import build_components, build_dataset, resolve_device
from .config.latent import build_latent
from .config.preflight import checked_main, refusals
from .config.teacher import attach_teacher
from .config.validation import validate
from .data.datasets import DatasetNotFoundError
from .data.loader import ResumableLoader
from .errors import ConfigError, fail
from .evaluation.tracker import FIDTracker
from .registry import UnknownChoiceError
from .training import checkpoint, cluster, distributed, preemption, progress
from .training import run_dir as run_dirs
from .training.distributed import Ranks
from .training.ema import EMAS
from .training.loggers import sweep_group, swept_keys
from .training.loop import Diverged, Loop, Run, finish, new_state, restore, run_phases, start
from .training.outputs import Outputs
from .training.step import TrainStep, build_optimizer, clipped_warmup, micro_batch_size

log = progress.log


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def auto_resume_line(runs: Sequence[Path]) -> str:
    """What train.resume=auto tells the user: which run it continues, and how many others matched."""
    if not runs:
        return "resume=auto: no matching run found; starting fresh"
    others = (f" (the newest of {len(runs)} matching runs, single runs before sweep jobs; pick another with "
              f"train.resume=DIR, e.g. {runs[1].parent.parent})" if len(runs) > 1 else "")
    return f"resume=auto: continuing {runs[0]}{others}"


def resume_path(cfg: DictConfig, outputs_root: Path) -> Optional[Path]:
    resume = cfg.train.resume
    if resume is None:
        return None
    if resume == "auto":
        runs = checkpoint.resumable_runs(cfg, [outputs_root])
        console.info(auto_resume_line(runs))
        return runs[0] if runs else None
    return run_dirs.checkpoint_file(Path(str(resume)))


def checkpoint_to_resume(cfg: DictConfig, outputs_root: Path, ranks: Ranks) -> tuple:
    """(path, checkpoint) of train.resume, or (None, None); rank 0 finds it, every rank reads it."""
    source = ranks.broadcast(resume_path(cfg, outputs_root) if ranks.is_main else None)
    saved = checkpoint.load_for_resume(source, cfg) if source is not None else None
    if saved is not None and saved["step"] >= cfg.train.steps:
        raise ConfigError(f"train.resume={source} already reached step {saved['step']} of train.steps="
                          f"{cfg.train.steps}: raise train.steps to continue it")
    return source, saved


def configured_device(cfg: DictConfig) -> torch.device:
    try:
        return resolve_device(cfg.device)
    except ValueError as error:
        raise ConfigError(str(error)) from error


def build_data(cfg: DictConfig, ranks: Ranks, device: torch.device, saved: Optional[Dict[str, Any]] = None) -> tuple:
    """(pixels, dataset, components, loader): dataset is what training reads, the train images or, with
    `latent=`, their cached latents; a builder that refuses the config is a one-line ConfigError."""
    t = cfg.train
    try:
        pixels = build_dataset(cfg)
        latent = build_latent(cfg, pixels, device, (saved or {}).get("latent"), write_cache=ranks.is_main)
        space, dataset = latent or (None, pixels)
        parts = build_components(cfg, device, dataset.image_size, dataset.channels, dataset.num_classes, space)
        loader = ResumableLoader(dataset, micro_batch_size(t.batch_size, t.grad_accum_steps), cfg.seed,
                                 hflip=dataset.hflip, num_workers=t.num_workers, device=device, rank=ranks.rank,
                                 world_size=ranks.world_size)
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error).splitlines()[0]) from error
    if space is not None:
        log.info(f"latent space: {space.describe()}; train latents {'x'.join(map(str, parts.image_shape))}, "
                 f"standardised per channel to std {space.target_std:g}")
    return pixels, dataset, parts, loader


def build(cfg: DictConfig, ranks: Ranks, device: torch.device, saved: Optional[Dict[str, Any]] = None) -> Run:
    """Data, components, EMA, optimizer step, the (DDP) forward and the FID tracker of `cfg` (`saved`: the
    checkpoint it resumes, whose latent space it must use)."""
    t = cfg.train
    pixels, dataset, parts, loader = build_data(cfg, ranks, device, saved)
    teacher = attach_teacher(cfg, parts, device)  # before the EMA copies the (maybe teacher-initialised) weights
    model = parts.model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model.to(memory_format=torch.channels_last)
    ema = EMAS.build(t.ema, model=model, train=t)
    optimizer = build_optimizer(model.parameters(), t.optimizer, t.lr, t.betas, t.weight_decay, device)
    warmup = clipped_warmup(t.warmup_steps, t.steps)
    step_fn = TrainStep(model, optimizer, device, t.precision, t.grad_clip, warmup, ema,
                       lr_schedule=t.lr_schedule, total_steps=t.steps, grad_accum_steps=t.grad_accum_steps)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if ranks.active else model
    fid = FIDTracker(cfg.eval, lambda split: pixels if split == "train" else build_dataset(cfg, split), device,
                     seed=cfg.seed, shape=parts.image_shape)
    if ranks.active:  # every rank built the same weights from cfg.seed; dropout masks must differ between ranks
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, ranks.rank]).generate_state(1)[0]))
    c, h, w = parts.image_shape
    return Run(cfg, ranks, device, dataset, parts, ema, step_fn, loader, fid,
               forward=torch.compile(net) if t.compile else net,
               noise_generator=torch.Generator(device=device).manual_seed(cfg.seed + 1),
               grid_noise=torch.randn((t.num_grid_samples, c, h, w), generator=torch.Generator().manual_seed(cfg.seed)),
               teacher=teacher, pixels=pixels)


def train(cfg: DictConfig, run_dir: Path, group: Optional[str] = None, overrides: Sequence[str] = (),
          outputs_root: Path = Path("outputs"), swept: Sequence[str] = ()) -> Dict[str, Any]:
    """Train one run into `run_dir` and return its summary (also written to summary.json).
    swept: the keys a sweep varies; their `key=value` overrides become W&B tags. Under torchrun every rank
    calls this; all use rank 0's run dir, and only rank 0 writes."""
    validate(cfg)
    with distributed.session(configured_device(cfg)) as (ranks, device):
        out = Outputs(Path(ranks.broadcast(str(run_dir))), enabled=ranks.is_main)
        source, saved = checkpoint_to_resume(cfg, outputs_root, ranks)
        out.claim(source)  # the run dir's lock: nothing is written before it, and it is released however we end
        try:
            return train_claimed(cfg, ranks, device, out, source, saved, (group, overrides, swept))
        finally:
            out.release()


def train_claimed(cfg: DictConfig, ranks: Ranks, device: torch.device, out: Outputs, source: Optional[Path],
                  saved: Optional[Dict[str, Any]], naming: tuple) -> Dict[str, Any]:
    """Build, restore, loop and finish one claimed run; naming is (group, overrides, swept)."""
    seed_everything(cfg.seed)
    run = build(cfg, ranks, device, saved)
    state = new_state(run, OmegaConf.to_container(cfg, resolve=True))
    if saved is not None:
        restore(state, saved, source, out)
    loop = Loop(run, state, out, kept=(source, state.step) if source is not None else None)
    return run_phases(loop, out, lambda: start(cfg, run, state, out, *naming),
                      lambda stop, identity: finish(run, state, loop, out, stop, identity))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Train one run; returns its objective for an optimising sweeper: best FID, else the final loss."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    group, swept = None, []
    if hc.mode == RunMode.MULTIRUN:  # one W&B group per sweep, named after what it sweeps and its dir
        sweep = Path(hc.sweep.dir)
        swept = swept_keys(sweep)
        group = sweep_group(swept, sweep)
    try:
        with refusals(Path(hc.runtime.output_dir), (ConfigError, UnknownChoiceError, DatasetNotFoundError, OSError)):
            finished = cluster.prepare(cfg, Path(hc.runtime.output_dir))  # submitit: ranks; a requeued job resumes
            summary = finished or train(cfg, Path(hc.runtime.output_dir), group=group, overrides=hc.overrides.task,
                                        outputs_root=Path(hc.runtime.cwd) / "outputs", swept=swept)
    except Diverged as error:
        fail(str(error), code=3)
    except preemption.Aborted as error:  # a second Ctrl-C
        print(error, file=sys.stderr)
        sys.exit(preemption.exit_code(signal.SIGINT))
    finally:
        if distributed.ranks_from_env()[0] != 0:  # its own dir is empty: every rank wrote into rank 0's
            with contextlib.suppress(OSError):
                Path(hc.runtime.output_dir).rmdir()
    return summary.get("best_fid") if summary.get("best_fid") is not None else summary["final_loss"]


def main() -> None:
    """Check every override before Hydra starts (one-line errors), then run (each rank under torchrun)."""
    if distributed.ranks_from_env()[0] != 0:  # Hydra writes no config or log into the other ranks' dirs
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    checked_main(hydra_main)


if __name__ == "__main__":
    # Call main() of the importable module, not of __main__: launchers that pickle the task function
    # (joblib) then pickle it by reference instead of by value.
    from diffusion_lab.train import main as importable_main

    importable_main()
