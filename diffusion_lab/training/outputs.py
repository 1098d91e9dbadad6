"""What a training run writes: its dir, train.log, config.yaml, metrics and W&B, checkpoints, sample grids,
pictures and summary.json. Only rank 0 writes; on every other rank each method does nothing, so the loop and
the checkpoint code never ask which rank they run on."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import files
from ..data.images import row_labels, save_grid
from . import checkpoint, posthoc_ema, progress, run_lock
from . import run_dir as run_dirs
from .loggers import LOGGERS

SUMMARY_KEYS = ("final_loss", "best_fid", "final_fid", "fid_floor", "fid_floor_n", "fid_label", "final_kid",
                "final_kid_std", "final_precision", "final_recall", "kid_floor", "precision_floor", "recall_floor",
                "train_images_per_s", "wall_time_s")  # what the logger's run summary gets


class Outputs:
    """The run dir's writer. `enabled` is False off rank 0: then nothing is written and nothing is logged
    below warnings."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.logger: Any = None
        self.run_id: Optional[str] = None
        self.claimed = False

    def claim(self, resume_from: Optional[Path]) -> None:
        """Lock and create the run dir (refusing one that another process holds, or that holds another run) and
        send the log to its train.log. `release` lets go of the lock."""
        if not self.enabled:
            progress.log.setLevel(logging.WARNING)
            return
        run_dirs.claim(self.run_dir, resume_from)
        self.claimed = True
        progress.log_to(self.run_dir)

    def release(self) -> None:
        """Let go of the run dir's lock (the kernel drops it anyway when the process ends)."""
        if self.claimed:
            self.claimed = False
            run_lock.release(self.run_dir)

    def carry_metrics(self, previous_run: Path, up_to_step: int) -> None:
        """The earlier run's metrics up to the checkpoint step, so the curve continues without duplicated steps
        (also when resuming in the same dir, where lines after the checkpoint are dropped). Rewritten atomically:
        a kill or a full disk meanwhile leaves the old file whole. A torn line is skipped with a warning."""
        source = previous_run / "metrics.jsonl"
        if not self.enabled or not source.is_file():
            return
        rows, problems = files.read_jsonl(source)
        for problem in problems:
            progress.log.warning(problem)
        kept = [row for row in rows if isinstance(row.get("step"), int) and row["step"] <= up_to_step]
        files.write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in kept))

    def carry_snapshots(self, previous_run: Path, up_to_step: int) -> None:
        """The earlier run's EMA snapshots up to the checkpoint step; those after it are dropped (posthoc_ema)."""
        if self.enabled:
            posthoc_ema.carry_snapshots(previous_run, self.run_dir, up_to_step)

    def ema_snapshot(self, step: int, ema: Any, dtype: str) -> Optional[Path]:
        """ema_snapshots/step_NNNNNNN.safetensors: every average a power EMA tracks, as `dtype` (rank 0 only)."""
        if not self.enabled:
            return None
        tensors = ema.snapshot(posthoc_ema.SNAPSHOT_DTYPES[dtype])
        return posthoc_ema.write_snapshot(posthoc_ema.snapshot_path(self.run_dir, step), tensors, step,
                                          ema.num_updates, ema.stds, dtype)

    def open_logger(self, config: Dict[str, Any], logger_name: str, run_id: Optional[str], **params: Any) -> None:
        """Write config.yaml and start the configured logger (metrics.jsonl, W&B)."""
        from omegaconf import OmegaConf

        if not self.enabled:
            return
        files.write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
        self.logger = LOGGERS.build(logger_name, run_dir=self.run_dir, config=config, run_id=run_id,
                                    job_type="train", **params)
        self.run_id = self.logger.run_id

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self.enabled:
            self.logger.log(metrics, step)

    def checkpoint(self, name: str, state: Dict[str, Any]) -> Path:
        """Write checkpoints/`name`; returns its path (on every rank)."""
        path = self.run_dir / "checkpoints" / name
        if self.enabled:
            checkpoint.save(path, state)
        return path

    def grid(self, step: int, generate: Callable[[], Tuple[torch.Tensor, Optional[int]]]) -> Optional[Path]:
        """samples/step_NNNNNNN.png of the (images, per row) generate() makes (called on rank 0 only)."""
        if not self.enabled:
            return None
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        path.parent.mkdir(exist_ok=True)
        images, nrow = generate()
        save_grid(images, path, nrow=nrow, caption=f"step {step} (EMA model)", labels=row_labels(len(images), nrow))
        self.logger.log_images({"samples": path}, step)
        return path

    def pictures(self, make: Callable[[], Dict[str, Path]], step: int) -> Dict[str, Path]:
        """The end-of-run pictures that make() draws (called on rank 0 only), sent to the logger."""
        if not self.enabled:
            return {}
        pictures = make()
        self.logger.log_images(pictures, step)
        return pictures

    def summary(self, summary: Dict[str, Any], upload_checkpoint: bool) -> None:
        """summary.json, the logger's run summary and (unless interrupted) the final checkpoint upload."""
        if not self.enabled:
            return
        files.write_json(self.run_dir / "summary.json", summary)
        self.logger.summarize({k: summary[k] for k in SUMMARY_KEYS if k in summary})
        if upload_checkpoint:
            self.logger.log_checkpoint(self.run_dir / "checkpoints" / "last.pt")

    def logger_info(self) -> Dict[str, Any]:
        return self.logger.info() if self.enabled else {}

    def finish(self, exit_code: int = 0) -> None:
        if self.enabled and self.logger is not None:
            self.logger.finish(exit_code=exit_code)


def run_name(cfg, overrides: Sequence[str]) -> str:
    """The W&B / summary name: run_name, else the command-line overrides."""
    return cfg.run_name or ",".join(overrides) or "default"
