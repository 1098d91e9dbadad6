"""Every command's --help starts with what it does and its three most useful overrides; --help and shell
completion of the Hydra commands answer before torch is imported."""
import os
import subprocess
import sys

import pytest

from diffusion_lab.config.early import is_command
from tests.helpers import REPO

COMMANDS = ["train", "sample", "evaluate", "sampler_lab", "compare", "metric_check", "autoencoder", "export"]
HYDRA_COMMANDS = ["train", "sample", "evaluate", "sampler_lab"]


def run_python(code_or_args, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, *code_or_args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_starts_with_what_the_command_does_and_three_overrides(command):
    result = run_python(["-m", f"diffusion_lab.{command}", "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"python -m diffusion_lab.{command}: ") and len(lines[0]) > 40, lines[0]
    assert lines[1].startswith("Most useful") and all(line.startswith("  ") for line in lines[2:5]), lines[:5]
    assert "powered by Hydra" not in result.stdout


# Runs the command module as `python -m` does, with a completion query, and reports whether torch got imported.
PROBE = """
import runpy, sys
sys.argv = [{argv0!r}, "-sc", "query=bash"]
try:
    runpy.run_module("diffusion_lab.{command}", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("command", HYDRA_COMMANDS)
def test_completion_answers_without_importing_torch(command):
    script = f"diffusion-lab-{command.replace('_', '-')}"
    env = {"COMP_LINE": f"{script} sampler=", "COMP_POINT": str(len(script) + 9)}
    result = run_python(["-c", PROBE.format(argv0=f"/venv/bin/{script}", command=command)], env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sampler=ddim" in result.stdout.split(), result.stdout  # Hydra's completion answered
    assert result.stdout.splitlines()[-1] == "torch imported: False"


def test_only_the_command_itself_answers_early():
    assert is_command("train", "/x/diffusion_lab/train.py") and is_command("sampler_lab", "diffusion-lab-sampler-lab")
    assert not is_command("train", "/x/diffusion_lab/evaluate.py") and not is_command("train", "pytest")
