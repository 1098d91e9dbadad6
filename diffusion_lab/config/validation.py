"""Typed validation of a composed config: every bad value stops with one line naming the key.

`validate` checks types and ranges of the composed values before any work starts.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..training import run_dir

Rule = Tuple[str, type, Callable[[Any], bool], str]

_positive = (lambda v: v > 0, "> 0")
_non_negative = (lambda v: v >= 0, ">= 0")
_unit = (lambda v: 0 <= v < 1, "in [0, 1)")
_closed_unit = (lambda v: 0 <= v <= 1, "in [0, 1]")
_sigma_rel = (lambda v: 0 < v < (1 / 12) ** 0.5, "in (0, 0.2887): a relative EMA std sigma_rel below sqrt(1/12), "
              "where the power EMA's exponent gamma > 0")


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
    _rule("objective.snr_gamma", float, _positive),
    _rule("sampler.steps", int, _positive),
    _rule("sampler.eta", float, _closed_unit),
    _rule("sampler.snr", float, _non_negative),
    _rule("sampler.guidance_scale", float, _non_negative),
    _rule("sampler.guidance_rescale", float, _closed_unit),
    _rule("train.cond_drop_prob", float, _closed_unit),
    _rule("train.steps", int, _positive),
    _rule("train.batch_size", int, _positive),
    _rule("train.grad_accum_steps", int, _positive),
    _rule("train.lr", float, _positive),
    _rule("train.weight_decay", float, _non_negative),
    _rule("train.warmup_steps", int, _non_negative),
    _rule("train.grad_clip", float, _non_negative),
    _rule("train.ema_decay", float, _unit),
    _rule("train.ema_snapshot_every", int, _positive),
    _rule("train.num_workers", int, _non_negative),
    _rule("train.log_every", int, _positive),
    _rule("train.sample_every", int, _non_negative),
    _rule("train.num_grid_samples", int, _positive),
    _rule("train.checkpoint_every", int, _non_negative),
    _rule("train.max_bad_steps", int, _positive),
    _rule("train.overfit_batches", int, _non_negative),
    _rule("latent_space.std", float, _positive),
    _rule("latent_space.pca_channels", int, _positive),
    _rule("latent_space.pca_factor", int, _positive),
    _rule("eval.every", int, _non_negative),
    _rule("eval.num_samples", int, _positive),
    _rule("eval.batch_size", int, _positive),
    _rule("autoencoder.factor", int, _one_of(1, 2, 4, 8)),
    _rule("autoencoder.latent_channels", int, _positive),
    _rule("autoencoder.width", int, _positive),
    _rule("autoencoder.norm_groups", int, _positive),
    _rule("autoencoder.kl_weight", float, _non_negative),
)


# Enumerated string values: (key, module, name of the tuple of choices the code that reads the key keeps).
CHOICES: Sequence[Tuple[str, str, str]] = (
    ("objective.weighting", "diffusion.losses", "WEIGHTINGS"),
    ("objective.density", "diffusion.losses", "DENSITIES"),
    ("objective.method", "diffusion.consistency", "METHODS"),
    ("objective.teacher_solver", "diffusion.consistency", "TEACHER_SOLVERS"),
    ("sampler.variance", "diffusion.samplers", "DDPM_VARIANCES"),
    ("train.optimizer", "training.step", "OPTIMIZERS"),
    ("train.precision", "training.step", "PRECISIONS"),
    ("train.ema", "training.ema", "EMAS"),
    ("train.ema_snapshot_dtype", "training.posthoc_ema", "SNAPSHOT_DTYPES"),
    ("eval.mode", "evaluation.fid", "MODES"),
    ("eval.reference", "evaluation.tracker", "REFERENCES"),
    ("eval.feature_extractor", "evaluation.fid", "EXTRACTORS"),
    ("eval.fallback", "evaluation.fid", "FALLBACKS"),
    ("logger.mode", "training.loggers", "WANDB_MODES"),
)


def choice_rules(node: Any, prefix: str = "") -> List[Rule]:
    """The rules of the CHOICES keys under `prefix` that `node` has (a module is imported only when needed)."""
    rules = []
    for key, module, name in CHOICES:
        if key.startswith(prefix) and OmegaConf.select(node, key[len(prefix):], default=None) is not None:
            choices = getattr(importlib.import_module(f"diffusion_lab.{module}"), name)
            choices = choices.names() if hasattr(choices, "names") else choices  # a registry
            rules.append(_rule(key[len(prefix):], str, _one_of(*choices)))
    return rules


# List-typed values, checked entry by entry: (key, entry type, check).
LIST_RULES: Sequence[Rule] = (
    _rule("train.betas", float, _unit),
    _rule("train.ema_stds", float, _sigma_rel),
    _rule("ema_lengths", float, _sigma_rel),
    _rule("model.hidden_dims", int, _positive),
    _rule("guidance_scales", float, _non_negative),
    _rule("labels", int, _non_negative),
    _rule("nfe", int, _positive),
    _rule("teacher_nfe", int, _positive),
    _rule("logger.tags", str, (lambda v: True, "a tag")),
)
MAY_BE_EMPTY = ("logger.tags", "teacher_nfe")


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


def _check_value(shown: str, value: Any, kind: type, ok: Callable[[Any], bool], expected: str) -> None:
    if not _typed(value, kind):
        raise ConfigError(f"{shown}={value!r} must be {kind.__name__} ({expected})")
    if not ok(value):
        raise ConfigError(f"{shown}={value!r} must be {expected}")


def _check_rules(node: Any, rules: Sequence[Rule], shown: str = "") -> None:
    """Every rule whose key `node` has; errors name the key as `shown` + key (`samplers[2].steps`)."""
    for key, kind, ok, expected in rules:
        value = OmegaConf.select(node, key, default=None)
        if value is not None:
            _check_value(shown + key, value, kind, ok, expected)


def _check_lists(cfg: DictConfig) -> None:
    """List-typed values: a list, each entry of the entry type and range (`labels[2]=-1 must be >= 0`)."""
    for key, kind, ok, expected in LIST_RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if not OmegaConf.is_list(value) or (len(value) == 0 and key not in MAY_BE_EMPTY):
            raise ConfigError(f"{key}={_shown(value)} must be a non-empty list of {kind.__name__} ({expected}), "
                              f"e.g. {key}=[...]")
        for i, entry in enumerate(value):
            _check_value(f"{key}[{i}]", entry, kind, ok, expected)
    betas = OmegaConf.select(cfg, "train.betas", default=None)
    if betas is not None and len(betas) != 2:
        raise ConfigError(f"train.betas={list(betas)} must be two values in [0, 1)")
    stds = OmegaConf.select(cfg, "train.ema_stds", default=None)
    if stds is not None and len(set(stds)) != len(stds):
        raise ConfigError(f"train.ema_stds={list(stds)} must be distinct values (each is one tracked EMA)")


def _shown(value: Any) -> str:
    return repr(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def _check_sampler_lists(cfg: DictConfig) -> None:
    """`samplers` (evaluate): entries like {name: ddim, steps: 20}, each a conf/sampler option with valid values;
    `also` (sampler_lab): sampler option names."""
    from . import options

    known = options("sampler")
    entries = OmegaConf.select(cfg, "samplers", default=None)
    if entries is not None:
        if not OmegaConf.is_list(entries) or len(entries) == 0:
            raise ConfigError(f"samplers={_shown(entries)} must be a non-empty list like [{{name: ddim, steps: 20}}]")
        for i, entry in enumerate(entries):
            if not OmegaConf.is_dict(entry) or not isinstance(entry.get("name"), str):
                raise ConfigError(f"samplers[{i}]={_shown(entry)} must be a sampler setting like "
                                  f"{{name: {entry if isinstance(entry, str) else 'ddim'}, steps: 20}}")
            if entry.name not in known:
                raise ConfigError(f"samplers[{i}].name='{entry.name}': unknown sampler; known: {', '.join(known)}")
            rules = [(k[len("sampler."):], *r) for k, *r in RULES if k.startswith("sampler.")]
            _check_rules(entry, [*rules, *choice_rules(entry, "sampler.")], shown=f"samplers[{i}].")
    also = OmegaConf.select(cfg, "also", default=None)
    for i, name in enumerate(also if OmegaConf.is_list(also) else []):
        if name not in known:
            raise ConfigError(f"also[{i}]={name!r}: unknown sampler; known: {', '.join(known)}")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line) for a missing required value, or one of the wrong type or range; lists
    entry by entry."""
    check_required(cfg)
    _check_rules(cfg, (*RULES, *choice_rules(cfg)))
    _check_lists(cfg)
    _check_sampler_lists(cfg)
    resume = OmegaConf.select(cfg, "train.resume", default=None)
    if resume not in (None, "auto") and not run_dir.checkpoint_file(Path(str(resume))).is_file():
        raise ConfigError(f"train.resume={resume!r} must be auto, an existing checkpoint file or a run dir with one")
    _check_sampler_fits_schedule(cfg)
    _check_teacher(cfg)
    _check_latent(cfg)
    _check_sampling(cfg)
    _check_lr_schedule(cfg)
    _check_grad_accum(cfg)
    _check_num_classes(cfg)


def _check_teacher(cfg: DictConfig) -> None:
    """Distillation and tuning name an existing teacher run (whether it fits is checked when it is loaded)."""
    teacher = OmegaConf.select(cfg, "train.teacher", default=None)
    method = OmegaConf.select(cfg, "objective.method", default=None)
    if OmegaConf.select(cfg, "objective.name", default=None) != "consistency":
        if teacher is not None:
            raise ConfigError("train.teacher is read by objective=consistency only (distillation or tuning)")
        return
    if teacher is None and method in ("cd", "ect"):
        raise ConfigError(f"objective.method={method} needs train.teacher=RUN_DIR (a trained diffusion run)")
    if teacher is not None and not run_dir.checkpoint_file(Path(str(teacher))).is_file():
        raise ConfigError(f"train.teacher={teacher!r} must be an existing checkpoint file or a run dir with one")


def _check_latent(cfg: DictConfig) -> None:
    """latent= names pca, an existing diffusers folder or an existing autoencoder run (it is loaded later)."""
    spec = OmegaConf.select(cfg, "latent", default=None)
    if spec is None:
        return
    from .latent import parse  # the latent spaces' modules import torch; pixel runs never need them here

    kind, arg = parse(str(spec))
    if kind == "diffusers" and not Path(arg).expanduser().is_dir():
        raise ConfigError(f"latent=diffusers:{arg}: no such folder (a diffusers AutoencoderKL saved with save_pretrained)")
    if kind == "autoencoder" and not run_dir.checkpoint_file(Path(str(arg))).is_file():
        raise ConfigError(f"latent={arg!r} must be pca, diffusers:DIR or an autoencoder run (python -m "
                          f"diffusion_lab.autoencoder) with a checkpoint")


def _check_lr_schedule(cfg: DictConfig) -> None:
    from ..training.step import LR_SCHEDULES  # importing optim registers the schedules

    name = OmegaConf.select(cfg, "train.lr_schedule", default=None)
    if name is not None and name not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule={name!r} must be one of {', '.join(LR_SCHEDULES.names())}")


def _check_grad_accum(cfg: DictConfig) -> None:
    from ..training.step import micro_batch_size

    batch_size = OmegaConf.select(cfg, "train.batch_size", default=None)
    if batch_size is not None:
        try:
            micro_batch_size(batch_size, OmegaConf.select(cfg, "train.grad_accum_steps", default=1))
        except ValueError as error:
            raise ConfigError(str(error)) from error


def _check_num_classes(cfg: DictConfig) -> None:
    """model.num_classes is null, auto or a positive count (whether the data has labels is checked on building)."""
    from ..diffusion.conditioning import resolve_num_classes

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
    """The grid is a registered name (or a list); the schedule builds (terminal signal); eps needs alpha_bar_{T-1} > 0;
    the objective and its recipe work on the process; the sampler's grid exists on it."""
    from ..diffusion import grids
    from ..registry import GRIDS
    from .build import build_loss, build_objective, build_schedule

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
        _check_on_process(cfg, build_schedule(cfg), grid, grids, build_objective, build_loss)


def _check_on_process(cfg: DictConfig, process, grid, grids, build_objective, build_loss) -> None:
    """The objective, its recipe and the sampler's grid on this process (one line each when they cannot work)."""
    try:
        if OmegaConf.select(cfg, "objective.name", default=None) is not None:
            build_loss(cfg, process, build_objective(cfg))
        steps = OmegaConf.select(cfg, "sampler.steps", default=None)
        if grid is not None and (steps is not None or grids.is_list(grid)):
            grid = OmegaConf.to_container(grid) if not isinstance(grid, str) else grid
            grids.resolve(grid, process, steps or 1)
    except ValueError as error:
        raise ConfigError(str(error)) from error
