"""Run logs: full records in train.log, short console lines, and plain progress lines without a terminal."""
import logging
import re

import pytest

from diffusion_lab.training import progress
from tests.helpers import TINY, run_cli

LONG = ("FID: clean-fid's Inception weights could not be loaded (HTTPError: 403). clean-fid needs the file "
        "/root/.cache/inception.pt; download it from https://example.org/inception.pt and place it there. "
        "Using the 'small' random net instead: these FIDs are NOT Inception FIDs.")


def test_long_warning_is_one_console_line_and_whole_in_train_log(tmp_path, capsys):
    log_file = progress.log_to(tmp_path)
    logging.getLogger("diffusion_lab.evaluation.fid").warning(LONG)
    progress.log.info("short line", extra=progress.FILE_ONLY)
    progress.log.info("a short message")
    out = capsys.readouterr().out.splitlines()
    assert out == [f"warning: FID: clean-fid's Inception weights could not be loaded (HTTPError: 403). clean-fid "
                   f"needs the file /root/.cache/inception.pt; download it from https://example.org/inception.pt and "
                   f"place it there (details in {log_file})", "a short message"]  # the explanation is left out
    text = log_file.read_text()
    assert LONG in text and "short line" in text and "a short message" in text


def test_report_line_has_step_loss_lr_rate_and_eta(tmp_path, capsys):
    progress.log_to(tmp_path)
    with progress.Progress(total=10, terminal=False) as bar:
        line = bar.report(4, 0.123456, 2e-4, 512.4)
    assert re.fullmatch(r"step 4/10 \| loss 0\.1235 \| lr 2\.00e-04 \| 512 img/s \| eta \d+:\d\d:\d\d", line)
    assert capsys.readouterr().out.strip() == line


@pytest.mark.slow
def test_training_without_terminal_prints_a_line_per_log_interval(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("diffusion_lab.train", [*TINY, "eval.every=0", "logger=none", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)  # stdout is a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all(" | loss " in line and " | lr " in line and " img/s | eta " in line for line in lines)
    log_text = (run_dir / "train.log").read_text()
    assert all(line in log_text for line in lines) and "done: 6 steps" in log_text
    assert "train:" not in result.stderr, "no progress bar without a terminal"
