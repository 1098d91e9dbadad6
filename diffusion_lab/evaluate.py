"""`python -m diffusion_lab.evaluate checkpoint=PATH`: FID against sampling cost for one checkpoint.

Every sampler setting in `samplers` draws `num_samples` images from the same starting noise; the
result is a table and a plot of FID against NFE (model evaluations) and against wall time.
"""
from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import hydra
from omegaconf import DictConfig, OmegaConf

from .build import resolve_device
from .config import CONF_DIR, HYDRA_FLAGS, check_overrides, run_command
from .data import save_grid
from .loggers import log_linked_run
from .plots import plot_fid_vs_cost
from .sample import check_steps, generate, load_trained, make_fid_evaluator
from .samplers import build_sampler, num_evaluations


def sampler_settings(entry: DictConfig) -> Dict:
    """A sampler option's defaults from conf/sampler/<name>.yaml, updated with the entry's values."""
    path = CONF_DIR / "sampler" / f"{entry.name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ValueError(f"unknown sampler '{entry.name}'; known: {known}")
    return OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), entry))


def evaluate(cfg: DictConfig, run_dir: Path) -> List[Dict]:
    """One FID per sampler setting; writes fid_vs_cost.{csv,json,png} and a grid per setting."""
    device = resolve_device(cfg.device)
    trained = load_trained(Path(cfg.checkpoint), device)
    every = [sampler_settings(entry) for entry in cfg.samplers]
    for settings in every:
        check_steps(settings, trained)
    evaluator = make_fid_evaluator(cfg.eval, trained.config, device, cfg.num_samples)
    if not evaluator.enabled:
        raise ValueError(f"FID is disabled: {evaluator.disabled_reason}")
    run_dir.mkdir(parents=True, exist_ok=True)
    rows, label = [], ""
    for settings in every:
        name = settings.pop("name")
        sampler = build_sampler(name, **settings)
        started = time.perf_counter()
        images = generate(trained, sampler, cfg.num_samples, cfg.batch_size, cfg.seed, device)
        seconds = time.perf_counter() - started
        result = evaluator.score(images)
        nfe = num_evaluations(name, settings, trained.schedule.num_timesteps)
        tag = f"{name}-{nfe}"
        save_grid(images[:64], run_dir / f"grid_{tag}.png")
        rows.append({"sampler": name, "nfe": nfe, "fid": result.value, "fid_floor": result.floor, "seconds": seconds,
                     "seconds_per_image": seconds / cfg.num_samples, "settings": json.dumps(settings)})
        label = result.label()
        print(f"{tag:>16}  NFE {nfe:5d}  FID {result.value:9.4f} (floor {result.floor:.4f})  {seconds:7.1f}s")
    with open(run_dir / "fid_vs_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "fid_vs_cost.json").write_text(json.dumps({"label": label, "floor": evaluator.floor,
                                                          "floor_n": evaluator.floor_n, "checkpoint": str(cfg.checkpoint),
                                                          "step": trained.step, "rows": rows}, indent=2))
    plot_fid_vs_cost(rows, run_dir / "fid_vs_cost.png", f"{label}, checkpoint step {trained.step}",
                     floor=(evaluator.floor, evaluator.floor_n))
    values = {f"fid/{r['sampler']}-{r['nfe']}": r["fid"] for r in rows}
    log_linked_run(OmegaConf.to_container(trained.config), trained.source, "evaluate", run_dir,
                   OmegaConf.to_container(cfg), {**values, "fid_floor": evaluator.floor, "fid_label": label},
                   {"fid_vs_cost": run_dir / "fid_vs_cost.png"})
    print(f"{label}\nwrote {run_dir / 'fid_vs_cost.png'} and fid_vs_cost.csv")
    return rows


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    run_command(evaluate, cfg)


def main() -> None:
    """Check every override before Hydra starts (one-line errors), then run."""
    if not HYDRA_FLAGS.intersection(sys.argv[1:]):
        check_overrides(sys.argv[1:], config_name="evaluate")
    hydra_main()


if __name__ == "__main__":
    main()
