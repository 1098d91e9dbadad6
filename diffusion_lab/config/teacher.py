"""The teacher of a consistency run (`train.teacher=RUN_DIR`): a trained diffusion run, checked against the
student and attached to its loss (distillation) and/or copied into its weights (`train.init_from_teacher`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..diffusion.consistency import denoiser
from ..errors import ConfigError
from ..training import run_dir as run_dirs
from ..training.checkpoint import architecture_differences
from .trained import Trained, load_trained


def _node(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key, default=None)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def space_of(latent) -> str:
    return "pixel space" if latent is None else f"the latent space of {latent.describe()}"


def check_teacher(cfg: DictConfig, teacher: Trained, student: torch.nn.Module, image_shape: tuple,
                  source: Path, latent=None) -> None:
    """One-line ConfigError when the teacher cannot teach this student: other data, image shape or latent space,
    other classes, another process, a consistency model itself, or weights that do not fit an init from it."""
    t_cfg, where = teacher.config, f"train.teacher={source}"
    shape, own = ("x".join(map(str, s)) for s in (teacher.image_shape, image_shape))
    if t_cfg.objective.name == "consistency":
        raise ConfigError(f"{where} is a consistency model; a teacher is a diffusion run (its ODE is distilled)")
    theirs, ours = (None if s is None else s.codec.identity["sha256"] for s in (teacher.latent, latent))
    if theirs != ours:
        raise ConfigError(f"{where} diffuses in {space_of(teacher.latent)}, this run in {space_of(latent)}: a student "
                          f"shares its teacher's latent space (set latent= as the teacher's run did)")
    if t_cfg.data.name != cfg.data.name or tuple(teacher.image_shape) != tuple(image_shape):
        raise ConfigError(f"{where} was trained on data={t_cfg.data.name} at {shape}; this run is data={cfg.data.name} "
                          f"at {own}")
    num_classes = getattr(student, "num_classes", None)
    if getattr(teacher.model, "num_classes", None) != num_classes:
        raise ConfigError(f"{where} has num_classes={getattr(teacher.model, 'num_classes', None)}; this run's model "
                          f"has {num_classes}: a teacher and its student condition on the same classes")
    if _node(t_cfg, "schedule") != _node(cfg, "schedule"):
        raise ConfigError(f"{where} runs on schedule={t_cfg.schedule.name} {_node(t_cfg, 'schedule')}; a student "
                          f"shares its teacher's process: set schedule={t_cfg.schedule.name} with the same values")
    if cfg.train.init_from_teacher:
        differences = architecture_differences(student.state_dict(), teacher.model.state_dict())
        if differences:
            raise ConfigError(f"{where}'s network differs from this run's ({differences[0]}); train.init_from_teacher"
                              f"=true starts from its weights: use model={t_cfg.model.name} with its values, or "
                              f"train.init_from_teacher=false")
        if t_cfg.objective.name != cfg.objective.base:
            raise ConfigError(f"{where} predicts with objective={t_cfg.objective.name}; starting from its weights "
                              f"needs objective.base={t_cfg.objective.name} (or train.init_from_teacher=false)")
    elif cfg.objective.method == "ect":
        raise ConfigError("objective.method=ect tunes the teacher's weights: it needs train.init_from_teacher=true")


def attach_teacher(cfg: DictConfig, parts, device: torch.device) -> Optional[Dict[str, Any]]:
    """Load train.teacher, check it, copy its EMA weights into the student (init_from_teacher) and give a cd
    loss its denoiser; returns what the summary records of it (None without a teacher)."""
    teacher_dir = OmegaConf.select(cfg, "train.teacher", default=None)
    if teacher_dir is None:
        return None
    source = run_dirs.checkpoint_file(Path(str(teacher_dir)))
    try:
        teacher = load_trained(source, device)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"train.teacher={teacher_dir}: {str(error).splitlines()[0]}") from error
    check_teacher(cfg, teacher, parts.model, parts.image_shape, source, parts.latent)
    teacher.model.requires_grad_(False)
    if cfg.train.init_from_teacher:
        parts.model.load_state_dict(teacher.model.state_dict())
    if cfg.objective.method == "cd":
        parts.loss.teacher = denoiser(teacher.objective.network(teacher.model, parts.schedule), teacher.objective,
                                      parts.schedule)
    return {"checkpoint": str(source), "run_dir": str(source.parent.parent), "step": teacher.step,
            "objective": teacher.config.objective.name, "schedule": teacher.config.schedule.name,
            "sampler": _node(teacher.config, "sampler"), "init_from_teacher": bool(cfg.train.init_from_teacher)}
