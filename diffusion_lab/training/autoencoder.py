"""Training a KL autoencoder with the diffusion runs' machinery: the same `Loop` (steps, log points,
checkpoints, grids, preemption), `RunState` (what a checkpoint holds), `TrainStep` and `Outputs`; only the loss,
the grid (held-out images over their reconstructions) and the FID (of reconstructions) are the autoencoder's.

Loss per image: summed L1 + kl_weight * KL(q(z|x) || N(0, I)) (Rombach et al. 2022, App. G), averaged over the
batch; z is drawn from the posterior with the run's noise generator, whose state every checkpoint saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from omegaconf import DictConfig

from ..data.images import save_grid
from ..data.loader import ResumableLoader
from ..evaluation.fid import FIDResult
from ..evaluation.tracker import build_evaluator
from ..models.autoencoder import KLAutoencoder, kl_divergence, reconstruction_loss
from . import progress
from .distributed import Ranks
from .ema import EMA
from .loop import Loop
from .outputs import Outputs
from .step import TrainStep

log = progress.log


class AutoencoderLoss:
    """The batch's mean of recon + kl_weight * KL, z from the posterior drawn with `generator`. It also sums the
    readable parts (L1 per pixel, KL per image) since the last `window()`, for the log points."""

    def __init__(self, model: KLAutoencoder, kl_weight: float, generator: torch.Generator):
        self.model, self.kl_weight, self.generator = model, float(kl_weight), generator
        self.sums, self.n = torch.zeros(2), 0

    def set_progress(self, step: int, total: int) -> None:
        """The loop's curriculum hook (consistency models move theirs); an autoencoder has none."""

    def __call__(self, batch: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        x = batch[0]
        x_rec, mean, logvar = self.model(x, generator=self.generator)
        recon, kl = reconstruction_loss(x_rec, x), kl_divergence(mean, logvar)
        self.sums += torch.stack([recon.mean() / x[0].numel(), kl.mean()]).detach().float().cpu()
        self.n += 1
        return (recon + self.kl_weight * kl).mean()

    def window(self) -> Dict[str, float]:
        """{recon_l1, kl}: means over the batches since the last call (empty when there were none)."""
        means = {} if not self.n else dict(zip(("recon_l1", "kl"), (self.sums / self.n).tolist()))
        self.sums, self.n = torch.zeros(2), 0
        return means


class ReconstructionFID:
    """FID of reconstructions (decode of the posterior mean) of n held-out images against the reference of
    eval.reference, with the feature extractor and noise floor that train and evaluate use for the data.
    `due`, `enabled` and the state methods are what the loop and RunState ask of FIDTracker."""

    def __init__(self, eval_cfg: DictConfig, datasets: Callable[[str], Any], device: torch.device, seed: int = 0):
        self.every, self.evaluator = int(eval_cfg.every), None
        held_out = datasets("test")
        self.images = torch.stack([held_out[i] for i in range(min(int(eval_cfg.num_samples), len(held_out)))])
        self.history: list = []  # [(step, value)]
        self.last: Optional[FIDResult] = None
        if self.every > 0:
            with torch.random.fork_rng(devices=[]):  # the floor's subset leaves training alone
                self.evaluator = build_evaluator(eval_cfg, datasets, device, len(self.images), progress=False)

    @property
    def enabled(self) -> bool:
        return self.evaluator is not None and self.evaluator.enabled

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def evaluate(self, model: KLAutoencoder) -> Tuple[FIDResult, Dict[str, float]]:
        """(FID, {recon_l1, recon_mse} per pixel) of `model`'s reconstructions of the held-out images; clean-fid's
        draws from the global RNG are forked away, so measuring never changes training."""
        with torch.random.fork_rng(devices=[]):
            rec = model.reconstruct(self.images)
            self.last = self.evaluator.score(rec)
        return self.last, held_out_errors(rec, self.images)

    def line(self, result: FIDResult) -> str:
        """`reconstruction FID 3.1 (floor 2.9 at n=359, <extractor>)`."""
        floor = f"floor {result.floor:.4g} at n={result.floor_n}" if result.floor is not None else "no floor"
        return f"reconstruction FID {result.value:.4g} ({floor}, {self.evaluator.extractor_label})"

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(entry) for entry in state["history"]]

    def summary(self) -> dict:
        """recon_fid with its floor, n, reference and label (summary.json)."""
        r = self.last
        return {"recon_fid": r.value if r else None, "fid_floor": r.floor if r else None,
                "fid_floor_n": r.floor_n if r else None, "fid_reference": r.reference if r else None,
                "fid_label": r.label() if r else None, "recon_fid_history": self.history}


def held_out_errors(rec: torch.Tensor, images: torch.Tensor) -> Dict[str, float]:
    """Mean absolute and squared error per pixel, in [-1, 1] units."""
    return {"recon_l1": (rec - images).abs().mean().item(), "recon_mse": (rec - images).pow(2).mean().item()}


@dataclass
class AutoencoderRun:
    """What an autoencoder run is made of, in the shape the training loop reads a `loop.Run`: `parts` is the run
    itself (model, image_shape and the loss with its curriculum hook), `loss(batch)` the training loss."""

    cfg: DictConfig
    ranks: Ranks
    device: torch.device
    dataset: Any
    model: KLAutoencoder
    image_shape: tuple
    ema: EMA
    step_fn: TrainStep
    loader: ResumableLoader
    fid: ReconstructionFID
    loss: AutoencoderLoss
    noise_generator: torch.Generator  # the posterior noise z ~ q(z|x); saved in every checkpoint
    grid_images: torch.Tensor  # fixed held-out images of the grids, so grids compare over time
    latent = None  # it works on pixels (what `loop.new_state` records of a diffusion run's latent space)

    @property
    def parts(self) -> "AutoencoderRun":
        return self

    def sample_grid(self) -> Tuple[torch.Tensor, int]:
        """(held-out images over their EMA reconstructions, images per row)."""
        per_row = grid_row_length(len(self.grid_images))
        return torch.cat([self.grid_images, self.ema.module.reconstruct(self.grid_images)]), per_row


def grid_row_length(n: int) -> int:
    """Images per grid row: about sqrt(2n), so the grid of n images over n reconstructions is near square."""
    return max(1, round((2 * n) ** 0.5))


class AutoencoderOutputs(Outputs):
    """`Outputs` whose grids say which rows hold the held-out images and which their reconstructions."""

    def grid(self, step: int, generate: Callable[[], Tuple[torch.Tensor, Optional[int]]]) -> Optional[Any]:
        if not self.enabled:
            return None
        images, per_row = generate()
        path = recon_grid(images, per_row, self.run_dir / "samples" / f"step_{step:07d}.png",
                          f"step {step}: held-out images, EMA reconstructions")
        self.logger.log_images({"samples": path}, step)
        return path


def recon_grid(images: torch.Tensor, per_row: int, path, caption: str):
    """A grid of n images followed by their n reconstructions, each half starting on a new row."""
    half = images.shape[0] // 2
    pad = (-half) % per_row
    blank = images.new_full((pad, *images.shape[1:]), -1.0)
    rows = -(-half // per_row)
    return save_grid(torch.cat([images[:half], blank, images[half:], blank]), path, nrow=per_row, caption=caption,
                     labels=["input"] * rows + ["recon"] * rows)


class AutoencoderLoop(Loop):
    """The training loop of `training.loop`, whose log points add recon_l1 and kl and whose evaluation is the
    reconstruction FID of the EMA weights."""

    def log_point(self, bar: progress.Progress) -> None:
        super().log_point(bar)
        parts = self.run.loss.window()
        if parts:
            self.out.log(parts, self.state.step)

    def evaluate(self) -> None:
        fid, step = self.run.fid, self.state.step
        result, errors = fid.evaluate(self.run.ema.module)
        fid.history.append((step, result.value))
        log.info(f"step {step}: {fid.line(result)}; held-out recon L1 {errors['recon_l1']:.4f} per pixel")
        self.out.log({"recon_fid": result.value, "fid_floor": result.floor,
                      **{f"test_{k}": v for k, v in errors.items()}}, step)
        self.kept = self.save("last.pt")  # again, now holding this step's FID
