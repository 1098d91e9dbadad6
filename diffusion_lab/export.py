"""`python -m diffusion_lab.export checkpoint=RUN_DIR out=DIR`: a run's EMA model as a diffusers DDPMPipeline folder.

`DDPMPipeline.from_pretrained(DIR)` loads it and samples as our `ddpm` sampler does; `checkpoint=diffusers:DIR` reads
it back (`interop/`). Only what maps exactly is exported: model=cifar with resample=ddpm, a discrete schedule,
objective eps, v or x0, pixel space, unconditional; anything else is refused with one line.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("export", "export")  # --help and shell completion answer here, before torch is imported

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from . import console, files
from .config import CONF_DIR
from .config.preflight import checked_main, run_command
from .config.trained import load_trained
from .interop.pipeline import ddpm_pipeline, refusal


def checked_out(out: str) -> Path:
    """The folder to write: absent or empty (a one-line ValueError otherwise)."""
    path = Path(out).expanduser()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"out={out} is {'a file' if not path.is_dir() else 'not empty'}: pick a new folder")
    return path


def export(cfg: DictConfig, run_dir: Path) -> dict:
    """Write the DDPMPipeline folder `out` (all of it or nothing); return a summary."""
    out = checked_out(str(cfg.out))
    trained = load_trained(cfg.checkpoint, torch.device("cpu"))
    why = refusal(trained.config, trained.model, trained.schedule)
    if why:
        raise ValueError(f"cannot export {cfg.checkpoint} as a DDPMPipeline: {why}")
    pipeline = ddpm_pipeline(trained.model, trained.schedule, trained.objective)
    files.write_dir(out, lambda folder: pipeline.save_pretrained(str(folder), safe_serialization=True))
    summary = {"checkpoint": str(cfg.checkpoint), "step": trained.step, "out": str(out),
               "prediction_type": pipeline.scheduler.config.prediction_type,
               "num_train_timesteps": trained.schedule.num_timesteps}
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(run_dir / "summary.json", summary)
    console.info(f"wrote {out}: a DDPMPipeline ({summary['prediction_type']}, T = {summary['num_train_timesteps']}) "
                 f"of the EMA model at step {trained.step}; read it back with checkpoint=diffusers:{out}")
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="export", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_command(export, cfg)


def main() -> None:
    checked_main(hydra_main, config_name="export")


if __name__ == "__main__":
    main()
