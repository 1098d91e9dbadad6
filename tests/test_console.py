"""Console lines never lose their actionable part: paths, commands and run dirs are never cut; a long message
loses its explaining sentences instead, and the log file keeps it whole."""
import logging

from diffusion_lab import console

DEEP = "/scratch/someone/projects/diffusion_lab/outputs/multirun/2026-12-02/18-00-00-ab12/3-schedule_linear-model.dropout_0.1"


def _console_lines(tmp_path, capsys, message, level=logging.INFO):
    log_file = console.log_to(tmp_path, "test")
    console.log.log(level, message)
    console.close()
    assert message in log_file.read_text()
    return capsys.readouterr().out.splitlines(), log_file


def test_the_resume_command_after_a_stop_is_never_cut(tmp_path, capsys):
    last = f"{DEEP}/checkpoints/last.pt"
    message = f"stopped by SIGINT at step 400: wrote {last}; continue with train.resume=auto or train.resume={last}"
    lines, _ = _console_lines(tmp_path, capsys, message)
    assert lines == [message]


def test_the_start_line_keeps_the_whole_run_dir(tmp_path, capsys):
    message = (f"diffusion_lab | device cpu | world size 1 | model base 1.23M params | data digits 1438 images 1x8x8 "
               f"| run dir {DEEP}")
    lines, _ = _console_lines(tmp_path, capsys, message)
    assert lines == [message] and lines[0].endswith("model.dropout_0.1")


def test_a_long_explanation_is_dropped_by_whole_sentences_never_mid_word(tmp_path, capsys):
    message = ("step 500: FID 12.3456 (digits classifier features, n=1000, floor 1.2345). The floor is the FID of "
               "held-out real images at the same n, so values near it mean the samples are as good as this metric "
               "can tell. Scores of different extractors or sample counts are not comparable. Reference statistics: "
               f"{DEEP}/fid_stats.npz.")
    lines, log_file = _console_lines(tmp_path, capsys, message)
    assert len(lines) == 1
    kept = lines[0].removesuffix(f" (details in {log_file})")
    assert kept != lines[0], "says where the whole message is"
    assert kept.startswith("step 500: FID 12.3456 (digits classifier features, n=1000, floor 1.2345)")
    assert f"{DEEP}/fid_stats.npz" in kept and "not comparable" not in kept
    assert {w.rstrip(".") for w in kept.split()} <= {w.rstrip(".") for w in message.split()}, "no word is cut"


def test_a_table_line_is_printed_as_it_is(tmp_path, capsys):
    row = "heun".ljust(20) + " ".join(f"{v:9.4f}" for v in range(20))
    log_file = console.log_to(tmp_path, "test")
    console.say(f"header\n{row}")
    console.close()
    assert capsys.readouterr().out.splitlines() == ["header", row]
    assert row in log_file.read_text()
