"""The training loop and the phases around it: what a run is made of (`Run`), restoring a checkpoint into it,
the steps with their log points, checkpoints, sample grids and FID (`Loop`), and the run's last pictures and
summary (`finish`).

The loop only talks to interfaces: `loss.sample_t` and `loss(...)`, `sampler(...)`; it draws and shards the
noise and does not know which process, objective, sampler or model it holds. Every write goes through `Outputs` (rank 0 only).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.loader import ResumableLoader
from ..diffusion import grids
from ..diffusion.conditioning import balanced_labels, class_grid, training_labels
from ..diffusion.objectives import Objective
from ..diffusion.samplers import Trajectory, num_evaluations
from ..diffusion.schedules import NoiseSchedule
from ..errors import error_line
from ..evaluation.plots import (curves_per_size, denoising_trajectory, fid_title, forward_diffusion, plot_curves,
                                plot_loss)
from ..evaluation.tracker import FIDTracker
from ..models import count_parameters
from ..registry import SCHEDULES
from . import checkpoint, preemption, progress
from .distributed import Ranks
from .ema import EMA
from .loggers import sweep_tags
from .outputs import Outputs, run_name
from .run_state import RunState
from .step import TrainStep, warmup_note

log = progress.log

@dataclass
class Components:
    """Everything a run is made of, built from the config."""

    model: torch.nn.Module
    schedule: NoiseSchedule
    objective: Objective
    sampler: Callable[..., torch.Tensor]
    image_shape: tuple  # (channels, image_size, image_size)
    loss: Any  # the training recipe: losses.DiffusionLoss or consistency.ConsistencyLoss
    latent: Any = None  # the latent space it diffuses in (latent.space.LatentSpace); None: pixels

    def sample(self, net: torch.nn.Module, x_T: torch.Tensor, **runtime: Any) -> torch.Tensor:
        """The configured sampler on ``net`` (seen in the process's coordinates) from unit noise x_T (latents
        when the run diffuses in a latent space: never clipped to [-1, 1])."""
        options = {**(self.latent.sampler_options if self.latent else {}), **runtime}
        return self.sampler(self.objective.network(net, self.schedule), self.schedule, self.objective, x_T, **options)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images of what the process holds: decoded latents, or x itself in pixel space."""
        return x if self.latent is None else self.latent.decode(x)


class Diverged(RuntimeError):
    """max_bad_steps consecutive non-finite steps; the message says which checkpoint is kept."""


def diverged_message(bad_steps: int, step: int, kept: Optional[tuple]) -> str:
    """One true line about a diverged run: how many steps failed and which checkpoint is kept."""
    where = (f"the last checkpoint is {kept[0]} (step {kept[1]}, finite weights)" if kept
             else "no checkpoint was written before it")
    return (f"training diverged: {bad_steps} consecutive steps up to step {step} had a non-finite loss or "
            f"gradient (their updates were skipped); {where}; lower train.lr or raise train.max_bad_steps")


@dataclass
class Run:
    """What a run is made of, built once from the config (what changes while it trains is its RunState)."""

    cfg: DictConfig
    ranks: Ranks
    device: torch.device
    dataset: Any
    parts: Components
    ema: EMA
    step_fn: TrainStep
    loader: ResumableLoader
    fid: FIDTracker
    forward: Callable[..., torch.Tensor]  # the model as the loss calls it: DDP-wrapped and/or compiled
    noise_generator: torch.Generator  # timesteps and noise, the same on every rank
    grid_noise: torch.Tensor  # fixed starting noise of the sample grids, so they compare over time
    teacher: Optional[Dict[str, Any]] = None  # the run a consistency model was distilled or tuned from
    pixels: Any = None  # the train split's images when `dataset` holds their latents

    def loss(self, batch: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        """The objective's loss on this rank's part of the batch (images, labels). Timesteps, noise and label
        dropout are drawn for the whole global batch and sliced, so N ranks train exactly as one process on the
        combined batch."""
        (x0, y), loss, ranks = batch, self.parts.loss, self.ranks
        n = x0.shape[0] * ranks.world_size
        t = ranks.shard(loss.sample_t(n, self.device, self.noise_generator))
        eps = ranks.shard(torch.randn((n, *x0.shape[1:]), generator=self.noise_generator, device=self.device))
        cond = training_labels(self.parts.model, y, self.cfg.train.cond_drop_prob, self.noise_generator, ranks)
        model = self.parts.objective.network(self.forward, self.parts.schedule)
        return loss(model, x0, t, eps, **cond)  # cond: {} or {"y"}

    def generate(self, x_T: torch.Tensor, seed: int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Samples of the EMA model from x_T with the configured sampler (a conditional model: labels y, by
        default every class in turn)."""
        y = balanced_labels(self.parts.model, x_T.shape[0], self.device) if y is None else y
        return self.parts.to_pixels(self.parts.sample(self.ema.module, x_T.to(self.device), y=y,
                                                      generator=torch.Generator(device=self.device).manual_seed(seed)))

    def sample_grid(self) -> Tuple[torch.Tensor, Optional[int]]:
        """(images, per row) of the sample grid from the fixed grid noise: one row per class when conditional."""
        labels, per_class = class_grid(self.parts.model, len(self.grid_noise), self.device)
        noise = self.grid_noise if labels is None else self.grid_noise[:len(labels)]
        return self.generate(noise, self.cfg.seed, labels), per_class


def new_state(run: Run, config: Dict[str, Any]) -> RunState:
    return RunState(run.parts.model, run.step_fn, run.loader, run.fid, run.noise_generator, run.ranks,
                    info={"config": config, "num_parameters": count_parameters(run.parts.model),
                          "image_shape": run.parts.image_shape, "dataset_name": run.dataset.name,
                          **({"latent": run.parts.latent.state()} if run.parts.latent else {})})


# ------------------------------------------------------------------------------------------------
# Restore


def restore(state: RunState, saved: Dict[str, Any], source: Path, out: Outputs) -> None:
    """Continue from checkpoint `saved` (read from `source`): state, and the metrics up to its step."""
    try:
        state.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError) as error:  # a hand-made or foreign file
        raise checkpoint.CheckpointError(f"cannot resume from {source}: {error_line(error)}") from error
    out.carry_metrics(source.parent.parent, state.step)
    out.carry_snapshots(source.parent.parent, state.step)
    log.info(f"resumed from {source} at step {state.step}")


# ------------------------------------------------------------------------------------------------
# Loop and evaluate


@dataclass
class Window:
    """Sums over the steps since the last log point (seconds: training steps only)."""

    loss: float = 0.0
    grad_norm: float = 0.0
    n: int = 0
    seconds: float = 0.0


class Loop:
    """The training loop: steps, and at their rhythm log points, checkpoints, sample grids and FID."""

    def __init__(self, run: Run, state: RunState, out: Outputs, kept: Optional[tuple]):
        self.run, self.state, self.out, self.t = run, state, out, run.cfg.train
        self.kept = kept  # the newest checkpoint of this run: (path, step)
        self.window, self.bad_steps, self.train_seconds = Window(), 0, 0.0
        self.first_step, self.grid_path, self.stopped = state.step, None, False
        self.stop = preemption.Preemption()  # the run's signal handler (run_steps)

    def run_steps(self, stop: preemption.Preemption) -> None:
        """Train up to train.steps or a stop signal (on any rank). A signal after the last step (during its grid
        or FID) does not make a finished run a stopped one: `stopped` is False, there is nothing to resume."""
        self.stop, batches = stop, iter(self.run.loader)
        with progress.Progress(self.t.steps, self.state.step) as bar:
            self.state.started = time.perf_counter()
            while self.state.step < self.t.steps and not self.run.ranks.any(stop.requested):
                self.step(batches)
                self.after_step(bar)
                bar.update()
            self.stopped = self.state.step < self.t.steps and self.run.ranks.any(stop.requested)
            if self.stopped:
                self.save_last()

    def step(self, batches) -> None:
        """One optimizer step; a run of max_bad_steps skipped (non-finite) steps raises Diverged."""
        started = time.perf_counter()
        self.run.parts.loss.set_progress(self.state.step, self.t.steps)  # a consistency curriculum moves with it
        loss, grad_norm = self.run.step_fn(lambda: self.run.loss(next(batches)))
        self.window.seconds += time.perf_counter() - started
        self.state.step += 1
        self.bad_steps = self.bad_steps + 1 if self.run.step_fn.skipped else 0
        if self.bad_steps:
            log.warning(f"step {self.state.step}: loss {loss}, grad norm {grad_norm}: update skipped "
                        f"({self.bad_steps}/{self.t.max_bad_steps} in a row)")
            if self.bad_steps >= self.t.max_bad_steps:
                raise Diverged(diverged_message(self.bad_steps, self.state.step, self.kept))
        else:
            self.window.loss += loss
            self.window.grad_norm += grad_norm
            self.window.n += 1

    def after_step(self, bar: progress.Progress) -> None:
        """Log point, EMA snapshot, checkpoint, sample grid and FID when due. Every grid and FID comes after this
        step's last.pt, so one that fails, or a stop signal during one, loses no step."""
        t, step, fid = self.t, self.state.step, self.run.fid
        last = step == t.steps
        if (step % t.log_every == 0 or last) and self.window.n:
            self.log_point(bar)
        grid_due = bool(t.sample_every and step % t.sample_every == 0) or last
        fid_due = fid.due(step) or (last and fid.enabled)
        if self.run.ema.snapshots and (step % t.ema_snapshot_every == 0 or last):
            self.out.ema_snapshot(step, self.run.ema, t.ema_snapshot_dtype)  # before last.pt: a resume never lacks it
        if grid_due or fid_due or bool(t.checkpoint_every and step % t.checkpoint_every == 0) or last:
            self.save_last()
        if grid_due:
            self.grid_path = self.out.grid(step, self.run.sample_grid)
        if fid_due:
            self.evaluate()

    def log_point(self, bar: progress.Progress) -> None:
        """Mean loss over the window (and over the ranks), learning rate, grad norm and throughput."""
        w, t, step, lr = self.window, self.t, self.state.step, self.run.step_fn.last_lr
        mean_loss = self.run.ranks.mean(w.loss / w.n)
        images_per_s = w.n * t.batch_size / w.seconds
        self.train_seconds += w.seconds
        self.state.loss_history.append((step, mean_loss))
        self.out.log({"loss": mean_loss, "lr": lr, "grad_norm": w.grad_norm / w.n, "images_per_s": images_per_s,
                      "epoch": step * t.batch_size / len(self.run.dataset)}, step)
        bar.report(step, mean_loss, lr, images_per_s)
        self.window = Window()

    def evaluate(self) -> None:
        """FID of the EMA model (generation split over the ranks); best.pt when it is the best so far. A stop
        signal ends it between two batches: this step then has no FID, and its last.pt is already written."""
        fid, step, stop = self.run.fid, self.state.step, self.stop
        result = fid.evaluate(self.run.generate, self.run.ranks, stop=lambda: stop.requested)
        if result is None:
            log.info(f"step {step}: FID not measured: {stop.name or 'another rank'} arrived during it; "
                     f"{self.kept[0]} holds step {step}")
            return
        log.info(f"step {step}: {result}")
        self.out.log(result.metrics(), step)  # fid, kid, kid_std, precision, recall, their floors, classifier scores
        if fid.record(step, result):
            self.save("best.pt")
        self.kept = self.save("last.pt")  # again, now holding this step's FID

    def save_last(self) -> None:
        """last.pt at this step, unless it is already on disk."""
        if self.kept != (self.out.run_dir / "checkpoints" / "last.pt", self.state.step):
            self.kept = self.save("last.pt")

    def save(self, name: str) -> tuple:
        """Write checkpoints/`name` (rank 0), whole even if a second Ctrl-C comes meanwhile; returns (path, step)."""
        with self.stop.shielded(f"checkpoints/{name}"):
            return self.out.checkpoint(name, self.state.state_dict()), self.state.step

    @property
    def images_per_s(self) -> Optional[float]:
        done = self.state.step - self.first_step
        return done * self.t.batch_size / (self.train_seconds + self.window.seconds) if done else None


# ------------------------------------------------------------------------------------------------
# Finish


def sampler_options(cfg: DictConfig) -> Dict[str, Any]:
    """The configured sampler's options (its config node without `name`)."""
    options = OmegaConf.to_container(cfg.sampler, resolve=True)
    options.pop("name", None)
    return options


def write_pictures(cfg: DictConfig, dataset, parts, sample_model: torch.nn.Module, x_T: torch.Tensor,
                   run_dir: Path) -> Dict[str, Path]:
    """forward_diffusion.png (linear vs cosine on the same images) and trajectory.png (x_t, x0_pred)."""
    process = parts.schedule
    if process.discrete:
        T = process.num_timesteps
        schedules = {name: SCHEDULES.build(name, noise_steps=T) for name in ("linear", "cosine")}
        times = sorted({0, T // 20, T // 10, T // 5, 2 * T // 5, 7 * T // 10, T - 1})
    else:
        schedules = {process.name: process}
        times = [float(f"{t:.3g}") for t in sorted(grids.logsnr(process, 7).tolist())]  # even steps in logSNR
    x0 = torch.stack([dataset[i] for i in range(3)])
    strip = forward_diffusion(x0, schedules, times, run_dir / "forward_diffusion.png", seed=cfg.seed,
                              view=lambda x: parts.to_pixels(x.to(x_T.device)))
    nfe = num_evaluations(cfg.sampler.name, sampler_options(cfg), process)
    trajectory = Trajectory(at=np.linspace(0, nfe - 1, min(nfe, 8)).round().astype(int).tolist())
    parts.sample(sample_model, x_T,
                  generator=torch.Generator(device=x_T.device).manual_seed(cfg.seed), callback=trajectory)
    scale = process.input_scale(torch.tensor(trajectory.timesteps, dtype=torch.float64))  # as the network sees x_t
    if scale is not None:
        trajectory.x_t = [x * float(c) for x, c in zip(trajectory.x_t, scale)]
    trajectory.x_t, trajectory.x0_pred = ([parts.to_pixels(x.to(x_T.device)).cpu() for x in xs]
                                          for xs in (trajectory.x_t, trajectory.x0_pred))
    return {"forward_diffusion": strip, "trajectory": denoising_trajectory(trajectory, run_dir / "trajectory.png")}


def final_pictures(run: Run, run_dir: Path, name: str) -> Dict[str, Path]:
    """loss.png, forward_diffusion.png, trajectory.png and fid.png (when FID ran)."""
    pictures = {"loss": plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png"),
                **write_pictures(run.cfg, run.dataset, run.parts, run.ema.module, run.grid_noise[:4].to(run.device),
                                 run_dir)}
    fid = run.fid
    if fid.history:
        pictures["fid"] = plot_curves(curves_per_size(fid.history, fid.sizes, name), "fid", run_dir / "fid.png",
                                      fid_title(fid.label, fid.sizes), floors=fid.floors())
    return pictures


def final_losses(history: Sequence[Tuple[int, float]], window: int = 4) -> Dict[str, Optional[float]]:
    """final_loss: the loss logged at the last log point (what the console's last line shows);
    final_loss_smoothed: the mean of the last `window` log points (less noisy, but not the last step's)."""
    last = [loss for _, loss in history[-window:]]
    return {"final_loss": last[-1] if last else None,
            "final_loss_smoothed": sum(last) / len(last) if last else None}


def summarize(run: Run, state: RunState, loop: Loop, out: Outputs, identity: Dict[str, Any]) -> Dict[str, Any]:
    """summary.json's content: the run, its size, loss, throughput, FID and where its files are."""
    return {
        **identity, "run_dir": str(out.run_dir), "device": str(run.device), "world_size": run.ranks.world_size,
        "num_parameters": state.info["num_parameters"], "dataset": run.cfg.data.name,
        "dataset_size": len(run.dataset), "steps": state.step,
        **final_losses(state.loss_history), "wall_time_s": state.elapsed_s,
        "train_images_per_s": loop.images_per_s, "last_grid": str(loop.grid_path) if loop.grid_path else None,
        "checkpoint": str(out.run_dir / "checkpoints" / "last.pt"), **run.fid.summary(),
        "wandb": out.logger_info(), "interrupted": loop.stopped,
        **({"teacher": run.teacher} if run.teacher else {}),
    }


def close(out: Outputs, state: RunState, loop: Loop, stop: preemption.Preemption,
          pictures: Callable[[], Dict[str, Path]], summarize_run: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """The end of any run: its pictures, summary.json, the logger's summary and exit code, and for a stopped run
    the line that says how to continue it; returns the summary."""
    out.pictures(pictures, state.step)
    summary = summarize_run()
    out.summary(summary, upload_checkpoint=not loop.stopped)
    out.finish(exit_code=preemption.exit_code(stop.signum) if loop.stopped and stop.requested else 0)
    if loop.stopped:
        log.info(f"stopped by {stop.name or 'another rank'} at step {state.step}: wrote {loop.kept[0]}; continue "
                 f"with train.resume=auto or train.resume={loop.kept[0]}")
    return summary


def finish(run: Run, state: RunState, loop: Loop, out: Outputs, stop: preemption.Preemption,
           identity: Dict[str, Any]) -> Dict[str, Any]:
    """Pictures, summary.json and the logger's summary (a signal meanwhile waits for them). A stopped run then
    exits with 128 + signal (`stop.exit()`, by the caller once the handler is gone); a finished one with 0."""
    summary = close(out, state, loop, stop, lambda: final_pictures(run, out.run_dir, identity["name"]),
                    lambda: summarize(run, state, loop, out, identity))
    if loop.stopped:
        return summary
    log.info(f"done: {state.step} steps in {summary['wall_time_s']:.0f}s, final loss {summary['final_loss']:.4f}, "
             f"run dir {out.run_dir}" + (f" ({stop.name} arrived after the last step: the run is finished, "
                                         "there is nothing to resume)" if stop.requested else ""))
    return summary


# ------------------------------------------------------------------------------------------------
# The run


def open_logger(cfg: DictConfig, state: RunState, out: Outputs, group: Optional[str], overrides: Sequence[str],
                swept: Sequence[str]) -> Dict[str, Any]:
    """config.yaml and the logger (W&B continues the checkpoint's run); returns the run's name, group and overrides."""
    logger_params = OmegaConf.to_container(cfg.logger, resolve=True)
    logger_params.pop("name", None)
    group = logger_params.pop("group", None) or group
    logger_params["tags"] = [*(logger_params.get("tags") or []), *sweep_tags(swept, overrides)]
    name = run_name(cfg, overrides)
    out.open_logger(state.info["config"], cfg.logger.name, state.wandb_run_id, name=name, group=group, **logger_params)
    state.wandb_run_id = out.run_id
    return {"name": name, "group": group, "overrides": list(overrides)}


def run_phases(loop: Loop, out: Outputs, start: Callable[[], Dict[str, Any]],
               finish: Callable[[preemption.Preemption, Dict[str, Any]], Dict[str, Any]]) -> Dict[str, Any]:
    """start(), the steps and finish(stop, identity) of a claimed run under one signal handler: a failure marks the
    logger's run failed; a stopped run then exits with the launcher's handler, else 128 + signal."""
    with preemption.Preemption() as stop:  # steps, grids, FID, pictures and summary
        try:
            identity = start()
            loop.run_steps(stop)
        except BaseException:
            out.finish(exit_code=1)
            raise
        summary = finish(stop, identity)
    if loop.stopped and stop.requested:
        stop.exit()
    return summary


def start(cfg: DictConfig, run: Run, state: RunState, out: Outputs, group: Optional[str],
          overrides: Sequence[str], swept: Sequence[str]) -> Dict[str, Any]:
    """config.yaml, the logger and the start lines (the run, its learning rate); returns the run's name, group and overrides."""
    identity = open_logger(cfg, state, out, group, overrides, swept)
    c, h, w = run.parts.image_shape
    log.info(f"diffusion_lab | device {run.device} | world size {run.ranks.world_size} | model {cfg.model.name} "
             f"{state.info['num_parameters'] / 1e6:.2f}M params | data {cfg.data.name} {len(run.dataset)} images "
             f"{c}x{h}x{w} | run dir {out.run_dir}")
    log.info(warmup_note(cfg.train))
    if run.teacher:
        log.info(f"teacher: {run.teacher['run_dir']} (step {run.teacher['step']}, {run.teacher['schedule']} / "
                 f"{run.teacher['objective']}); student " + ("starts from its EMA weights" if
                                                            run.teacher["init_from_teacher"] else "from scratch"))
    return identity


