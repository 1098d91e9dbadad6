"""What a command answers before it imports torch: `--help` and shell completion (`-sc query=bash`), and the
first lines of every command's --help (what it does, its most useful overrides).

Both need only the composed config, so a command module calls `answer_early` above its heavy imports:
when the command line asks for help or completion, Hydra answers from the same config with a task that
does nothing, and the process exits. Imports here are the standard library and Hydra only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import CONF_DIR

EARLY_FLAGS = {"-h", "--help", "--hydra-help", "-sc", "--shell-completion"}  # answered from the config alone


def is_command(command: str, argv0: str) -> bool:
    """Whether argv0 runs `command`: `python -m diffusion_lab.<command>` (argv0 its .py file, or the module name
    under runpy-style runners) or the `diffusion-lab-<command>` script; never another program that imports it."""
    name = Path(argv0).name
    return name == f"diffusion_lab.{command}" or Path(name).stem.replace("-", "_") in (command, f"diffusion_lab_{command}")


def answer_early(config_name: str, command: str) -> None:
    """Answer --help or a completion query of `command` from conf/`config_name`.yaml and exit; else return."""
    if not (EARLY_FLAGS.intersection(sys.argv[1:]) and is_command(command, sys.argv[0])):
        return
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def no_task(cfg) -> None:  # Hydra never calls it for help or completion
        return None

    no_task()
    sys.exit(0)


def help_header(prog: str, what: str, useful: Sequence[str]) -> str:
    """The first lines of a command's --help: what it does, then its most useful options (one a line)."""
    return f"{prog}: {what}\nMost useful options:\n" + "".join(f"  {line}\n" for line in useful)


class CommandParser(argparse.ArgumentParser):
    """The ArgumentParser of a command without Hydra (compare, metric_check): its --help starts like the Hydra
    commands' does, with `help_header`, then argparse's usage and options."""

    def __init__(self, prog: str, what: str, useful: Sequence[str]):
        super().__init__(prog=prog, description=what)
        self.header = help_header(prog, what, useful)

    def format_help(self) -> str:
        return self.header + "\n" + super().format_help()
