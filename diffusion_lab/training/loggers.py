"""Run loggers: metrics.jsonl always; Weights & Biases on top. W&B never prompts and never hangs."""
from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import urlparse

from omegaconf import OmegaConf

from .. import console, files
from ..registry import LOGGERS


@LOGGERS.register("none")
class LocalLogger:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path, config: Dict[str, Any], name: str, group: Optional[str] = None,
                 run_id: Optional[str] = None, **_: Any):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.name, self.group, self.run_id = name, group, run_id

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        """One whole line; a full disk is a files.WriteError naming the file, with the file cut back to whole lines."""
        files.append_line(self.metrics_path, json.dumps({"step": step, **metrics}))

    def log_images(self, images: Dict[str, Path], step: int) -> None:
        """Pictures already live in the run dir; only W&B uploads them."""

    def summarize(self, values: Dict[str, Any]) -> None:
        """End-of-run numbers; summary.json holds them locally, W&B puts them in the run summary."""

    def log_checkpoint(self, path: Path) -> None:
        """Checkpoints already live in the run dir; only W&B uploads them."""

    def info(self) -> Dict[str, Any]:
        return {"logger": "none"}

    def finish(self, exit_code: int = 0) -> None:
        pass


def has_wandb_credentials() -> bool:
    """An API key in the environment or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


WANDB_MODES = ("auto", "online", "offline", "disabled")  # logger.mode


def wandb_mode(mode: str) -> str:
    """WANDB_MODE wins; `auto` means online with credentials, offline without."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    return "online" if has_wandb_credentials() else "offline"


@LOGGERS.register("wandb")
class WandbLogger(LocalLogger):
    """LocalLogger plus a W&B run: config, metrics, sample grids and the final checkpoint."""

    def __init__(self, run_dir: Path, config: Dict[str, Any], name: str, group: Optional[str] = None,
                 run_id: Optional[str] = None, project: str = "diffusion_lab", entity: Optional[str] = None,
                 mode: str = "auto", log_checkpoint: bool = True, tags: Optional[List[str]] = None,
                 job_type: Optional[str] = None, **_: Any):
        super().__init__(run_dir, config, name, group, run_id)
        import wandb

        self.wandb = wandb
        self.log_checkpoints = log_checkpoint
        self.mode = wandb_mode(mode)
        kwargs = dict(project=project, entity=entity, name=name, group=group, config=config,
                      dir=str(self.run_dir), tags=list(tags or []), id=run_id, resume="allow", job_type=job_type,
                      settings=wandb.Settings(console="off", silent=True))
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as error:  # an unreachable server must not cost the run
            console.info(f"W&B: could not start an online run ({type(error).__name__}); logging offline instead")
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **kwargs)
        self.run_id = self.run.id
        if self.mode == "offline":
            console.info(f"W&B: logging offline (no credentials or WANDB_MODE=offline); upload later with: "
                  f"wandb sync {self.run.dir.rsplit('/files', 1)[0]}")

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def log_images(self, images: Dict[str, Path], step: int) -> None:
        """Under plots/<name>: the numeric keys (loss, fid) keep numbers in the history and the summary."""
        self.run.log({f"plots/{key}": self.wandb.Image(str(path)) for key, path in images.items()}, step=step)

    def summarize(self, values: Dict[str, Any]) -> None:
        self.run.summary.update({k: v for k, v in values.items() if v is not None})

    def log_checkpoint(self, path: Path) -> None:
        if not self.log_checkpoints:
            return
        artifact = self.wandb.Artifact(f"checkpoint-{self.run.id}", type="model")
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def info(self) -> Dict[str, Any]:
        return {"logger": "wandb", "id": self.run.id, "group": self.run.group, "name": self.run.name,
                "mode": self.mode, "dir": self.run.dir}

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run; when it was the process's last, also shut W&B's service down. The service writes an
        offline run's .wandb file when it closes the run, which can be after `run.finish()` returns; its
        teardown waits for that, so once this returns the run's files are complete (and readable in-process)."""
        self.run.finish(exit_code=exit_code)
        if self.wandb.run is None:  # no other run of this process is active
            try:
                self.wandb.teardown()
            except (Exception, SystemExit) as error:  # a failing shutdown must not cost the run its exit
                print(f"W&B: shutting down its service failed ({type(error).__name__}); the run is finished")


def swept_keys(sweep_dir: Path) -> List[str]:
    """The keys a Hydra multirun gives several values, read from the multirun.yaml Hydra writes first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    task = OmegaConf.load(path).hydra.overrides.task
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()]


def sweep_group(keys: Sequence[str], sweep_dir: Path) -> str:
    """W&B group of a sweep, named after what it sweeps: `schedule x model.dropout 2026-11-23/12-00-00`."""
    sweep_dir = Path(sweep_dir)
    return f"{' x '.join(keys) or 'sweep'} {sweep_dir.parent.name}/{sweep_dir.name}"[:128]


def sweep_tags(keys: Sequence[str], overrides: Sequence[str]) -> List[str]:
    """This job's `key=value` for each swept key (W&B tags are at most 64 characters)."""
    return [o[:64] for o in overrides if o.lstrip("+~").split("=", 1)[0] in keys]


def log_linked_run(train_config: Dict[str, Any], source: Dict[str, Any], job_type: str, run_dir: Path,
                   config: Dict[str, Any], values: Dict[str, Any], pictures: Dict[str, Path]) -> Optional[Dict]:
    """A `sample` or `evaluate` result as its own W&B run linked to the checkpoint's run (same project, entity,
    mode and group; `source` = {"run": id, "group": ...} also in its config); values go to its summary,
    pictures under plots/*. None, and nothing logged, when the checkpoint's run did not use W&B."""
    settings = dict(train_config.get("logger") or {})
    if settings.pop("name", None) != "wandb":
        return None
    settings = {k: v for k, v in settings.items() if k in ("project", "entity", "mode", "tags")}
    logger = WandbLogger(run_dir, {**config, "source_run": source.get("run")}, name=f"{job_type} of {source.get('run')}",
                         group=source.get("group"), job_type=job_type, log_checkpoint=False, **settings)
    logger.summarize(values)
    logger.log_images(pictures, 0)
    info = logger.info()
    logger.finish()
    return info
