"""An optimising sweeper gets the run's objective: `hydra_main` returns the best FID, else the final loss,
and `hydra/sweeper=optuna` (hydra-optuna-sweeper, a main dependency) minimises it out of the box."""
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from diffusion_lab.config import CONF_DIR
from diffusion_lab.train import hydra_main
from tests.helpers import TINY, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def run_task_function(overrides, run_dir):
    """Call the Hydra task function as Hydra does for one job: HydraConfig set, the hydra node split off."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, f"hydra.run.dir={run_dir}"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(run_dir.parent)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        return hydra_main(cfg)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize("fid", [True, False], ids=["best_fid", "final_loss"])
def test_hydra_main_returns_the_best_fid_else_the_final_loss(tmp_path, fid):
    overrides = [*TINY, "logger=none"] + ([] if fid else ["eval.every=0"])
    objective = run_task_function(overrides, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    if fid:
        assert summary["best_fid"] == min(v for _, v in summary["fid_history"]) and objective == summary["best_fid"]
    else:
        assert summary.get("best_fid") is None and objective == summary["final_loss"]
    assert isinstance(objective, float)


def test_the_optuna_sweeper_is_installed_and_minimises_by_default():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/sweeper=optuna"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert "Optuna" in cfg.hydra.sweeper._target_ and str(cfg.hydra.sweeper.direction).endswith("minimize")


@pytest.mark.slow
def test_optuna_sweep_minimises_the_returned_objective(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("diffusion_lab.train", [
        "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
        "train.lr=interval(1e-4,1e-3)", f"hydra.sweep.dir={sweep}", "logger=none", "eval.every=0",
        *[o for o in TINY if not o.startswith(("train.steps", "eval."))], "train.steps=2"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "setup plugin" not in result.stdout  # the storage layer's start-up chatter is silenced
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    assert len(trials) == 2
    best = min(trials, key=lambda s: s["final_loss"])
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == best["final_loss"]  # minimised, and exactly the value hydra_main returned
    lr = next(o for o in best["overrides"] if o.startswith("train.lr="))
    assert results.best_params["train.lr"] == pytest.approx(float(lr.split("=")[1]))
