"""Every command writes what it printed into its run dir's log: each stdout line and the `error:` line are in
`<run dir>/<command>.log`; without a terminal the console gets plain lines (no carriage returns) and no
Hydra-formatted `[date][logger][LEVEL]` line. The commands run in this process (Hydra included)."""
import re
import signal

import pytest
from PIL import Image

from diffusion_lab import console
from diffusion_lab.train import train
from diffusion_lab.training.preemption import Preemption
from tests.helpers import TINY, compose_config, run_main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [o for o in TINY if not o.startswith(("train.steps", "eval."))] + ["eval.every=0", "train.steps=2"]
RAW_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (no W&B)."""
    path = tmp_path_factory.mktemp("runs") / "run"
    train(compose_config([*FAST, "logger=none"]), path)
    return path


def assert_logged(out: str, err: str, log_file):
    """Every printed line (stdout, and stderr's error line) is in the log; the console has plain lines only."""
    text = log_file.read_text()
    printed = [line.strip() for line in out.splitlines() if line.strip()]
    printed += [line.strip() for line in err.splitlines() if line.startswith("error: ")]
    assert printed, "the command printed something"
    missing = [line for line in printed if line not in text]
    assert not missing, f"printed but not in {log_file.name}: {missing}"
    assert "\r" not in out + err, "no progress bar (carriage returns) without a terminal"
    assert not any(RAW_LOG_LINE.match(line) for line in out.splitlines()), out
    return text


def test_train_log_has_the_wandb_hint_and_every_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run_main("diffusion_lab.train", [*FAST, f"hydra.run.dir={run_dir}"], tmp_path, capsys)
    assert code == 0, err[-3000:]
    text = assert_logged(out, err, run_dir / "train.log")
    assert "wandb sync" in text and "done: 2 steps" in text


def test_train_log_has_the_error_that_stopped_the_run(tmp_path, capsys):
    images = tmp_path / "broken"
    images.mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(images / "0.png")  # one readable image: the folder check passes
    for i in range(1, 20):
        (images / f"{i}.png").write_bytes(b"this is not a png")
    run_dir = tmp_path / "run"
    code, out, err = run_main("diffusion_lab.train", [*FAST, "logger=none", "data=folder", f"data.root={images}",
                                                      "data.image_size=8", "train.batch_size=4",
                                                      f"hydra.run.dir={run_dir}"], tmp_path, capsys)
    assert code == 2 and "cannot read image" in err, err[-3000:]
    assert "error: cannot read image" in assert_logged(out, err, run_dir / "train.log")


def test_the_signal_line_is_in_the_log(tmp_path, capsys):
    log_file = console.log_to(tmp_path, "train")
    with Preemption() as stop:
        stop._handle(signal.SIGTERM, None)
    console.close()
    assert "SIGTERM received: stopping after this step" in capsys.readouterr().err
    assert "SIGTERM received: stopping after this step (or FID batch) and writing a checkpoint" in log_file.read_text()


def test_sample_log(run, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_main("diffusion_lab.sample", [f"checkpoint={run}", "sampler=ddim", "sampler.steps=3",
                                                       "num_samples=10", "batch_size=4", f"hydra.run.dir={out_dir}"],
                              tmp_path, capsys)
    assert code == 0, err[-3000:]
    text = assert_logged(out, err, out_dir / "sample.log")
    assert "sample 3/3" in out and "wrote " in text


def test_evaluate_log_has_the_fid_results_with_steps_and_nfe(run, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run_main("diffusion_lab.evaluate", [f"checkpoint={run}", "samplers=[{name:heun,steps:2}]",
                                                         "num_samples=16", "batch_size=8", "eval.feature_extractor=small",
                                                         f"hydra.run.dir={out_dir}"], tmp_path, capsys)
    assert code == 0, err[-3000:]
    text = assert_logged(out, err, out_dir / "evaluate.log")
    assert "heun, 2 steps, 3 NFE: FID " in text
    assert (out_dir / "grid_heun_2steps_3nfe.png").is_file()


def test_sampler_lab_log_and_run_dir_suffix(tmp_path, capsys):
    code, out, err = run_main("diffusion_lab.sampler_lab", ["sampler=ddim", "nfe=[2]", "n=200", "projections=16"],
                              tmp_path, capsys)
    assert code == 0, err[-3000:]
    [run_dir] = (tmp_path / "outputs" / "sampler_lab").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d-[0-9a-f]{4}", run_dir.name), run_dir.name
    assert "ddim" in assert_logged(out, err, run_dir / "sampler_lab.log")


def test_compare_log(run, tmp_path, capsys):
    from diffusion_lab.evaluation.compare import main

    main([str(run), "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert "wrote " in assert_logged(out, err, tmp_path / "cmp" / "compare.log")


def test_metric_check_log(tmp_path, capsys):
    from diffusion_lab.evaluation.metric_check import main

    main(["--n", "20", "--extractors", "small", "--out", str(tmp_path / "mc")])
    out, err = capsys.readouterr()
    assert "metric_check.md" in assert_logged(out, err, tmp_path / "mc" / "metric_check.log")
