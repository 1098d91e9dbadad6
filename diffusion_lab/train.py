"""`python -m diffusion_lab.train`: config -> registry builds -> training loop -> logs, checkpoints, pictures.

The loop only talks to interfaces: `schedule.add_noise`, `objective.loss`, `sampler(...)`; it does not know
which schedule, objective, sampler or model it holds.
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint, preemption, progress, run_dir as run_dirs
from .build import build_components, build_dataset, params, resolve_device
from .conditioning import balanced_labels, class_grid, training_labels
from .config import CONF_DIR, HYDRA_FLAGS, ConfigError, check_overrides, error_line, fail, validate
from .data import DatasetNotFoundError, ResumableLoader, save_grid
from .ema import EMA
from .fid_tracker import FIDTracker
from .loggers import LOGGERS, sweep_group, sweep_tags, swept_keys
from .models import count_parameters
from .optim import TrainStep, build_optimizer
from .plots import denoising_trajectory, forward_diffusion, plot_curves, plot_loss
from .registry import SCHEDULES, UnknownChoiceError
from .samplers import Trajectory, num_evaluations

log = progress.log


class Diverged(RuntimeError):
    """max_bad_steps consecutive non-finite steps; the message says which checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_path(cfg: DictConfig, outputs_root: Path) -> Optional[Path]:
    resume = cfg.train.resume
    if resume is None:
        return None
    if resume == "auto":
        found = checkpoint.find_resumable(cfg, [outputs_root])
        print(f"resume=auto: {'continuing ' + str(found) if found else 'no matching run found; starting fresh'}")
        return found
    return run_dirs.checkpoint_file(Path(str(resume)))


def diverged_message(bad_steps: int, step: int, kept: Optional[tuple]) -> str:
    """One true line about a diverged run: how many steps failed and which checkpoint is kept."""
    where = (f"the last checkpoint is {kept[0]} (step {kept[1]}, finite weights)" if kept
             else "no checkpoint was written before it")
    return (f"training diverged: {bad_steps} consecutive steps up to step {step} had a non-finite loss or "
            f"gradient (their updates were skipped); {where}; lower train.lr or raise train.max_bad_steps")


def carry_metrics(previous_run: Path, run_dir: Path, up_to_step: int) -> None:
    """The earlier run's metrics up to the checkpoint step, so the curve continues without duplicated steps
    (also when resuming in the same dir, where lines after the checkpoint are dropped)."""
    source = previous_run / "metrics.jsonl"
    if not source.is_file():
        return
    lines = [line for line in source.read_text().splitlines() if line and json.loads(line)["step"] <= up_to_step]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def write_pictures(cfg: DictConfig, dataset, parts, sample_model: torch.nn.Module, x_T: torch.Tensor,
                   run_dir: Path) -> Dict[str, Path]:
    """forward_diffusion.png (linear vs cosine on the same images) and trajectory.png (x_t, x0_pred)."""
    T = parts.schedule.num_timesteps
    schedules = {name: SCHEDULES.build(name, noise_steps=T) for name in ("linear", "cosine")}
    x0 = torch.stack([dataset[i] for i in range(3)])
    strip = forward_diffusion(x0, schedules, sorted({0, T // 20, T // 10, T // 5, 2 * T // 5, 7 * T // 10, T - 1}),
                              run_dir / "forward_diffusion.png", seed=cfg.seed)
    nfe = num_evaluations(cfg.sampler.name, params(cfg.sampler), T)
    trajectory = Trajectory(at=np.linspace(0, nfe - 1, min(nfe, 8)).round().astype(int).tolist())
    parts.sampler(sample_model, parts.schedule, parts.objective, x_T,
                  generator=torch.Generator(device=x_T.device).manual_seed(cfg.seed), callback=trajectory)
    return {"forward_diffusion": strip, "trajectory": denoising_trajectory(trajectory, run_dir / "trajectory.png")}


def train(cfg: DictConfig, run_dir: Path, group: Optional[str] = None, overrides: Sequence[str] = (),
          outputs_root: Path = Path("outputs"), swept: Sequence[str] = ()) -> Dict[str, Any]:
    """Train one run into `run_dir` and return its summary (also written to summary.json).
    swept: the keys a sweep varies; their `key=value` overrides become W&B tags."""
    validate(cfg)
    run_dir = Path(run_dir)
    source = resume_path(cfg, outputs_root)
    state = checkpoint.load_for_resume(source, cfg) if source is not None else None
    if state is not None and state["step"] >= cfg.train.steps:
        raise ConfigError(f"train.resume={source} already reached step {state['step']} of train.steps="
                          f"{cfg.train.steps}: raise train.steps to continue it")
    run_dirs.claim(run_dir, source)
    progress.log_to(run_dir)
    seed_everything(cfg.seed)
    t = cfg.train
    try:
        device = resolve_device(cfg.device)
        dataset = build_dataset(cfg)
        parts = build_components(cfg, device, dataset.image_size, dataset.channels, dataset.num_classes)
        loader = ResumableLoader(dataset, t.batch_size, cfg.seed, hflip=dataset.hflip,
                                 num_workers=t.num_workers, device=device)
    except (ValueError, TypeError) as error:  # a builder refused the config: say it in one line
        raise ConfigError(str(error).splitlines()[0]) from error
    model, schedule, objective = parts.model, parts.schedule, parts.objective
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, decay=t.ema_decay, warmup=t.ema_warmup)
    optimizer = build_optimizer(model.parameters(), t.optimizer, t.lr, t.betas, t.weight_decay, device)
    step_fn = TrainStep(model, optimizer, device, t.precision, t.grad_clip, t.warmup_steps, ema)
    forward = torch.compile(model) if t.compile else model
    noise_generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    fid = FIDTracker(cfg.eval, lambda split: dataset if split == "train" else build_dataset(cfg, split), device,
                     seed=cfg.seed)

    step, elapsed_before, run_id, loss_history = 0, 0.0, None, []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            step_fn.load_state_dict(state["train_step"])
            loader.load_state_dict(state["data"])
            noise_generator.set_state(state["rng"]["noise_generator"].cpu())
            checkpoint.set_rng_states(state["rng"])
            fid.load_state_dict(state["fid"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # a hand-made or foreign file
            raise checkpoint.CheckpointError(f"cannot resume from {source}: {error_line(error)}") from error
        step, elapsed_before = state["step"], state["elapsed_s"]
        run_id, loss_history = state.get("wandb_run_id"), state["loss_history"]
        carry_metrics(source.parent.parent, run_dir, step)
        log.info(f"resumed from {source} at step {step}")

    config = OmegaConf.to_container(cfg, resolve=True)
    OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    name = cfg.run_name or ",".join(overrides) or "default"
    logger_params = params(cfg.logger)
    group = logger_params.pop("group", None) or group
    logger_params["tags"] = [*(logger_params.get("tags") or []), *sweep_tags(swept, overrides)]
    logger = LOGGERS.build(cfg.logger.name, run_dir=run_dir, config=config, name=name, group=group,
                           run_id=run_id, job_type="train", **logger_params)
    n_params = count_parameters(model)
    c, h, w = parts.image_shape
    log.info(f"diffusion_lab | device {device} | model {cfg.model.name} {n_params / 1e6:.2f}M params | "
          f"data {cfg.data.name} {len(dataset)} images {c}x{h}x{w} | run dir {run_dir}")

    grid_noise = torch.randn((t.num_grid_samples, c, h, w), generator=torch.Generator().manual_seed(cfg.seed))
    grid_dir = run_dir / "samples"
    grid_dir.mkdir(exist_ok=True)
    batches = iter(loader)

    def loss_fn() -> torch.Tensor:
        x0, y = next(batches)
        t_batch = schedule.sample_timesteps(x0.shape[0], device, noise_generator)
        eps = torch.randn(x0.shape, generator=noise_generator, device=device)
        x_t, _ = schedule.add_noise(x0, t_batch, eps)
        cond = training_labels(model, y, t.cond_drop_prob, noise_generator)  # {} unconditional, else {"y": ...}
        return objective.loss(forward(x_t, t_batch, **cond), x0, eps, schedule, t_batch)

    def generate(x_T: torch.Tensor, seed: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = balanced_labels(model, x_T.shape[0], device) if y is None else y  # None for an unconditional model
        return parts.sampler(ema.module, schedule, objective, x_T.to(device), y=y,
                             generator=torch.Generator(device=device).manual_seed(seed))

    def save_state(path: Path) -> tuple:
        checkpoint.save(path, {
            "step": step, "model": model.state_dict(), "train_step": step_fn.state_dict(),
            "data": loader.state_dict(), "fid": fid.state_dict(), "loss_history": loss_history,
            "rng": {**checkpoint.rng_states(), "noise_generator": noise_generator.get_state()},
            "elapsed_s": elapsed_before + (time.perf_counter() - started), "config": config,
            "wandb_run_id": logger.run_id, "num_parameters": n_params, "image_shape": parts.image_shape,
            "dataset_name": dataset.name,
        })
        return path, step

    def sample_grid() -> Path:
        path = grid_dir / f"step_{step:07d}.png"
        labels, per_class = class_grid(model, len(grid_noise), device)  # one row per class when conditional
        noise = grid_noise if labels is None else grid_noise[:len(labels)]
        save_grid(generate(noise, cfg.seed, labels), path, nrow=per_class)
        logger.log_images({"samples": path}, step)
        return path

    started = time.perf_counter()
    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "seconds": 0.0}  # seconds: training steps only
    first_step, train_seconds = step, 0.0
    grid_path, bad_steps = None, 0
    kept = (source, step) if source is not None else None  # the newest checkpoint of this run: (path, step)
    try:
        with preemption.Preemption() as stop, progress.Progress(t.steps, step) as bar:
            while step < t.steps and not stop.requested:
                step_started = time.perf_counter()
                loss, grad_norm = step_fn(loss_fn)
                window["seconds"] += time.perf_counter() - step_started
                step += 1
                bad_steps = bad_steps + 1 if step_fn.skipped else 0
                if bad_steps:
                    log.warning(f"step {step}: loss {loss}, grad norm {grad_norm}: update skipped "
                               f"({bad_steps}/{t.max_bad_steps} in a row)")
                    if bad_steps >= t.max_bad_steps:
                        raise Diverged(diverged_message(bad_steps, step, kept))
                else:
                    window["loss"] += loss
                    window["grad_norm"] += grad_norm
                    window["n"] += 1
                last = step == t.steps
                if (step % t.log_every == 0 or last) and window["n"]:
                    mean_loss = window["loss"] / window["n"]
                    images_per_s = window["n"] * t.batch_size / window["seconds"]
                    train_seconds += window["seconds"]
                    loss_history.append((step, mean_loss))
                    logger.log({"loss": mean_loss, "lr": step_fn.lr, "grad_norm": window["grad_norm"] / window["n"],
                                "images_per_s": images_per_s, "epoch": step * t.batch_size / len(dataset)}, step)
                    bar.report(step, mean_loss, step_fn.lr, images_per_s)
                    window = {"loss": 0.0, "grad_norm": 0.0, "n": 0, "seconds": 0.0}
                checkpoint_due = (t.checkpoint_every and step % t.checkpoint_every == 0) or last
                if checkpoint_due:  # before the sample grid and FID, which can fail
                    kept = save_state(run_dir / "checkpoints" / "last.pt")
                if (t.sample_every and step % t.sample_every == 0) or last:
                    grid_path = sample_grid()
                if fid.due(step) or (last and fid.enabled):
                    result = fid.evaluate(generate)
                    log.info(f"step {step}: {result}")
                    logger.log({"fid": result.value, "fid_floor": result.floor, **result.scores}, step)
                    if fid.record(step, result):
                        save_state(run_dir / "checkpoints" / "best.pt")
                    if checkpoint_due:  # again, now holding this step's FID
                        save_state(run_dir / "checkpoints" / "last.pt")
                bar.update()
            if stop.requested:
                kept = save_state(run_dir / "checkpoints" / "last.pt")
    except BaseException:
        logger.finish(exit_code=1)
        raise

    wall = elapsed_before + time.perf_counter() - started
    pictures = {"loss": plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png"),
                **write_pictures(cfg, dataset, parts, ema.module, grid_noise[:4].to(device), run_dir)}
    if fid.history:
        pictures["fid"] = plot_curves({name: [{"step": s, "fid": v} for s, v in fid.history]}, "fid",
                                      run_dir / "fid.png", fid.label or "FID", floors=fid.floors())
    logger.log_images(pictures, step)
    losses = [loss for _, loss in loss_history[-4:]]
    summary = {
        "name": name, "group": group, "overrides": list(overrides), "run_dir": str(run_dir),
        "device": str(device), "num_parameters": n_params, "dataset": cfg.data.name, "dataset_size": len(dataset),
        "steps": step, "final_loss": sum(losses) / len(losses) if losses else None, "wall_time_s": wall,
        "train_images_per_s": (step - first_step) * t.batch_size / (train_seconds + window["seconds"])
        if step > first_step else None,
        "last_grid": str(grid_path) if grid_path else None, "checkpoint": str(run_dir / "checkpoints" / "last.pt"),
        **fid.summary(), "wandb": logger.info(), "interrupted": stop.requested,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.summarize({k: summary[k] for k in ("final_loss", "best_fid", "final_fid", "fid_floor", "fid_floor_n",
                                              "fid_label", "train_images_per_s", "wall_time_s") if k in summary})
    if not stop.requested:
        logger.log_checkpoint(run_dir / "checkpoints" / "last.pt")
    logger.finish(exit_code=preemption.exit_code(stop.signum) if stop.requested else 0)
    if stop.requested:
        log.info(f"stopped by {stop.name} at step {step}: wrote {kept[0]}; continue with train.resume=auto "
              f"or train.resume={kept[0]}")
        stop.exit()
    log.info(f"done: {step} steps in {wall:.0f}s, final loss {summary['final_loss']:.4f}, run dir {run_dir}")
    return summary


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
        summary = train(cfg, Path(hc.runtime.output_dir), group=group, overrides=hc.overrides.task,
              outputs_root=Path(hc.runtime.cwd) / "outputs", swept=swept)
    except (ConfigError, UnknownChoiceError, DatasetNotFoundError, OSError) as error:
        fail(error_line(error))
    except Diverged as error:
        fail(str(error), code=3)
    return summary.get("best_fid") if summary.get("best_fid") is not None else summary["final_loss"]


def main() -> None:
    """Check every override before Hydra starts (one-line errors), then run."""
    if not HYDRA_FLAGS.intersection(sys.argv[1:]):
        check_overrides(sys.argv[1:])
    hydra_main()


if __name__ == "__main__":
    # Call main() of the importable module, not of __main__: launchers that pickle the task function
    # (joblib) then pickle it by reference instead of by value.
    from diffusion_lab.train import main as importable_main

    importable_main()
