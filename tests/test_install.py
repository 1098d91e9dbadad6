"""The installed package: a wheel built from the source holds the configs and trains from any folder."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO

TINY_TRAIN = ["train.steps=2", "train.batch_size=8", "model.hidden_dims=[16,32]", "model.time_dim=32",
              "logger=none", "eval.every=0", "train.num_grid_samples=4", "sampler.steps=3",
              "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel of a copy of the source (no build files left in the repo), installed with --target."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "diffusion_lab", source / "diffusion_lab", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                   check=True, cwd=work, timeout=300)
    wheel = next((work / "dist").glob("diffusion_lab-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        assert "diffusion_lab/conf/config.yaml" in archive.namelist()
    target = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, timeout=300)
    return target


def run_installed(target: Path, args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_wheel_trains_from_another_folder(installed, tmp_path):
    probe = run_installed(installed, ["-c", "import diffusion_lab; print(diffusion_lab.__file__)"], tmp_path)
    assert probe.stdout.strip().startswith(str(installed)), "the installed copy is the one imported"
    run_dir = tmp_path / "run"
    result = run_installed(installed, ["-m", "diffusion_lab.train", *TINY_TRAIN, f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "summary.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file()
    assert "Primary config directory not found" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("module", ["diffusion_lab.train", "diffusion_lab.sample", "diffusion_lab.evaluate"])
def test_wheel_help_has_no_traceback(installed, tmp_path, module):
    result = run_installed(installed, ["-m", module, "--help"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Powered by Hydra" in result.stdout


def complete(target: Path, script: str, line: str, cwd: Path) -> list:
    """What bash completion offers for `line`: Hydra's completion script runs `script -sc query=bash`
    with COMP_LINE set and offers the words it prints."""
    env = {**os.environ, "PYTHONPATH": str(target), "COMP_LINE": line, "COMP_POINT": str(len(line))}
    result = subprocess.run([str(target / "bin" / script), "-sc", "query=bash"], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.slow
def test_console_scripts_complete_config_groups(installed, tmp_path):
    for script in ("diffusion-lab-train", "diffusion-lab-sample", "diffusion-lab-evaluate",
                   "diffusion-lab-compare", "diffusion-lab-sampler-lab", "diffusion-lab-metric-check",
                   "diffusion-lab-autoencoder"):
        assert (installed / "bin" / script).is_file(), script
    assert sorted(complete(installed, "diffusion-lab-train", "diffusion-lab-train schedule=", tmp_path)) == [
        "schedule=cosine", "schedule=edm", "schedule=flow", "schedule=linear", "schedule=ve", "schedule=vp"]
    assert "objective=" in complete(installed, "diffusion-lab-train", "diffusion-lab-train schedule=cosine obj",
                                    tmp_path)
    assert "sampler=heun" in complete(installed, "diffusion-lab-sample", "diffusion-lab-sample sampler=h", tmp_path)
    assert "autoencoder.factor=" in complete(installed, "diffusion-lab-autoencoder",
                                             "diffusion-lab-autoencoder autoencoder.fa", tmp_path)
    help_text = subprocess.run([str(installed / "bin" / "diffusion-lab-compare"), "--help"], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": str(installed)}, timeout=120)
    assert help_text.returncode == 0 and "usage" in help_text.stdout
