"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models",
Sec. 3 and App. C): power-function averages tracked while training, snapshots of them in the run dir, and an
average of any other length reconstructed after training as the least-squares combination of the snapshots.

A power EMA with exponent gamma updates theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1) (t = 1, 2, ... updates; beta_1 = 0), so after t updates it is sum_tau w_t(tau)
theta_tau: its profile. Every average is linear in the weights, so a combination of snapshots with profiles
p_i is the average with profile sum_i x_i p_i; x is chosen to match the asked profile in least squares.
Snapshots are safetensors files (data only), written atomically.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import files
from ..errors import ConfigError

SNAPSHOT_DIR = "ema_snapshots"  # in the run dir: step_NNNNNNN.safetensors
SNAPSHOT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
MAX_SIGMA_REL = math.sqrt(1 / 12)  # sigma_rel at gamma = 0 (a uniform average); gamma > 0 below it
BUFFERS = "buffers"  # snapshot key prefix of the tracked module's buffers (copied, not averaged)


# ------------------------------------------------------------------------------------------------
# The power function: exponent, relative std, update and profile


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative std of a power EMA's profile: sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent of relative std sigma_rel in (0, sqrt(1/12)): the largest real root of
    gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {MAX_SIGMA_REL:.4f}) (gamma > 0)")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def power_beta(t: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1): the decay of update t (1-based; the first update copies the weights)."""
    return (1.0 - 1.0 / t) ** (gamma + 1)


def power_profile(t: float, gamma: float, taus: np.ndarray) -> np.ndarray:
    """w_t(tau) = (1 - beta_tau) prod_{s=tau+1..t} beta_s = (1 - beta_tau) (tau / t)^(gamma + 1): the weight of
    update tau's weights in the average after t updates (0 for tau > t), float64 without cancellation."""
    taus = np.asarray(taus, dtype=np.float64)
    with np.errstate(divide="ignore"):
        fresh = -np.expm1((gamma + 1) * np.log1p(-1.0 / taus))  # 1 - beta_tau
    return np.where(taus <= t, fresh * np.exp((gamma + 1) * np.log(taus / t)), 0.0)


def continuous_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """EDM2's closed form of int p_a p_b for continuous profiles p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
    [0, t]: (gamma_a + 1)(gamma_b + 1) / ((gamma_a + gamma_b + 1) max(t_a, t_b)) (t_a / t_b)^(gamma_b or -gamma_a)."""
    exponent = gamma_b if t_a < t_b else -gamma_a
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** exponent / ((gamma_a + gamma_b + 1) * max(t_a, t_b))


# ------------------------------------------------------------------------------------------------
# The least-squares fit


Profile = Tuple[int, float]  # (updates t, exponent gamma)


def gram(profiles: Sequence[Profile], target: Profile, chunk: int = 1 << 16) -> Tuple[np.ndarray, np.ndarray]:
    """(G, b): G_ij = sum_tau p_i(tau) p_j(tau), b_i = sum_tau p_i(tau) p_target(tau), summed exactly over the
    discrete updates in chunks of tau (float64; memory bounded by len(profiles) x chunk)."""
    n, end = len(profiles), max(t for t, _ in [*profiles, target])
    G, b = np.zeros((n, n)), np.zeros(n)
    for start in range(1, end + 1, chunk):
        taus = np.arange(start, min(start + chunk, end + 1), dtype=np.float64)
        P = np.stack([power_profile(t, gamma, taus) for t, gamma in profiles])
        G += P @ P.T
        b += P @ power_profile(*target, taus)
    return G, b


def solve_coefficients(profiles: Sequence[Profile], target: Profile) -> np.ndarray:
    """x minimising || sum_i x_i p_i - p_target ||^2 (the normal equations G x = b, solved in least squares)."""
    G, b = gram(profiles, target)
    return np.linalg.lstsq(G, b, rcond=None)[0]


# ------------------------------------------------------------------------------------------------
# Snapshots


@dataclass
class Snapshot:
    """The tracked averages at one step: their sigma_rels, the update count t, and a reader of their tensors
    ({"i/name": average i's parameter, "buffers/name": the module's buffer})."""

    step: int
    num_updates: int
    sigma_rels: Tuple[float, ...]
    read: Callable[[], Dict[str, torch.Tensor]]
    source: str


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:07d}.safetensors"


def snapshot_files(run_dir: Path) -> Dict[int, Path]:
    """{step: path} of a run dir's snapshot files."""
    found = sorted(Path(run_dir).glob(f"{SNAPSHOT_DIR}/step_*.safetensors"))
    return {int(p.stem[len("step_"):]): p for p in found if p.stem[len("step_"):].isdigit()}


def flat_tensors(averages: Sequence[Dict[str, torch.Tensor]], buffers: Dict[str, torch.Tensor],
                 dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """One snapshot's tensors on the CPU: every average's parameters (as `dtype`) and the buffers once."""
    flat = {f"{i}/{name}": t.detach().to("cpu", dtype, copy=True).contiguous()
            for i, average in enumerate(averages) for name, t in average.items()}
    kept = {f"{BUFFERS}/{name}": t.detach().to("cpu", copy=True).contiguous() for name, t in buffers.items()}
    return {**flat, **kept}


def write_snapshot(path: Path, tensors: Dict[str, torch.Tensor], step: int, num_updates: int,
                   sigma_rels: Sequence[float], dtype: str) -> Path:
    """Write one snapshot file atomically; its metadata: step, updates, sigma_rels, their gammas, dtype."""
    from safetensors.torch import save

    metadata = {"step": str(step), "num_updates": str(num_updates), "sigma_rels": json.dumps(list(sigma_rels)),
                "gammas": json.dumps([sigma_rel_to_gamma(s) for s in sigma_rels]), "dtype": dtype}
    blob = save(tensors, metadata=metadata)
    files.write_atomic(path, lambda f: f.write(blob))
    return path


def read_snapshot(path: Path) -> Snapshot:
    """A snapshot file's metadata now, its tensors on demand (safetensors: no code); one line if unreadable."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        step, updates, stds = int(meta["step"]), int(meta["num_updates"]), tuple(json.loads(meta["sigma_rels"]))
    except Exception as error:  # torn, foreign or hand-made
        raise ConfigError(f"cannot read EMA snapshot {path}: {files.first_line(error)}") from error
    return Snapshot(step, updates, stds, lambda: load_file(str(path)), str(path))


def carry_snapshots(previous_run: Path, run_dir: Path, up_to_step: int) -> None:
    """A resumed run's snapshots: those after its checkpoint step (written before a crash or stop) removed, those
    up to it copied when it continues in another dir, so it ends with the files of an uninterrupted run."""
    same = Path(previous_run).resolve() == Path(run_dir).resolve()
    for step, path in snapshot_files(previous_run).items():
        if step > up_to_step and same:
            path.unlink()
        elif step <= up_to_step and not same:
            data = path.read_bytes()
            files.write_atomic(snapshot_path(run_dir, step), lambda f: f.write(data))


def checkpoint_snapshot(state: Dict) -> Snapshot:
    """The averages a power-EMA checkpoint holds (train_step.ema), as the snapshot at its step."""
    ema = state["train_step"]["ema"]
    averages = ema["averages"]
    buffers = {k: v for k, v in ema["module"].items() if k not in averages[0]}
    return Snapshot(state["step"], int(ema["num_updates"]), tuple(ema["stds"]),
                    lambda: flat_tensors(averages, buffers), "the checkpoint")


def no_snapshots(path: Path, state: Dict) -> Optional[str]:
    """Why a checkpoint has no snapshots to reconstruct from, or None."""
    if "posthoc_ema" in state:
        return f"{path} already holds a post-hoc EMA reconstruction; give the run dir it was made from"
    if (state["config"].get("train") or {}).get("ema", "standard") != "power":
        return (f"{path.parent.parent} has no EMA snapshots (trained with train.ema=standard); train with "
                "train.ema=power to choose the EMA length after training")
    return None


def run_snapshots(path: Path, state: Dict) -> List[Snapshot]:
    """The snapshots of checkpoint `path`'s run up to its step, in order; its own averages count as the one at its
    step when no file holds it. ConfigError (one line) for a run without snapshots."""
    refused = no_snapshots(path, state)
    if refused:
        raise ConfigError(refused)
    found = [read_snapshot(p) for step, p in snapshot_files(path.parent.parent).items() if step <= state["step"]]
    if not found or found[-1].step != state["step"]:
        found.append(checkpoint_snapshot(state))
    found = [s for s in found if s.num_updates > 0]  # an average of no update (every step skipped) holds nothing
    if not found:
        raise ConfigError(f"{path}: its EMA has no update yet (every step was skipped): nothing to reconstruct")
    return found


# ------------------------------------------------------------------------------------------------
# Reconstruction


def reconstruct(snapshots: Sequence[Snapshot], sigma_rel: float,
                template: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], np.ndarray]:
    """(state dict, coefficients): the power EMA of relative std sigma_rel at the last snapshot's update count,
    sum_i x_i theta_hat_i over every average of every snapshot, accumulated in float64 one snapshot at a time and
    cast to the dtypes of `template` (the model's state dict); buffers are the last snapshot's."""
    profiles = [(s.num_updates, sigma_rel_to_gamma(std)) for s in snapshots for std in s.sigma_rels]
    x = solve_coefficients(profiles, (snapshots[-1].num_updates, sigma_rel_to_gamma(sigma_rel)))
    total: Dict[str, torch.Tensor] = {}
    coefficients = iter(x.tolist())
    for snapshot in snapshots:
        tensors = snapshot.read()
        for i in range(len(snapshot.sigma_rels)):
            weight = next(coefficients)
            for name in template:
                if f"{i}/{name}" in tensors:
                    term = weight * tensors[f"{i}/{name}"].double()
                    total[name] = total[name] + term if name in total else term
    buffers = {name: t for name, t in tensors.items() if name.startswith(f"{BUFFERS}/")}
    state = {name: total.get(name, buffers.get(f"{BUFFERS}/{name}", like)).to(like.dtype)
             for name, like in template.items()}
    return state, x


def posthoc_checkpoint(state: Dict, weights: Dict[str, torch.Tensor], sigma_rel: float, coefficients: np.ndarray,
                       snapshots: Sequence[Snapshot]) -> Dict:
    """The checkpoint with train_step.ema holding the reconstruction only, and a `posthoc_ema` record (sigma_rel,
    coefficients, snapshot steps); `sample` reads it, a resume refuses it."""
    ema = {"module": weights, "num_updates": int(snapshots[-1].num_updates)}
    record = {"sigma_rel": float(sigma_rel), "gamma": sigma_rel_to_gamma(sigma_rel),
              "coefficients": [float(c) for c in coefficients], "snapshot_steps": [s.step for s in snapshots],
              "snapshot_sigma_rels": [list(s.sigma_rels) for s in snapshots]}
    return {**state, "train_step": {**state["train_step"], "ema": ema}, "posthoc_ema": record}
