"""Config checks that run before any work starts: every bad override stops with one line.

Hydra reports composition errors over several lines; `check_overrides` composes every job of the
command line first (sweeps expanded) and turns the first problem into one line. `validate` checks
types and ranges of the composed values.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from . import run_dir  # noqa: F401  (registers the ${uid:} resolver of the run dir names)

CONF_DIR = Path(__file__).resolve().parent / "conf"  # shipped inside the package (a wheel holds it too)


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def error_line(error: BaseException) -> str:
    """An error as one line; for an error re-raised from a DataLoader worker, the original message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # torch's ExceptionWrapper: the cause is last
        return lines[-1].split(": ", 1)[-1]
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return lines[0]


def run_command(command: Callable[[DictConfig, Path], Any], cfg: DictConfig) -> None:
    """Run command(cfg, Hydra's output dir); a refused input ends with one line, not a traceback."""
    from hydra.core.hydra_config import HydraConfig

    from .data import DatasetNotFoundError

    try:
        validate(cfg)
        command(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (OSError, ValueError, DatasetNotFoundError) as error:
        fail(error_line(error))


def _options(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


Rule = Tuple[str, type, Callable[[Any], bool], str]

_positive = (lambda v: v > 0, "> 0")
_non_negative = (lambda v: v >= 0, ">= 0")
_unit = (lambda v: 0 <= v < 1, "in [0, 1)")
_closed_unit = (lambda v: 0 <= v <= 1, "in [0, 1]")


def _rule(key: str, kind: type, check: Tuple[Callable[[Any], bool], str]) -> Rule:
    return key, kind, check[0], check[1]


_device = (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, mps, cuda or cuda:N")


def _one_of(*choices: Any) -> Tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


RULES: Sequence[Rule] = (
    _rule("seed", int, _non_negative),
    _rule("device", str, _device),
    _rule("num_samples", int, _positive),
    _rule("per_class", int, _positive),
    _rule("batch_size", int, _positive),
    _rule("data.image_size", int, _positive),
    _rule("data.channels", int, _one_of(1, 3)),
    _rule("model.time_dim", int, _positive),
    _rule("model.num_heads", int, _positive),
    _rule("model.norm_groups", int, _positive),
    _rule("model.dropout", float, _unit),
    _rule("model.num_res_blocks", int, _positive),
    _rule("model.base_channels", int, _positive),
    _rule("schedule.noise_steps", int, _positive),
    _rule("schedule.beta_start", float, _unit),
    _rule("schedule.beta_end", float, _unit),
    _rule("schedule.s", float, _non_negative),
    _rule("schedule.max_beta", float, _unit),
    _rule("schedule.zero_terminal_snr", bool, (lambda v: True, "true or false")),
    _rule("schedule.max_terminal_signal", float, _positive),
    _rule("objective.weighting", str, _one_of("uniform", "min_snr")),
    _rule("objective.snr_gamma", float, _positive),
    _rule("sampler.steps", int, _positive),
    _rule("sampler.eta", float, _closed_unit),
    _rule("sampler.snr", float, _non_negative),
    _rule("sampler.variance", str, _one_of("fixed_small", "fixed_large")),
    _rule("sampler.guidance_scale", float, _non_negative),
    _rule("sampler.guidance_rescale", float, _closed_unit),
    _rule("train.cond_drop_prob", float, _closed_unit),
    _rule("train.steps", int, _positive),
    _rule("train.batch_size", int, _positive),
    _rule("train.grad_accum_steps", int, _positive),
    _rule("train.optimizer", str, _one_of("adam", "adamw")),
    _rule("train.lr", float, _positive),
    _rule("train.weight_decay", float, _non_negative),
    _rule("train.warmup_steps", int, _non_negative),
    _rule("train.grad_clip", float, _non_negative),
    _rule("train.ema_decay", float, _unit),
    _rule("train.precision", str, _one_of("auto", "fp32", "bf16", "fp16")),
    _rule("train.num_workers", int, _non_negative),
    _rule("train.log_every", int, _positive),
    _rule("train.sample_every", int, _non_negative),
    _rule("train.num_grid_samples", int, _positive),
    _rule("train.checkpoint_every", int, _non_negative),
    _rule("train.max_bad_steps", int, _positive),
    _rule("train.overfit_batches", int, _non_negative),
    _rule("eval.every", int, _non_negative),
    _rule("eval.num_samples", int, _positive),
    _rule("eval.batch_size", int, _positive),
    _rule("eval.mode", str, _one_of("clean", "legacy_pytorch", "legacy_tensorflow")),
    _rule("eval.reference", str, _one_of("test", "train")),
    _rule("eval.feature_extractor", str, _one_of("auto", "inception", "digits", "small")),
    _rule("eval.fallback", str, _one_of("small", "none")),
)


def _typed(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def check_required(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first `???` value that was not given."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{missing[0]} is required: add {missing[0]}=...")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for a missing required value, or one of the wrong type or range."""
    check_required(cfg)
    for key, kind, ok, expected in RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if not _typed(value, kind):
            raise ConfigError(f"{key}={value!r} must be {kind.__name__} ({expected})")
        if not ok(value):
            raise ConfigError(f"{key}={value!r} must be {expected}")
    betas = OmegaConf.select(cfg, "train.betas", default=None)
    if betas is not None and not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ConfigError(f"train.betas={list(betas)} must be two values in [0, 1)")
    resume = OmegaConf.select(cfg, "train.resume", default=None)
    if resume not in (None, "auto") and not run_dir.checkpoint_file(Path(str(resume))).is_file():
        raise ConfigError(f"train.resume={resume!r} must be auto, an existing checkpoint file or a run dir with one")
    _check_sampler_fits_schedule(cfg)
    _check_sampling(cfg)
    _check_lr_schedule(cfg)
    _check_grad_accum(cfg)
    _check_num_classes(cfg)


def _check_lr_schedule(cfg: DictConfig) -> None:
    from .optim import LR_SCHEDULES  # importing optim registers the schedules

    name = OmegaConf.select(cfg, "train.lr_schedule", default=None)
    if name is not None and name not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule={name!r} must be one of {', '.join(LR_SCHEDULES.names())}")


def _check_grad_accum(cfg: DictConfig) -> None:
    from .optim import micro_batch_size

    batch_size = OmegaConf.select(cfg, "train.batch_size", default=None)
    if batch_size is not None:
        try:
            micro_batch_size(batch_size, OmegaConf.select(cfg, "train.grad_accum_steps", default=1))
        except ValueError as error:
            raise ConfigError(str(error)) from error


def _check_num_classes(cfg: DictConfig) -> None:
    """model.num_classes is null, auto or a positive count (whether the data has labels is checked on building)."""
    from .conditioning import resolve_num_classes

    value = OmegaConf.select(cfg, "model.num_classes", default=None)
    try:
        resolve_num_classes(value, 1)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error


def _check_sampler_fits_schedule(cfg: DictConfig) -> None:
    """A sampler cannot take more steps than the schedule has timesteps (caught here, not after training)."""
    steps = OmegaConf.select(cfg, "sampler.steps", default=None)
    noise_steps = OmegaConf.select(cfg, "schedule.noise_steps", default=None)
    if noise_steps is not None and noise_steps < 2:
        raise ConfigError(f"schedule.noise_steps={noise_steps} must be >= 2")
    if steps is not None and noise_steps is not None and steps > noise_steps:
        raise ConfigError(f"sampler.steps={steps} must be <= schedule.noise_steps={noise_steps}")


def _check_sampling(cfg: DictConfig) -> None:
    """The grid is a registered name (or a list); the schedule builds (terminal signal); eps needs alpha_bar_{T-1} > 0."""
    from .build import build_schedule
    from .registry import GRIDS

    grid = OmegaConf.select(cfg, "sampler.grid", default=None)
    if isinstance(grid, str) and grid not in GRIDS:
        raise ConfigError(f"sampler.grid='{grid}' must be one of {', '.join(GRIDS.names())} or a list of timesteps")
    if OmegaConf.select(cfg, "schedule.name", default=None) is not None:
        try:
            build_schedule(cfg)  # refuses a schedule that leaves signal at t = T-1
        except ValueError as error:
            raise ConfigError(str(error)) from error
        if cfg.schedule.get("zero_terminal_snr") and OmegaConf.select(cfg, "objective.name", default=None) == "eps":
            raise ConfigError("schedule.zero_terminal_snr=true needs objective=v or x0: eps cannot give x0 at "
                              "alpha_bar = 0")


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
            if str(value) not in _options(group):
                return f"unknown {group} '{value}'; known: {', '.join(_options(group))}"
    return None


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
                fail(_one_line(error))
    GlobalHydra.instance().clear()
