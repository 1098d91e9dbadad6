"""Command-line pre-flight: every bad override stops with one line before Hydra starts.

Hydra reports composition errors over several lines; `check_overrides` composes every job of the
command line first (sweeps expanded) and turns the first problem into one line.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .. import console
from ..errors import ConfigError, error_line, fail
from ..training import run_dir, run_lock
from ..training.distributed import ranks_from_env
from . import CONF_DIR, options
from . import refused
from .validation import validate


def run_command(command: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> None:
    """Run command(cfg, Hydra's output dir), its console lines also in `<run dir>/<command>.log`; a refused
    input ends with one line, not a traceback, and leaves no run dir behind."""
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.get()
    run_dir = Path(hydra_config.runtime.output_dir)
    console.log_to(run_dir, hydra_config.job.name)
    with refusals(run_dir):
        validate(cfg)
        command(cfg, run_dir)


@contextlib.contextmanager
def refusals(run_dir: Path, kinds: Optional[tuple] = None) -> Iterator[None]:
    """A refused input (by default a bad value, a missing file or dataset) inside: one line `error: ...`, exit 2,
    and the run dir removed when it holds nothing but what Hydra and the log put there (`refused`)."""
    from ..data.datasets import DatasetNotFoundError

    try:
        yield
    except kinds or (OSError, ValueError, DatasetNotFoundError) as error:
        if refused.removable(run_dir):
            console.close()
            refused.remove_unused(run_dir)
        fail(error_line(error))


def _one_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(error).__name__


def _check_group_choices(overrides: Sequence[Any]) -> Optional[str]:
    for override in overrides:
        group = override.key_or_group
        if override.package is not None or "." in group or not (CONF_DIR / group).is_dir():
            continue
        if group.startswith("hydra/"):  # also holds the plugins' configs (hydra/launcher=joblib): Hydra checks them
            continue
        if group in ("experiment", "debug") and override.value() is None:  # the two groups that default to null
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if str(value) not in options(group):
                return f"unknown {group} '{value}'; known: {', '.join(options(group))}"
    return None


def _probe_folder(folder: Path) -> Optional[str]:
    """Why nothing can be made in `folder` (root passes os.access even in /proc), or None: makes and removes a dir."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".diffusion_lab_probe."))
    except OSError as error:
        return f"cannot create a folder in {folder}: {error.strerror or error}"
    return None


def _lock_holder(path: Path) -> Optional[str]:
    """Why a run dir that another run holds locked cannot be used (checked before Hydra writes its .hydra/ files
    there; the run itself takes the lock for good). Rank 0 only: the other ranks share rank 0's dir."""
    if not (path / run_lock.LOCK_FILE).is_file() or ranks_from_env()[0] != 0:
        return None
    try:
        with run_lock.held(path):
            return None
    except ConfigError as error:
        return str(error)


def _check_output_dir(overrides: Sequence[Any], mode: str) -> Optional[str]:
    """The run (or sweep) dir must be creatable: its nearest existing ancestor a writable folder."""
    key = f"hydra.{mode}.dir"
    given = [str(o.value()) for o in overrides if o.key_or_group == key and not o.is_sweep_override()]
    path = Path(given[-1] if given else "outputs").expanduser().absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if not ancestor.is_dir():
        return f"{key}={path} cannot be created: {ancestor} is a file"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{key}={path} cannot be created: {ancestor} is not writable"
    problem = _probe_folder(ancestor) or (_lock_holder(path) if mode == "run" else None)
    if problem:
        return f"{key}={path}: {problem}"
    resuming = any(o.key_or_group == "train.resume" and o.value() is not None for o in overrides)
    found = [name for name in run_dir.RUN_ARTEFACTS if (path / name).exists()]
    if mode == "run" and found and not resuming:  # checked before Hydra writes its .hydra/ files there
        return f"{key}={path} already holds a run ({', '.join(found)}); pick a new dir or resume that run"
    return None


def _check_added_group(overrides: Sequence[Any]) -> Optional[str]:
    """`+experiment=x` adds a second experiment entry; the defaults list already has one to choose."""
    for override in overrides:
        if override.is_add() and "." not in override.key_or_group and (CONF_DIR / override.key_or_group).is_dir():
            group = override.key_or_group
            return f"+{group}={override.get_value_element_as_str()}: the {group} group is in the defaults list " \
                   f"already; use {group}={override.get_value_element_as_str()} (no +)"
    return None


def check_added_keys(cfg: DictConfig, overrides: Sequence[Any]) -> None:
    """A `+key=value` must land in a component (a section with a `name`, whose keys all go to its builder,
    which refuses unknown ones); elsewhere (train, eval, top level) nothing would read it."""
    for override in overrides:
        key = override.key_or_group
        if not override.is_add() or key.startswith("hydra") or (CONF_DIR / key).is_dir():
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if isinstance(parent, DictConfig) and "name" not in parent:
            known = [k for k in parent.keys() if k != leaf]
            close = difflib.get_close_matches(leaf, known, n=1)
            hint = f"; did you mean {parent_key + '.' if parent_key else ''}{close[0]}?" if close else ""
            raise ConfigError(f"+{key}: no part of diffusion_lab reads {key}{hint}")


# Hydra's own flags: with one of them the command line is Hydra's to check.
HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "--info", "-i", "--shell-completion", "-sc",
               "-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--resolve", "-p", "--package"}


def _interval_ends(override: Any) -> Optional[str]:
    """`key=interval(a,b)` (an optimising sweeper's range, e.g. Optuna's) as `key=a,b`: both ends get checked."""
    if not override.is_interval_sweep():
        return None
    interval = override.value()
    return f"{override.get_key_element()}={interval.start},{interval.end}"


def check_overrides(args: Sequence[str], config_name: str = "config") -> None:
    """Compose every job of a (multi)run command line and validate it; exit with one line on error."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    for text in texts:
        try:
            parser.parse_overrides([text])
        except Exception as error:  # Hydra's OverrideParseException
            fail(f"cannot parse {text!r}: {_one_line(error)}")
    texts = [_interval_ends(parser.parse_overrides([text])[0]) or text for text in texts]
    parsed = parser.parse_overrides(texts)
    multirun = any(a in ("-m", "--multirun") for a in args)
    problem = _check_added_group(parsed) or _check_group_choices(parsed) or _check_output_dir(parsed, "sweep" if multirun else "run")
    if problem:
        fail(problem)
    jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [texts]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            job = [o for o in job if not o.lstrip("+~").startswith("hydra")]
            try:
                cfg = compose(config_name=config_name, overrides=job)
                check_added_keys(cfg, parser.parse_overrides(job))
                validate(cfg)
            except Exception as error:
                fail(misspelt_key(job, config_name) or _one_line(error))
        refused.plan(_planned_dir(texts if not multirun else [], config_name, "sweep" if multirun else "run"))
    GlobalHydra.instance().clear()


def _planned_dir(texts: Sequence[str], config_name: str, mode: str) -> Optional[Path]:
    """hydra.run.dir (or hydra.sweep.dir) as this command line resolves it now (its time, another uid)."""
    from hydra import compose

    try:
        cfg = compose(config_name=config_name, overrides=list(texts), return_hydra_config=True)
        return Path(str(OmegaConf.select(cfg, f"hydra.{mode}.dir")))
    except Exception:  # a launcher's or sweeper's config that composes only under Hydra: remove nothing
        return None


def _close_key(cfg: DictConfig, key: str) -> Optional[str]:
    """`train.steps` for `train.stpes`: the key with its first unknown part replaced by the closest known one."""
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return None
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node.keys()], n=1)
            return ".".join([*parts[:i], *close, *parts[i + 1:]]) if close else None
        node = node._get_node(part)
    return None


def misspelt_key(job: Sequence[str], config_name: str) -> Optional[str]:
    """For `key=value` whose key the config lacks but nearly has: `unknown key ...; did you mean ...?` (not
    Hydra's advice to add the misspelt key with +)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(job))
    choices = [text for text, o in zip(job, overrides) if o.is_add() or "." not in o.key_or_group]
    try:
        cfg = compose(config_name=config_name, overrides=choices)
    except Exception:
        return None
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_delete() or "." not in key or OmegaConf.select(cfg, key, default=None,
                                                                                              throw_on_missing=False) is not None:
            continue
        close = _close_key(cfg, key)
        if close and close != key:
            return f"unknown key {key}; did you mean {close}?"
    return None


def checked_main(hydra_main: Callable[[], Any], config_name: str = "config") -> None:
    """A command's entry point: check every override before Hydra starts (one-line errors), then run."""
    console.close()  # a log file of an earlier command in this process gets nothing of this one
    refused.plan(None)
    if not HYDRA_FLAGS.intersection(sys.argv[1:]):
        check_overrides(sys.argv[1:], config_name=config_name)
    hydra_main()
