"""`python -m diffusion_lab.autoencoder`: train one KL autoencoder (conf/autoencoder.yaml) with the run machinery of
`diffusion_lab.train`: run dir and lock, train.log, metrics and W&B, atomic checkpoints, exact resume, preemption,
sweeps. It writes reconstruction grids of held-out images and summary.json with the reconstruction FID beside its
noise floor; `latent.autoencoder_run.load_autoencoder` reads the run back for latent diffusion.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("autoencoder", "autoencoder")  # --help and shell completion answer here, before torch is imported

import functools
import signal
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .config import CONF_DIR
from .config.build import build_dataset
from .config.preflight import checked_main, refusals
from .config.validation import validate
from .data.datasets import DatasetNotFoundError
from .data.loader import ResumableLoader
from .errors import ConfigError, fail
from .evaluation.plots import plot_loss
from .latent.autoencoder_run import WEIGHTS, build_autoencoder
from .registry import UnknownChoiceError
from .train import checkpoint_to_resume, configured_device, seed_everything
from .training import distributed, preemption, progress
from .training.autoencoder import (AutoencoderLoop, AutoencoderLoss, AutoencoderOutputs, AutoencoderRun,
                                   ReconstructionFID, grid_row_length, held_out_errors, recon_grid)
from .training.ema import EMA
from .training.loggers import sweep_group, swept_keys
from .training.loop import Diverged, close, final_losses, new_state, open_logger, restore, run_phases
from .training.step import TrainStep, build_optimizer, clipped_warmup, micro_batch_size, warmup_note

log = progress.log


def build_network(cfg: DictConfig, dataset, device: torch.device):
    """The configured autoencoder for the dataset's images; a config it refuses is a one-line ConfigError."""
    try:
        model = build_autoencoder(OmegaConf.to_container(cfg.autoencoder, resolve=True), dataset.channels)
        model.latent_shape(dataset.image_size)  # the image size must divide by the factor
    except (ValueError, TypeError) as error:
        raise ConfigError(str(error).splitlines()[0]) from error
    return model.to(device)


def build(cfg: DictConfig, ranks, device: torch.device) -> AutoencoderRun:
    """Data, network, EMA, optimizer step, loss, reconstruction FID and the grid's fixed held-out images."""
    t = cfg.train
    if t.ema != "standard":
        raise ConfigError(f"train.ema={t.ema}: an autoencoder run keeps train.ema=standard (snapshots and post-hoc "
                          f"EMA are for diffusion runs)")
    dataset = build_dataset(cfg)
    model = build_network(cfg, dataset, device)
    loader = ResumableLoader(dataset, micro_batch_size(t.batch_size, t.grad_accum_steps), cfg.seed,
                             hflip=dataset.hflip, num_workers=t.num_workers, device=device)
    ema = EMA(model, decay=t.ema_decay, warmup=t.ema_warmup)
    optimizer = build_optimizer(model.parameters(), t.optimizer, t.lr, t.betas, t.weight_decay, device)
    step_fn = TrainStep(model, optimizer, device, t.precision, t.grad_clip, clipped_warmup(t.warmup_steps, t.steps),
                        ema, lr_schedule=t.lr_schedule, total_steps=t.steps, grad_accum_steps=t.grad_accum_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    fid = ReconstructionFID(cfg.eval, functools.partial(build_dataset, cfg), device, seed=cfg.seed)
    held_out = build_dataset(cfg, "test")
    grid = torch.stack([held_out[i] for i in range(min(t.num_grid_samples, len(held_out)))])
    return AutoencoderRun(cfg, ranks, device, dataset, model, (dataset.channels, dataset.image_size, dataset.image_size),
                          ema, step_fn, loader, fid, AutoencoderLoss(model, cfg.autoencoder.kl_weight, generator),
                          generator, grid)


def start(cfg: DictConfig, run: AutoencoderRun, state, out: AutoencoderOutputs, group: Optional[str],
          overrides: Sequence[str], swept: Sequence[str]) -> Dict[str, Any]:
    """config.yaml, the logger and the start lines; returns the run's name, group and overrides."""
    identity = open_logger(cfg, state, out, group, overrides, swept)
    c, h, w = run.image_shape
    lc, lh, lw = run.model.latent_shape(h)
    log.info(f"diffusion_lab autoencoder | device {run.device} | {state.info['num_parameters'] / 1e6:.2f}M params | "
             f"data {cfg.data.name} {len(run.dataset)} images {c}x{h}x{w} -> latent {lc}x{lh}x{lw} | "
             f"kl_weight {cfg.autoencoder.kl_weight:g} | run dir {out.run_dir}")
    log.info(warmup_note(cfg.train))
    return identity


def final_pictures(run: AutoencoderRun, run_dir: Path) -> Dict[str, Path]:
    """loss.png and reconstructions.png (the grid's held-out images over the final EMA reconstructions)."""
    images, _ = run.sample_grid()
    grid = recon_grid(images, grid_row_length(len(run.grid_images)), run_dir / "reconstructions.png",
                      "held-out images, final EMA reconstructions")
    return {"loss": plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png"), "reconstructions": grid}


def held_out_summary(run: AutoencoderRun, step: int, stopped: bool) -> Dict[str, Any]:
    """Reconstruction FID (measured now unless this step has one, or the run was stopped) and L1/MSE on the
    held-out images."""
    fid = run.fid
    if fid.enabled and not stopped and (fid.last is None or fid.history[-1:] != [(step, fid.last.value)]):
        result, _ = fid.evaluate(run.ema.module)
        fid.history = [entry for entry in fid.history if entry[0] != step] + [(step, result.value)]
    if fid.last is not None:
        log.info(fid.line(fid.last))
    errors = held_out_errors(run.ema.module.reconstruct(fid.images), fid.images)
    return {**fid.summary(), **{f"test_{k}": v for k, v in errors.items()}, "test_n": len(fid.images)}


def summarize(run: AutoencoderRun, state, loop: AutoencoderLoop, out, identity: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json's content: the run, its size, losses, throughput, held-out reconstruction and its files."""
    c, h, _ = run.image_shape
    return {**identity, "kind": "autoencoder", "run_dir": str(out.run_dir), "device": str(run.device),
            "num_parameters": state.info["num_parameters"], "dataset": run.cfg.data.name,
            "dataset_size": len(run.dataset), "image_shape": [c, h, h], "latent_shape": list(run.model.latent_shape(h)),
            "weights": WEIGHTS, "steps": state.step, **final_losses(state.loss_history),
            "wall_time_s": state.elapsed_s, "train_images_per_s": loop.images_per_s,
            "last_grid": str(loop.grid_path) if loop.grid_path else None,
            "checkpoint": str(out.run_dir / "checkpoints" / "last.pt"), **held_out_summary(run, state.step, loop.stopped),
            "wandb": out.logger_info(), "interrupted": loop.stopped}


def finish(run: AutoencoderRun, state, loop: AutoencoderLoop, out, stop, identity: Dict[str, Any]) -> Dict[str, Any]:
    """Pictures, summary.json and the logger's summary; the closing line."""
    summary = close(out, state, loop, stop, lambda: final_pictures(run, out.run_dir),
                    lambda: summarize(run, state, loop, out, identity))
    if not loop.stopped:
        log.info(f"done: {state.step} steps in {summary['wall_time_s']:.0f}s, final loss {summary['final_loss']:.4f}, "
                 f"held-out recon L1 {summary['test_recon_l1']:.4f}, run dir {out.run_dir}")
    return summary


def train_autoencoder(cfg: DictConfig, run_dir: Path, group: Optional[str] = None, overrides: Sequence[str] = (),
                      outputs_root: Path = Path("outputs"), swept: Sequence[str] = ()) -> Dict[str, Any]:
    """Train one autoencoder into `run_dir` and return its summary (also written to summary.json). One process:
    data parallelism is not supported (the posterior noise is not sharded)."""
    validate(cfg)
    with distributed.session(configured_device(cfg)) as (ranks, device):
        if ranks.active:
            raise ConfigError("diffusion_lab.autoencoder runs in one process; start it without torchrun")
        out = AutoencoderOutputs(Path(run_dir))
        source, saved = checkpoint_to_resume(cfg, outputs_root, ranks)
        out.claim(source)
        try:
            return train_claimed(cfg, ranks, device, out, source, saved, (group, overrides, swept))
        finally:
            out.release()


def train_claimed(cfg: DictConfig, ranks, device: torch.device, out: AutoencoderOutputs, source: Optional[Path],
                  saved: Optional[Dict[str, Any]], naming: tuple) -> Dict[str, Any]:
    """Build, restore, loop and finish one claimed run; naming is (group, overrides, swept)."""
    seed_everything(cfg.seed)
    run = build(cfg, ranks, device)
    state = new_state(run, OmegaConf.to_container(cfg, resolve=True))
    state.info["latent_shape"] = list(run.model.latent_shape(run.image_shape[1]))
    if saved is not None:
        restore(state, saved, source, out)
    loop = AutoencoderLoop(run, state, out, kept=(source, state.step) if source is not None else None)
    return run_phases(loop, out, lambda: start(cfg, run, state, out, *naming),
                      lambda stop, identity: finish(run, state, loop, out, stop, identity))


@hydra.main(config_path=str(CONF_DIR), config_name="autoencoder", version_base="1.3")
def hydra_main(cfg: DictConfig) -> Optional[float]:
    """Train one autoencoder; returns its objective for an optimising sweeper: the reconstruction FID, else the loss."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    group, swept = None, []
    if hc.mode == RunMode.MULTIRUN:
        swept = swept_keys(Path(hc.sweep.dir))
        group = sweep_group(swept, Path(hc.sweep.dir))
    try:
        with refusals(Path(hc.runtime.output_dir), (ConfigError, UnknownChoiceError, DatasetNotFoundError, OSError)):
            summary = train_autoencoder(cfg, Path(hc.runtime.output_dir), group=group, overrides=hc.overrides.task,
                                        outputs_root=Path(hc.runtime.cwd) / "outputs", swept=swept)
    except Diverged as error:
        fail(str(error), code=3)
    except preemption.Aborted as error:
        print(error, file=sys.stderr)
        sys.exit(preemption.exit_code(signal.SIGINT))
    return summary["recon_fid"] if summary.get("recon_fid") is not None else summary["final_loss"]


def main() -> None:
    """Check every override before Hydra starts (one-line errors), then run."""
    checked_main(hydra_main, config_name="autoencoder")


if __name__ == "__main__":
    from diffusion_lab.autoencoder import main as importable_main  # by reference for pickling launchers

    importable_main()
