"""`python -m diffusion_lab.evaluate checkpoint=PATH`: FID against sampling cost for one checkpoint.

Every sampler setting in `samplers` draws `num_samples` images from the same starting noise; the
result is a table and a plot of FID against NFE (model evaluations) and against wall time. For a class-conditional
checkpoint, `guidance_scales=[0,1,2,4]` scores every setting at each guidance scale w on labels cycling through
the classes, with the digits classifier's accuracy on the asked labels (digits only), and plots FID, accuracy and
precision/recall against w. Every row carries KID (mean and std over subsets) and improved precision/recall beside
FID, with their floors.
For a train.ema=power run, `ema_lengths=[0.05,0.1]` instead scores the EMA of each length sigma_rel, rebuilt from
the run's snapshots (`training/posthoc_ema`): ema_fid.csv/png and, with `save_best_ema`, posthoc_ema.pt.
"""
from __future__ import annotations

from .config.early import answer_early

answer_early("evaluate", "evaluate")  # --help and shell completion answer here, before torch is imported

import csv
import io
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import console, files
from .config import CONF_DIR
from .config.build import resolve_device
from .config.preflight import checked_main, run_command
from .config.trained import (check_steps, generate, load_trained, make_fid_evaluator, sampler_notice,
                             sampler_settings)
from .data.images import save_grid
from .diffusion import guidance
from .diffusion.conditioning import balanced_labels
from .diffusion.samplers import build_sampler, num_evaluations, num_steps, setting_label, steps_for
from .evaluation.features import class_accuracy
from .evaluation.plots import plot_ema_fid, plot_fid_vs_cost, plot_guidance
from .evaluation.set_metrics import describe
from .training import checkpoint, posthoc_ema, preemption
from .training import run_dir as run_dirs
from .training.loggers import log_linked_run


def guidance_scales(cfg: DictConfig, labels: Optional[torch.Tensor]) -> List[Optional[float]]:
    """The swept w (``guidance_scales``), or [None] (each sampler setting's own) when not swept."""
    if cfg.guidance_scales is None:
        return [None]
    if labels is None:
        raise ValueError("guidance_scales needs a class-conditional checkpoint (model.num_classes=null)")
    if not cfg.guidance_scales or any(w < 0 for w in cfg.guidance_scales):
        raise ValueError(f"guidance_scales={list(cfg.guidance_scales)} must be a non-empty list of values >= 0")
    return [float(w) for w in cfg.guidance_scales]


def file_tag(label: str) -> str:
    """A setting's label as a file name part: `heun, 10 steps, 19 NFE` -> `heun_10steps_19nfe`."""
    return "_".join(part.replace(" ", "").replace(":", "-").lower() for part in label.split(", "))


def score(cfg: DictConfig, trained, evaluator, settings: Dict, labels: Optional[torch.Tensor], run_dir: Path,
          device: torch.device, model: str = "checkpoint", note: str = "") -> Dict:
    """FID (and, for a conditional model with a classifier, the accuracy on the asked labels) of one setting;
    `model` says whose: the checkpoint's, or its teacher's (scored beside a consistency model); `note` starts
    its console line."""
    settings = dict(settings)
    name = settings.pop("name")
    started = time.perf_counter()
    images = generate(trained, build_sampler(name, **settings), cfg.num_samples, cfg.batch_size, cfg.seed, device,
                      labels=labels)
    seconds = time.perf_counter() - started
    result = evaluator.score(images)
    process = trained.schedule
    nfe, steps = num_evaluations(name, settings, process), num_steps(name, settings, process)
    label = ("teacher: " if model == "teacher" else "") + setting_label(name, settings, process)
    w = settings.get("guidance_scale")
    classifier = evaluator.extractor if hasattr(evaluator.extractor, "logits") else None
    accuracy = class_accuracy(classifier, images, labels) if labels is not None and classifier is not None else None
    save_grid(images[:64], run_dir / f"grid_{file_tag(label)}.png")
    beside = describe(result.metrics(), {})
    console.info(f"{note}{label}: FID {result.value:.4f} (floor {result.floor:.4f})" + (f", {beside}" if beside else "")
                 + (f", accuracy {accuracy:.4f}" if accuracy is not None else "") + f", {seconds:.1f}s")
    metrics = {k: v for k, v in result.metrics().items() if k not in result.scores}  # fid, kid, ..., their floors
    return {"model": model, "sampler": name, "steps": steps, "nfe": nfe, "guidance_scale": w, "setting": label,
            **metrics, "accuracy": accuracy, "seconds": seconds, "seconds_per_image": seconds / cfg.num_samples,
            "settings": json.dumps(settings), "label": result.label()}


def write_rows(run_dir: Path, rows: List[Dict], label: str, evaluator, cfg: DictConfig, trained,
               stopped_by: Optional[str] = None) -> None:
    """fid_vs_cost.csv and fid_vs_cost.json (atomically); `stopped_by` names the signal that ended a sweep early."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files.write_text(run_dir / "fid_vs_cost.csv", text.getvalue())
    files.write_json(run_dir / "fid_vs_cost.json", {"label": label, "floor": evaluator.floor,
                                                     "floor_n": evaluator.floor_n, **evaluator.floors(),
                                                     "checkpoint": str(cfg.checkpoint),
                                                     "teacher": OmegaConf.select(trained.config, "train.teacher",
                                                                                 default=None),
                                                     "step": trained.step, "stopped_by": stopped_by, "rows": rows})


def score_all(cfg: DictConfig, trained, evaluator, jobs: List[Dict], labels: Optional[torch.Tensor],
              run_dir: Path, device: torch.device) -> tuple:
    """(rows, FID label) of every job; a stop signal first writes the rows scored so far, then ends the command."""
    rows: List[Dict] = []
    try:
        for model, settings in jobs:
            rows.append(score(cfg, model or trained, evaluator, settings, labels, run_dir, device,
                              "checkpoint" if model is None else "teacher"))
    except preemption.Stopped as stopped:
        if rows:
            write_rows(run_dir, *_table(rows), evaluator, cfg, trained, stopped_by=stopped.name)
        stopped.note = (f"fid_vs_cost.csv/json hold the {len(rows)} of {len(jobs)} settings scored" if rows
                        else f"none of the {len(jobs)} settings was scored")
        raise
    return _table(rows)


def _table(rows: List[Dict]) -> tuple:
    """The rows without their FID label, and the label (that of the last row)."""
    return [{k: v for k, v in r.items() if k != "label"} for r in rows], rows[-1]["label"]


def teacher_jobs(cfg: DictConfig, trained, device: torch.device) -> List[tuple]:
    """(teacher, settings) at each of `teacher_nfe` with the teacher's own sampler, when the checkpoint is a
    consistency model distilled or tuned from a teacher run (its train.teacher): the baseline beside it."""
    source = OmegaConf.select(trained.config, "train.teacher", default=None)
    if source is None or not cfg.teacher_nfe:
        return []
    try:
        teacher = load_trained(Path(str(source)), device)
    except (OSError, ValueError, KeyError) as error:
        console.info(f"teacher {source} not scored: {str(error).splitlines()[0]}")
        return []
    name = teacher.config.sampler.name
    own = {k: v for k, v in OmegaConf.to_container(teacher.config.sampler).items() if k not in guidance.KEYS}
    base = {**sampler_settings(OmegaConf.create({"name": name})), **own}  # guided only if asked, as every entry
    return [(teacher, {**base, "steps": steps_for(name, nfe)}) for nfe in cfg.teacher_nfe]


def ema_sources(cfg: DictConfig) -> Optional[tuple]:
    """(checkpoint state, its run's snapshots) when ema_lengths is set, else None; a run without snapshots is
    one line (ConfigError), before any sample is drawn."""
    if cfg.ema_lengths is None:
        return None
    path = run_dirs.checkpoint_file(Path(cfg.checkpoint))
    state = checkpoint.load(path)
    return state, posthoc_ema.run_snapshots(path, state)


def ema_point(scorer: Callable, every: List[Dict], model: torch.nn.Module, snapshots: list, sigma_rel: float,
              run_dir: Path) -> tuple:
    """(rows, weights, coefficients) of one EMA length: rebuilt from the snapshots, loaded into the model, scored
    with every sampler setting (its grids in ema_<sigma_rel>/)."""
    started = time.perf_counter()
    weights, coefficients = posthoc_ema.reconstruct(snapshots, sigma_rel, model.state_dict())
    seconds = time.perf_counter() - started
    model.load_state_dict(weights)
    (run_dir / f"ema_{sigma_rel:g}").mkdir(exist_ok=True)
    rows = []
    for settings in every:
        note = f"sigma_rel {sigma_rel:g} (rebuilt in {seconds:.2f}s), "
        row = scorer(settings, run_dir / f"ema_{sigma_rel:g}", note)
        rows.append({"sigma_rel": sigma_rel, "setting": row["setting"], "fid": row["fid"],
                     "fid_floor": row["fid_floor"],
                     "seconds": row["seconds"], "reconstruction_seconds": seconds, "label": row["label"]})
    return rows, weights, coefficients


def ema_scores(cfg: DictConfig, scorer: Callable, every: List[Dict], model: torch.nn.Module, snapshots: list,
               run_dir: Path) -> tuple:
    """(rows, best) over ema_lengths, best = (FID, sigma_rel, weights, coefficients) by the first sampler setting;
    a stop signal first writes the points scored so far to ema_fid.csv, then ends the command."""
    rows, best = [], None
    try:
        for sigma_rel in map(float, cfg.ema_lengths):
            point, weights, coefficients = ema_point(scorer, every, model, snapshots, sigma_rel, run_dir)
            rows += point
            if best is None or point[0]["fid"] < best[0]:
                best = (point[0]["fid"], sigma_rel, weights, coefficients)
    except preemption.Stopped as stopped:
        if rows:
            files.write_csv(run_dir / "ema_fid.csv", rows, [k for k in rows[0] if k != "label"])
        stopped.note = f"ema_fid.csv holds the {len(rows)} points scored" if rows else "no EMA length was scored"
        raise
    return rows, best


def ema_sweep(cfg: DictConfig, scorer: Callable, every: List[Dict], trained, evaluator, run_dir: Path,
              sources: tuple) -> List[Dict]:
    """Every EMA length of ema_lengths scored: ema_fid.csv, ema_fid.png and (save_best_ema) posthoc_ema.pt, the
    checkpoint holding the length with the lowest FID of the first sampler setting."""
    state, snapshots = sources
    scored, best = ema_scores(cfg, scorer, every, trained.model, snapshots, run_dir)
    rows, label = _table(scored)
    files.write_csv(run_dir / "ema_fid.csv", rows, list(rows[0]))
    picture = plot_ema_fid(rows, run_dir / "ema_fid.png", f"{label}, post-hoc EMA at step {trained.step}",
                           floor=(evaluator.floor, evaluator.floor_n), tracked=snapshots[-1].sigma_rels)
    console.info(f"wrote {picture} and {run_dir / 'ema_fid.csv'}")
    if cfg.save_best_ema:
        fid, sigma_rel, weights, coefficients = best
        path = run_dir / "posthoc_ema.pt"
        checkpoint.save(path, posthoc_ema.posthoc_checkpoint(state, weights, sigma_rel, coefficients, snapshots))
        console.info(f"wrote {path}: the EMA of sigma_rel {sigma_rel:g} (FID {fid:.4f} with {rows[0]['setting']}); "
                     f"sample it with python -m diffusion_lab.sample checkpoint={path}")
    return rows


def evaluate(cfg: DictConfig, run_dir: Path) -> List[Dict]:
    """One FID per sampler setting (and guidance scale); writes fid_vs_cost.{csv,json,png}, a grid per setting
    and, when guidance_scales is swept, guidance.png (FID and classifier accuracy against w)."""
    device = resolve_device(cfg.device)
    trained = load_trained(cfg.checkpoint, device, data=cfg.get("data"))  # data: a diffusers: checkpoint's FID data
    sources = ema_sources(cfg)
    every = [sampler_settings(entry) for entry in cfg.samplers]
    for settings in every:
        check_steps(settings, trained)
    for name in dict.fromkeys(settings["name"] for settings in every):
        notice = sampler_notice(trained, name)
        if notice:
            console.info(notice)
    labels = balanced_labels(trained.model, cfg.num_samples)
    scales = guidance_scales(cfg, labels)
    evaluator = make_fid_evaluator(cfg.eval, trained.config, device, cfg.num_samples)
    if not evaluator.enabled:
        raise ValueError(f"FID is disabled: {evaluator.disabled_reason}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if sources is not None:
        scorer = lambda settings, folder, note: score(cfg, trained, evaluator, settings, labels, folder,  # noqa: E731
                                                      device, note=note)
        return ema_sweep(cfg, scorer, every, trained, evaluator, run_dir, sources)
    jobs = [(None, {**settings, **({} if w is None else {"guidance_scale": w})}) for settings in every for w in scales]
    jobs += teacher_jobs(cfg, trained, device)
    rows, label = score_all(cfg, trained, evaluator, jobs, labels, run_dir, device)
    write_rows(run_dir, rows, label, evaluator, cfg, trained)
    title, floor = f"{label}, checkpoint step {trained.step}", (evaluator.floor, evaluator.floor_n)
    pictures = {"fid_vs_cost": plot_fid_vs_cost(rows, run_dir / "fid_vs_cost.png", title, floor=floor)}
    if scales != [None]:
        pictures["guidance"] = plot_guidance(rows, run_dir / "guidance.png", title, floor=floor,
                                             floors=evaluator.floor_metrics)
    values = {f"{key}/{file_tag(r['setting'])}": r[key] for r in rows for key in ("fid", "kid", "precision", "recall")
              if r[key] is not None}
    log_linked_run(OmegaConf.to_container(trained.config), trained.source, "evaluate", run_dir,
                   OmegaConf.to_container(cfg), {**values, "fid_floor": evaluator.floor, **evaluator.floors(),
                                                 "fid_label": label},
                   pictures)
    console.info(label)
    console.info(f"wrote {', '.join(str(p) for p in pictures.values())} and {run_dir / 'fid_vs_cost.csv'}")
    return rows


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    with preemption.stop_on_signal("evaluate"):
        run_command(evaluate, cfg)


def main() -> None:
    checked_main(hydra_main, config_name="evaluate")


if __name__ == "__main__":
    main()
