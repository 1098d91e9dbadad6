"""Config composition and CLI helpers shared by the end-to-end tests."""
from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from diffusion_lab.config import CONF_DIR

REPO = CONF_DIR.parent.parent

# A run small enough for a few seconds on a CPU that still exercises every artefact.
TINY = [
    "model.hidden_dims=[16,32]", "model.time_dim=32", "train.steps=6", "train.batch_size=16",
    "train.log_every=2", "train.sample_every=3", "train.checkpoint_every=3", "train.num_grid_samples=4",
    "train.warmup_steps=2", "sampler.steps=5", "eval.every=3", "eval.num_samples=64", "eval.batch_size=32",
]


def compose_config(overrides: Sequence[str] = (), config_name: str = "config"):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_cli(module: str, args: List[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m module args` in `cwd` with W&B offline; returns the completed process."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_tiny_cifar(root: Path, per_batch: int = 2) -> np.ndarray:
    """The CIFAR-10 python format with ``per_batch`` images per file; returns the train data [N, 3072].

    The real files are Python-2 pickles whose keys are py2 ``str``; torchvision unpickles them with
    ``encoding="latin1"`` and so sees ``str`` keys ("data", "labels", ...). Seen with
    ``encoding="bytes"`` they are b"data" etc. A Python-3 pickle of b"data" would stay bytes under
    latin1, so the fixture writes the keys as ``str``: exactly what torchvision's code reads.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = []
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        if name == "data_batch_1":
            data[0, :] = 255  # first image all white
            data[1, :] = 0  # second image all black
            data[1, 0] = 255  # ... except red channel of pixel (0, 0)
        if name.startswith("data_batch"):
            train.append(data)
        entry = {
            "batch_label": f"tiny {name}".encode(),
            "labels": [int(v) for v in rng.integers(0, 10, size=per_batch)],
            "data": data,
            "filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {"num_cases_per_batch": per_batch, "label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return np.concatenate(train)


def read_wandb_records(path: Path) -> list:
    """The records of an offline run's .wandb file, parsed with wandb's own protobuf ``Record``.

    The file is wandb's header (":W&B", magic 0xBEE1, version) followed by the LevelDB log format that wandb
    writes: 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last); a block's last < 7 bytes are padding.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a .wandb file")
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding up to the end of a block
            pos += block - pos % block if pos % block else 0
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def run_main(module: str, args: List[str], cwd: Path, capsys) -> tuple:
    """Run `python -m module args` in this process (Hydra included); returns (exit code, stdout, stderr)."""
    import importlib

    main = importlib.import_module(module).main
    old_argv, old_cwd, old_logging = sys.argv, os.getcwd(), _logging_state()
    sys.argv, code = [module, *args], 0
    os.chdir(cwd)
    capsys.readouterr()
    try:
        main()
    except SystemExit as exit:
        code = exit.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        GlobalHydra.instance().clear()
        _restore_logging(old_logging)
    out, err = capsys.readouterr()
    return code, out, err


def _logging_state() -> dict:
    loggers = [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]
    return {logger: (list(logger.handlers), logger.level) for logger in loggers}


def _restore_logging(state: dict) -> None:
    """Undo Hydra's in-process logging setup: its handlers hold pytest's capture streams, closed after the test."""
    for logger in [logging.getLogger()] + [v for v in logging.Logger.manager.loggerDict.values()
                                           if isinstance(v, logging.Logger)]:
        logger.handlers[:], logger.level = state.get(logger, ([], logging.NOTSET))


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A .pt whose pickle would create `marker` if it were loaded with code execution."""
    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "model": Payload(), "train_step": {}, "config": {}, "image_shape": (1, 8, 8)}, path)
    return path


def wait_for_step(metrics: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Wait until a training subprocess has logged `step` in its metrics.jsonl (it must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run did not reach step {step}: {proc.communicate()[1][-2000:] if proc.poll() else ''}")
