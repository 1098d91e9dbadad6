"""Run loggers: metrics.jsonl always; Weights & Biases on top. W&B never prompts and never hangs."""
from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlparse

from .registry import LOGGERS


@LOGGERS.register("none")
class LocalLogger:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl."""

    def __init__(self, run_dir: Path, config: Dict[str, Any], name: str, group: Optional[str] = None,
                 run_id: Optional[str] = None, **_: Any):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.name, self.group, self.run_id = name, group, run_id

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def log_images(self, images: Dict[str, Path], step: int) -> None:
        """Pictures already live in the run dir; only W&B uploads them."""

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
                 mode: str = "auto", log_checkpoint: bool = True, tags: Optional[List[str]] = None, **_: Any):
        super().__init__(run_dir, config, name, group, run_id)
        import wandb

        self.wandb = wandb
        self.log_checkpoints = log_checkpoint
        self.mode = wandb_mode(mode)
        kwargs = dict(project=project, entity=entity, name=name, group=group, config=config,
                      dir=str(self.run_dir), tags=list(tags or []), id=run_id, resume="allow",
                      settings=wandb.Settings(console="off", silent=True))
        try:
            self.run = wandb.init(mode=self.mode, **kwargs)
        except Exception as error:  # an unreachable server must not cost the run
            print(f"W&B: could not start an online run ({type(error).__name__}); logging offline instead")
            self.mode = "offline"
            self.run = wandb.init(mode=self.mode, **kwargs)
        self.run_id = self.run.id
        if self.mode == "offline":
            print(f"W&B: logging offline (no credentials or WANDB_MODE=offline); upload later with: "
                  f"wandb sync {self.run.dir.rsplit('/files', 1)[0]}")

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def log_images(self, images: Dict[str, Path], step: int) -> None:
        self.run.log({key: self.wandb.Image(str(path)) for key, path in images.items()}, step=step)

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
        self.run.finish(exit_code=exit_code)
