"""A trained run is checked before it is used: its weights against the architecture its saved config describes
(before any real allocation), its summary.json read for the W&B group only, and a stop signal during `sample`
or `evaluate` ends the command with one line (evaluate keeping what it had scored)."""
import json
import os
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_lab import DiffusionModelCIFAR
from diffusion_lab import evaluate as evaluate_command
from diffusion_lab import sample as sample_command
from diffusion_lab.config import trained as trained_module
from diffusion_lab.config.trained import load_trained
from diffusion_lab.train import train
from diffusion_lab.training import checkpoint, preemption
from tests.helpers import TINY, compose_config, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "logger=none",
                                                                          "train.steps=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-step run dir."""
    root = tmp_path_factory.mktemp("trained") / "run"
    train(compose_config(FAST), root)
    return root


def edited(run, tmp_path, edit):
    """A copy of the run's checkpoint changed by `edit(state)`, in a run dir of its own."""
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    edit(state)
    path = tmp_path / "edited" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    checkpoint.save(path, state)
    return path


def set_config(key, value):
    def edit(state):
        cfg = OmegaConf.create(state["config"])
        OmegaConf.update(cfg, key, value)
        state["config"] = OmegaConf.to_container(cfg)
    return edit


def ema(edit_weights):
    return lambda state: edit_weights(state["train_step"]["ema"]["module"])


MISMATCHES = {
    "huge hidden_dims": (set_config("model.hidden_dims", [2048, 2048, 2048]), "another shape"),
    "foreign network": (ema(lambda w: w.clear() or w.update(DiffusionModelCIFAR(8, 1, [32, 32]).state_dict())),
                        "unknown weights"),
    "unbuildable config": (set_config("model.name", "cifar"), "describes a model that cannot be built"),
    "unknown weight": (ema(lambda w: w.update({"extra.weight": torch.zeros(3)})), "unknown weights (first extra.weight)"),
    "missing weight": (ema(lambda w: w.pop(next(iter(w)))), "weights missing"),
    "other shape": (ema(lambda w: w.update({k: torch.zeros(2) for k in list(w)[:1]})), "is [2] where"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_weights_that_do_not_fit_the_saved_config_are_refused_before_the_model_is_built(run, tmp_path, monkeypatch,
                                                                                         case):
    edit, words = MISMATCHES[case]
    path = edited(run, tmp_path, edit)
    built = []
    real_build = trained_module.build_model
    monkeypatch.setattr(trained_module, "build_model",
                        lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    with pytest.raises(checkpoint.CheckpointError) as error:
        load_trained(path, torch.device("cpu"))
    message = str(error.value)
    assert "\n" not in message and str(path) in message and words in message, message
    assert all(p.is_meta for model in built for p in model.parameters()), "nothing real was allocated"


def test_sample_refuses_a_mismatched_checkpoint_with_one_line(run, tmp_path, capsys):
    path = edited(run, tmp_path, set_config("model.hidden_dims", [2048, 2048, 2048]))
    code, _, err = run_main("diffusion_lab.sample", [f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'out'}"],
                            tmp_path, capsys)
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error: ") and "another shape" in err, err


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_a_damaged_summary_json_is_ignored_with_a_warning(run, tmp_path, capsys, content):
    path = edited(run, tmp_path, lambda state: None)
    (path.parent.parent / "summary.json").write_text(content)
    trained = load_trained(path, torch.device("cpu"))
    err = capsys.readouterr().err
    assert trained.source["group"] is None and trained.step == 1
    assert err.count("\n") == 1 and err.startswith("warning: ignoring") and "summary.json" in err, err


def signal_self(signum):
    """Send `signum` to this process and wait until its handler has run (it raises, so this never returns).
    Without a handler of the command's own the signal would end pytest itself: that fails here instead."""
    assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler), "no stop handler"
    os.kill(os.getpid(), signum)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise AssertionError(f"{signal.Signals(signum).name} was not handled")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sample_stops_on_a_signal_with_one_line(run, tmp_path, capsys, monkeypatch, signum):
    monkeypatch.setattr(sample_command, "generate", lambda *a, **k: signal_self(signum))
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest was started in the background (`cmd &`)
    code, _, err = run_main("diffusion_lab.sample", [f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'out'}"],
                            tmp_path, capsys)
    assert code == 128 + signum and err.strip().count("\n") == 0, err
    assert signal.Signals(signum).name in err and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGINT) is before, "the handlers are restored"


def test_evaluate_stopped_keeps_the_settings_it_had_scored(run, tmp_path, capsys, monkeypatch):
    real_score, scored = evaluate_command.score, []

    def score(*args, **kwargs):
        if len(scored) == 1:
            signal_self(signal.SIGINT)
        scored.append(real_score(*args, **kwargs))
        return scored[-1]

    monkeypatch.setattr(evaluate_command, "score", score)
    out = tmp_path / "out"
    code, _, err = run_main("diffusion_lab.evaluate", [f"checkpoint={run}", f"hydra.run.dir={out}", "num_samples=8",
                                                       "batch_size=8", "eval.feature_extractor=small",
                                                       "samplers=[{name:ddim,steps:2},{name:ddim,steps:3}]"],
                            tmp_path, capsys)
    last = err.strip().splitlines()[-1]  # after the sampling progress bars
    assert code == 130 and "Traceback" not in err and "SIGINT" in last and "1 of 2" in last, err
    saved = json.loads((out / "fid_vs_cost.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in saved["rows"]] == [("ddim", 2)] and saved["stopped_by"] == "SIGINT"
    assert (out / "fid_vs_cost.csv").read_text().count("\n") == 2, "header and the one scored row"
