"""One run, one directory: unique run and sweep dir names, and a run dir is never reused except to resume.

`diffusion_lab/conf/*.yaml` name run dirs `outputs/DATE/TIME-${uid:}`: `uid` is a short random suffix (4 hex
digits, 65,536 values) drawn once per config, so two runs started in the same second get different
dirs and names still sort by start time. Hydra copies the resolver cache from a sweep's config to
each of its jobs, so all jobs of a sweep share one sweep dir. A sweep job's subdir is `${job_dir:...}`:
its number and the swept keys only (`3-schedule_cosine-model.dropout_0.1`), a name that passes back
as `checkpoint=` or `train.resume=` without quoting.
"""
from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from . import run_lock

# What a run writes into its dir (Hydra's own `.hydra/` and log file are written before any run starts).
RUN_ARTEFACTS = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints")

OmegaConf.register_new_resolver("uid", lambda: secrets.token_hex(2), use_cache=True, replace=True)


def _swept(sweep_dir: Path) -> Sequence[str]:
    """Keys with several values on the multirun command line, or searched by the sweeper (Optuna's params)."""
    from .loggers import swept_keys

    path = Path(sweep_dir) / "multirun.yaml"  # written by the sweeper before it launches any job
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params", default=None) if path.is_file() else None
    return [*swept_keys(sweep_dir), *(params or {})]


def job_dir(num: int, sweep_dir: str, overrides: Sequence[str]) -> str:
    """`NUM-key_value-key_value` for the swept keys: no `=`, `,`, brackets or quotes (safe as a Hydra value)."""
    swept = set(_swept(Path(sweep_dir)))
    parts = [str(num)]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in swept:
            parts.append(re.sub(r"[^\w.+-]+", "_", f"{key}_{value}").strip("_"))
    return "-".join(parts)[:200]


OmegaConf.register_new_resolver("job_dir", job_dir, replace=True)


def checkpoint_file(path: Path) -> Path:
    """A checkpoint given as a file, or as a run dir (its checkpoints/last.pt)."""
    path = Path(path).expanduser()
    return path / "checkpoints" / "last.pt" if path.is_dir() else path


def claim(run_dir: Path, resume_from: Optional[Path] = None) -> None:
    """Take `run_dir`'s lock (`run_lock`, held until `run_lock.release`), then refuse a dir that already holds a
    run, unless that run is the one being resumed. Under the lock the check and the writes that follow are one
    step: two runs started together in one dir cannot both pass it. A refused claim writes nothing."""
    from ..errors import ConfigError

    run_dir = Path(run_dir)
    run_lock.acquire(run_dir)
    try:
        found = [name for name in RUN_ARTEFACTS if (run_dir / name).exists()]
        resuming_here = resume_from is not None and Path(resume_from).resolve().parent.parent == run_dir.resolve()
        if found and not resuming_here:
            raise ConfigError(f"run dir {run_dir} already holds a run ({', '.join(found)}); pick a new hydra.run.dir "
                              f"or continue that run with train.resume={run_dir / 'checkpoints' / 'last.pt'}")
        try:
            probe = run_dir / ".write_test"
            probe.touch()
            probe.unlink()
            run_lock.record(run_dir)
        except OSError as error:
            raise ConfigError(f"run dir {run_dir} is not writable: {error.strerror or error}") from error
    except BaseException:
        run_lock.release(run_dir)
        raise
