"""Cluster jobs started by submitit (`hydra/launcher=slurm`, `submitit_slurm`, `submitit_local`): one training
rank per submitit task, and a requeued job that continues from its own checkpoint. Outside submitit: nothing.

Ranks: every task of a job runs the training command. A job with several tasks gets the variables torchrun
would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the job's first host, MASTER_PORT
drawn from the job id, so every task agrees) from submitit's own `TorchDistributedEnvironment`.

Preemption: SLURM sends SIGUSR2 `signal_delay_s` before the time limit (submitit's `--signal`) and SIGTERM when
it preempts a job. submitit installs its handlers before the run starts (SIGUSR2: checkpoint and requeue;
SIGTERM: log only); `preemption.Preemption` takes both signals over for the training loop, lets the step
finish, writes last.pt, puts submitit's handlers back and then calls the one for its signal. On SIGUSR2 that
asks hydra-submitit-launcher's `checkpoint()` for the same job again and requeues it (`scontrol requeue`; the
local executor restarts the task); after SIGTERM SLURM requeues a preempted job itself. Either way the job
starts again with the same job id and, from the same sweep config, the same run dir: `resume_if_requeued`
then points `train.resume` at that run dir's last.pt (or, if that run had finished, hands back its summary).
The job id is recorded in the run dir at the first start, so only a requeue of that very job continues
there; any other start in a used dir is refused as before.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from .. import files
from . import run_lock
from .progress import log
from .run_dir import RUN_ARTEFACTS

JOB_ID_FILE = ".submitit_job_id"  # in a run dir: the submitit job that started the run there


def job_environment() -> Optional[Any]:
    """submitit's JobEnvironment of the job this process is a task of; None outside a submitit job."""
    import submitit

    try:
        return submitit.JobEnvironment()
    except RuntimeError:  # "Could not figure out which environment the job is running in"
        return None


def export_distributed_env(job: Any) -> Dict[str, str]:
    """For a job with several tasks, export torch.distributed's variables for this task; returns them
    (empty for a one-task job). Every GPU stays visible: a rank picks cuda:LOCAL_RANK, as under torchrun."""
    if job.num_tasks <= 1:
        return {}
    from submitit.helpers import TorchDistributedEnvironment

    dist = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return {"RANK": str(dist.rank), "WORLD_SIZE": str(dist.world_size), "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": str(dist.local_world_size), "MASTER_ADDR": dist.master_addr,
            "MASTER_PORT": str(dist.master_port)}


def finished_summary(cfg: DictConfig, run_dir: Path) -> Optional[Dict[str, Any]]:
    """The summary of a run in `run_dir` that already trained all `train.steps` (a stop signal during its
    last step's FID lets the run finish, then requeues the job), else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):  # none yet, or cut short by a kill while it was written
        return None
    return summary if summary.get("steps", 0) >= cfg.train.steps else None


def resume_if_requeued(cfg: DictConfig, run_dir: Path, job: Any) -> Optional[Dict[str, Any]]:
    """A requeued start of `job` (its id is the one recorded in `run_dir`) continues from run_dir's last.pt
    (`cfg.train.resume` is set to it), or returns the summary of a run that had already finished. A requeued
    job whose first start wrote no checkpoint starts over: rank 0 removes that start's files. A first start
    records the job id (rank 0)."""
    marker, last = run_dir / JOB_ID_FILE, run_dir / "checkpoints" / "last.pt"
    requeued = marker.is_file() and marker.read_text().strip() == job.job_id
    if requeued and last.is_file():
        finished = finished_summary(cfg, run_dir)
        if finished is not None:
            log.info(f"submitit job {job.job_id} was requeued after its run had finished: nothing left to train")
            return finished
        cfg.train.resume = str(last)
        log.info(f"submitit job {job.job_id} was requeued: continuing from {last}")
        return None
    if job.global_rank != 0:
        return None
    with run_lock.held(run_dir):  # a dir that another live process runs in is refused, not cleaned
        if requeued:
            log.info(f"submitit job {job.job_id} was requeued before its first checkpoint: starting over in {run_dir}")
            for path in (run_dir / name for name in RUN_ARTEFACTS):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        elif not any((run_dir / name).exists() for name in RUN_ARTEFACTS):  # a dir holding a run stays untouched
            files.write_text(marker, job.job_id)  # atomic: a torn id would misread a requeue
    return None


def prepare(cfg: DictConfig, run_dir: Path) -> Optional[Dict[str, Any]]:
    """In a submitit task: export the torch.distributed variables and continue a requeued job; returns the
    summary of a requeued job that has nothing left to train. Outside submitit: nothing (None)."""
    job = job_environment()
    if job is None:
        return None
    dist = export_distributed_env(job)
    log.info(f"submitit job {job.job_id}: task {job.global_rank} of {job.num_tasks} on {job.num_nodes} node(s)"
             + (f", torch.distributed via {dist['MASTER_ADDR']}:{dist['MASTER_PORT']}" if dist else ""))
    return resume_if_requeued(cfg, Path(run_dir), job)
