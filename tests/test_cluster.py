"""Cluster sweeps (cluster.py, conf/hydra/launcher/slurm.yaml) without a cluster: the launcher config reaches
submitit's sbatch options, submitit's tasks become torch.distributed ranks, and a preempted job that is
started again (by submitit's requeue, or as one would be) continues from its own checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.config import CONF_DIR
from diffusion_lab.config.preflight import check_overrides
from diffusion_lab.evaluation.plots import read_metrics
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint, cluster
from tests.helpers import REPO, TINY, compose_config, wait_for_step

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none"]
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NTASKS",
              "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
# Start the task function as submitit's job does: no command-line pre-checks, straight into hydra_main.
AS_A_JOB = [sys.executable, "-c", "from diffusion_lab.train import hydra_main; hydra_main()"]


def hydra_config(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


# ------------------------------------------------------------------------------------------------
# The launcher config


def test_every_slurm_launcher_key_has_a_comment():
    lines = [line for line in (CONF_DIR / "hydra" / "launcher" / "slurm.yaml").read_text().splitlines()
             if line and not line.startswith(("#", " ", "defaults:"))]
    assert len(lines) >= 10 and all("  # " in line for line in lines), [l for l in lines if "  # " not in l]


def test_slurm_launcher_runs_one_rank_per_gpu_and_requeues(monkeypatch, tmp_path):
    """The plugin turns our keys into submitit's sbatch parameters (submitit refuses unknown ones)."""
    srun = tmp_path / "bin" / "srun"  # submitit's SLURM executor wants one on the PATH; it is never called
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    cfg = hydra_config(["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                        "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config = cfg
    seen = {}

    def capture(executor, fn, *args):
        seen["executor"] = executor._executor
        raise StopIteration

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(StopIteration):
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    executor = seen["executor"]
    params = executor.parameters
    assert isinstance(executor, submitit.SlurmExecutor) and executor.max_num_timeout == 20
    assert (params["gpus_per_node"], params["ntasks_per_node"], params["nodes"]) == (4, 4, 2)
    assert (params["partition"], params["time"], params["cpus_per_task"]) == ("gpu", 240, 8)
    sbatch = executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    assert "#SBATCH --signal=USR2@120" in sbatch and "#SBATCH --ntasks-per-node=4" in sbatch


def test_plugin_launchers_still_compose_and_pass_the_command_line_check():
    for name in ("slurm", "submitit_slurm", "submitit_local", "joblib"):
        assert "_target_" in hydra_config([f"hydra/launcher={name}"]).hydra.launcher
        check_overrides(["-m", f"hydra/launcher={name}", "seed=0,1"])  # exits with one line on an unknown choice


# ------------------------------------------------------------------------------------------------
# submitit's tasks -> torch.distributed's environment


@pytest.fixture
def slurm(monkeypatch):
    """A fake SLURM task (the variables submitit reads); returns a setter for more of them."""
    for name in (*TORCH_VARS, *SLURM_VARS):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)

    def task(**values):
        for name, value in {"SUBMITIT_EXECUTOR": "slurm", **values}.items():
            monkeypatch.setenv(name, str(value))
        return cluster.job_environment()

    return task


def job_of_two_nodes(slurm, rank, job_id=31337):
    """8 ranks on gpu07 and gpu08 (4 per node); `rank` is the global one."""
    return slurm(SLURM_JOB_ID=job_id, SLURM_NTASKS=8, SLURM_JOB_NUM_NODES=2, SLURM_NODEID=rank // 4,
                 SLURM_PROCID=rank, SLURM_LOCALID=rank % 4, SLURM_JOB_NODELIST="gpu[07-08]")


def test_submitit_tasks_become_torch_distributed_ranks(slurm, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    exported = cluster.export_distributed_env(job_of_two_nodes(slurm, rank=6))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1,2,3", "every GPU stays visible: rank picks cuda:LOCAL_RANK"
    expected = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07"}
    assert {k: os.environ[k] for k in expected} == expected and exported["MASTER_ADDR"] == "gpu07"
    port = int(os.environ["MASTER_PORT"])
    assert 20000 <= port <= 60000 and exported["MASTER_PORT"] == str(port)


def test_every_rank_of_a_job_agrees_on_the_port_and_jobs_differ(slurm):
    ports = []
    for rank, job_id in [(0, 31337), (5, 31337), (0, 31338)]:
        os.environ.pop("MASTER_PORT", None)
        cluster.export_distributed_env(job_of_two_nodes(slurm, rank, job_id))
        ports.append(os.environ["MASTER_PORT"])
    assert ports[0] == ports[1] != ports[2]


def test_a_given_master_port_is_kept(slurm):
    job = job_of_two_nodes(slurm, rank=1)
    os.environ["MASTER_PORT"] = "29555"
    assert cluster.export_distributed_env(job)["MASTER_PORT"] == "29555" and os.environ["MASTER_PORT"] == "29555"


def test_one_task_and_no_submitit_change_nothing(slurm, tmp_path):
    cfg = compose_config(FAST)
    assert cluster.job_environment() is None
    cluster.prepare(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and cfg.train.resume is None
    job = slurm(SLURM_JOB_ID=5, SLURM_NTASKS=1)
    assert job is not None and cluster.export_distributed_env(job) == {}
    assert not any(name in os.environ for name in TORCH_VARS)


# ------------------------------------------------------------------------------------------------
# The requeue rule


def write_run(run_dir: Path, with_checkpoint: bool) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    if with_checkpoint:
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"not read here")


def test_a_requeued_job_continues_from_its_own_checkpoint(slurm, tmp_path):
    cfg, run_dir = compose_config(FAST), tmp_path / "run"
    job = slurm(SLURM_JOB_ID=100, SLURM_ARRAY_JOB_ID=99, SLURM_ARRAY_TASK_ID=3)
    cluster.prepare(cfg, run_dir)  # the first start records the job
    assert (run_dir / cluster.JOB_ID_FILE).read_text() == job.job_id == "99_3" and cfg.train.resume is None
    write_run(run_dir, with_checkpoint=True)
    cluster.prepare(cfg, run_dir)  # the requeued start
    assert cfg.train.resume == str(run_dir / "checkpoints" / "last.pt")


def test_a_job_requeued_after_its_run_finished_trains_no_more(slurm, tmp_path):
    """A stop signal during the last step's FID lets the run finish, then submitit requeues the job."""
    cfg, run_dir = compose_config(FAST + ["train.steps=6"]), tmp_path / "run"
    slurm(SLURM_JOB_ID=100)
    assert cluster.prepare(cfg, run_dir) is None
    write_run(run_dir, with_checkpoint=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 6, "final_loss": 0.25, "interrupted": True}))
    assert cluster.prepare(cfg, run_dir)["final_loss"] == 0.25 and cfg.train.resume is None
    (run_dir / "summary.json").write_text(json.dumps({"steps": 5, "final_loss": 0.25, "interrupted": True}))
    assert cluster.prepare(cfg, run_dir) is None and cfg.train.resume == str(run_dir / "checkpoints" / "last.pt")


def test_another_job_never_continues_a_run_dir(slurm, tmp_path):
    run_dir = tmp_path / "run"
    slurm(SLURM_JOB_ID=100)
    cluster.prepare(compose_config(FAST), run_dir)
    write_run(run_dir, with_checkpoint=True)
    cfg = compose_config(FAST)
    slurm(SLURM_JOB_ID=101)  # e.g. a new sweep pointed at an old sweep dir
    cluster.prepare(cfg, run_dir)
    assert cfg.train.resume is None and (run_dir / cluster.JOB_ID_FILE).read_text() == "100"
    assert (run_dir / "metrics.jsonl").is_file(), "another job's files stay"


def test_a_job_requeued_before_its_first_checkpoint_starts_over(slurm, tmp_path):
    cfg, run_dir = compose_config(FAST), tmp_path / "run"
    slurm(SLURM_JOB_ID=100)
    cluster.prepare(cfg, run_dir)
    write_run(run_dir, with_checkpoint=False)
    cluster.prepare(cfg, run_dir)
    assert cfg.train.resume is None and not any((run_dir / n).exists() for n in ("config.yaml", "metrics.jsonl"))
    assert (run_dir / cluster.JOB_ID_FILE).read_text() == "100"


def test_only_rank_zero_records_the_job(slurm, tmp_path):
    job_of_two_nodes(slurm, rank=3)
    cluster.prepare(compose_config(FAST), tmp_path / "run")
    assert not (tmp_path / "run" / cluster.JOB_ID_FILE).exists()


# ------------------------------------------------------------------------------------------------
# End to end: signals to training processes


def _tensors(state):
    return [*state["model"].values(), *state["train_step"]["ema"]["module"].values(),
            *[v for s in state["train_step"]["optimizer"]["state"].values() for v in s.values()]]


@pytest.mark.slow
def test_preempted_job_started_again_continues_bit_identically(tmp_path):
    """SIGUSR2 (submitit's preemption signal) to a job's training process leaves last.pt; the same job started
    again (a requeue: same job id, same run dir, same command) continues from it to the same weights."""
    steps = 100
    args = [*FAST, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=100000",
            "train.sample_every=0", "model.dropout=0.1", f"hydra.run.dir={tmp_path / 'job'}"]
    env = {**ENV, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1"}
    first = subprocess.Popen(AS_A_JOB + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    wait_for_step(tmp_path / "job" / "metrics.jsonl", 3, first)
    first.send_signal(signal.SIGUSR2)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGUSR2, err[-2000:]
    stopped = checkpoint.load(tmp_path / "job" / "checkpoints" / "last.pt")["step"]
    assert 3 <= stopped < steps
    again = subprocess.run(AS_A_JOB + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "submitit job 4242 was requeued: continuing from" in again.stdout + again.stderr
    assert f"at step {stopped}" in again.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "job" / "metrics.jsonl")] == list(range(1, steps + 1))
    assert torch.get_num_threads() == 1  # as in the subprocesses: float sums may depend on the thread count
    train(compose_config([a for a in args if not a.startswith("hydra.")]), tmp_path / "straight")
    one = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    two = checkpoint.load(tmp_path / "job" / "checkpoints" / "last.pt")
    assert two["step"] == steps and all(torch.equal(a, b) for a, b in zip(_tensors(one), _tensors(two)))


def _submitit_task(folder: Path, timeout: float = 120) -> int:
    """The pid of the submitit task process working for `folder` (its command line names the folder)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "submitit.core._submit" in command and str(folder) in command:
                return int(proc.name)
        time.sleep(0.1)
    raise AssertionError(f"no submitit task for {folder}")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the task process through /proc")
def test_submitit_local_requeues_a_preempted_job_and_it_resumes(tmp_path):
    """The whole chain with submitit's local executor: SIGUSR2 -> last.pt -> submitit's handler requeues the
    job (hydra-submitit-launcher's checkpoint()) -> the restarted task continues in the same run dir."""
    steps, sweep = 100, tmp_path / "sweep"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "diffusion_lab.train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
         *FAST, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=100000", "train.sample_every=0"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(sweep / "0" / "metrics.jsonl", 3, launcher)
    os.kill(_submitit_task(sweep / ".submitit"), signal.SIGUSR2)
    _, err = launcher.communicate(timeout=600)
    assert launcher.returncode == 0, err[-2000:]
    log = (sweep / "0" / "train.log").read_text()
    stopped = int(log.split("stopped by SIGUSR2 at step ")[1].split(":")[0])
    assert "Requeued job" in log and f"resumed from {sweep / '0' / 'checkpoints' / 'last.pt'} at step {stopped}" in log
    assert [r["step"] for r in read_metrics(sweep / "0" / "metrics.jsonl")] == list(range(1, steps + 1))
    assert checkpoint.load(sweep / "0" / "checkpoints" / "last.pt")["step"] == steps
    assert OmegaConf.load(sweep / "0" / "config.yaml").train.resume == str(sweep / "0" / "checkpoints" / "last.pt")
