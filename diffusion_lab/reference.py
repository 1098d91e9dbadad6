"""The reference API (`DiffusionProcess`, `DiffusionProcessCIFAR`) as a thin face over the core.

Every computation is delegated: the schedule to `schedules`, the loss to `objectives`, the step to
`optim.TrainStep`, sampling to `samplers`. These classes only fix the reference defaults.

The reference attributes are live: `model`, `optimizer`, `ema_model` and the schedule arrays (`beta_schedule`,
`alpha_cumprod`, ...) are what training and sampling use, and assigning one replaces it there.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch

from .diffusion.losses import DiffusionLoss
from .diffusion.objectives import EpsObjective
from .diffusion.samplers import ddim, ddpm
from .diffusion.schedules import NoiseSchedule, cosine_betas, linear_betas
from .models import DiffusionModel, DiffusionModelCIFAR
from .training.ema import EMA
from .training.step import TrainStep, build_optimizer

# reference attribute name -> NoiseSchedule attribute (beta_schedule rebuilds the whole schedule when assigned)
SCHEDULE_ARRAYS = {
    "beta_schedule": "betas",
    "alpha": "alphas",
    "alpha_cumprod": "alphas_cumprod",
    "sqrt_alpha_cumprod": "sqrt_alphas_cumprod",
    "sqrt_one_minus_alpha_cumprod": "sqrt_one_minus_alphas_cumprod",
    "posterior_variance": "posterior_variance",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


def default_device(device=None) -> torch.device:
    """CUDA when available, else CPU (the reference default)."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _same_kind(old: torch.optim.Optimizer, params) -> torch.optim.Optimizer:
    """A fresh optimizer of `old`'s class and settings over `params`. Only the settings that the class's own
    constructor takes are passed on: torch adds keys to `defaults` that it does not accept back (AdamW's
    `decoupled_weight_decay` on torch >= 2.6)."""
    accepted = inspect.signature(type(old).__init__).parameters
    return type(old)(params, **{k: v for k, v in old.defaults.items() if k in accepted})


class _Process:
    """Shared body of both reference processes: an eps-prediction model, a schedule and one train step."""

    ddpm_kwargs: dict = {}

    def __init__(self, image_size: int, channels: int, schedule: NoiseSchedule, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, grad_clip: float = 0.0,
                 ema: Optional[EMA] = None):
        self.image_size, self.channels, self.device = image_size, channels, device
        self.schedule = schedule.to(device)
        self.objective = EpsObjective()
        self.grad_clip = grad_clip
        self._ema_decay = ema.decay if ema is not None else None
        self._step = TrainStep(model, optimizer, device, precision="fp16", grad_clip=grad_clip, ema=ema)

    def _rebuild_step(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Optional[EMA]) -> None:
        self._step = TrainStep(model, optimizer, self.device, precision="fp16", grad_clip=self.grad_clip, ema=ema)

    @property
    def noise_steps(self) -> int:
        return self.schedule.num_timesteps

    @property
    def model(self) -> torch.nn.Module:
        return self._step.model

    @model.setter
    def model(self, model: torch.nn.Module) -> None:
        """A new network: a fresh optimizer of the same kind and settings, and (CIFAR) a fresh EMA of it."""
        optimizer = _same_kind(self._step.optimizer, model.parameters())
        ema = EMA(model, decay=self._ema_decay, warmup=False) if self._ema_decay is not None else None
        self._rebuild_step(model, optimizer, ema)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._step.optimizer

    @optimizer.setter
    def optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._rebuild_step(self.model, optimizer, self.ema)

    @property
    def ema(self) -> Optional[EMA]:
        return self._step.ema

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """AMP gradient scaler: enabled on CUDA only."""
        return self._step.scaler

    def __getattr__(self, name: str):
        if name in SCHEDULE_ARRAYS:
            return getattr(self.schedule, SCHEDULE_ARRAYS[name])
        raise AttributeError(f"{type(self).__name__} has no attribute '{name}'")

    def __setattr__(self, name: str, value) -> None:
        if name == "beta_schedule":
            self.schedule = NoiseSchedule(torch.as_tensor(value)).to(self.device)
        elif name in SCHEDULE_ARRAYS:
            setattr(self.schedule, SCHEDULE_ARRAYS[name], torch.as_tensor(value).to(self.device))
        else:
            super().__setattr__(name, value)

    @property
    def sampling_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def add_noise(self, x: torch.Tensor, t: torch.Tensor):
        """q(x_t | x0): returns (x_t, noise)."""
        return self.schedule.add_noise(x, t)

    def train_step(self, images: torch.Tensor) -> float:
        """One step of eps-prediction MSE on a batch of [-1, 1] images; returns the loss."""
        images = images.to(self.device)
        self.model.train()

        def loss_fn() -> torch.Tensor:
            t = self.schedule.sample_timesteps(images.shape[0], self.device)
            noise = torch.randn_like(images)
            return DiffusionLoss(self.schedule, self.objective)(self.model, images, t, noise)

        loss, _ = self._step(loss_fn)
        return loss

    def _noise(self, num_samples: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        shape = (num_samples, self.channels, self.image_size, self.image_size)
        return torch.randn(shape, generator=generator, device=self.device)

    def sample(self, num_samples: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Ancestral DDPM over all noise_steps; values clamped to [-1, 1]."""
        self.sampling_model.eval()
        return ddpm(self.sampling_model, self.schedule, self.objective, self._noise(num_samples, generator),
                    generator=generator, clamp_final=True, **self.ddpm_kwargs)

    def sample_ddim(self, num_samples: int, ddim_steps: int = 50, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """DDIM on round(linspace(0, T-1, ddim_steps)); clamped at the final step only."""
        if not 0 < ddim_steps <= self.noise_steps:
            raise ValueError(f"ddim_steps must be in (0, {self.noise_steps}], got {ddim_steps}")
        self.sampling_model.eval()
        return ddim(self.sampling_model, self.schedule, self.objective, self._noise(num_samples, generator),
                    steps=ddim_steps, eta=eta, grid="linspace", clip_x0=False, clamp_final=True,
                    generator=generator)


class DiffusionProcess(_Process):
    """The base reference process: cosine schedule, `DiffusionModel`, Adam (lr 1e-4).

    Decision: the cosine schedule is fully defined by T (and s = 0.008); `beta_start` and `beta_end`
    are accepted for API compatibility and stored, but do not change it. `sample` uses the
    eps-form DDPM mean with variance beta_t (no per-step clipping), as the reference describes.
    """

    ddpm_kwargs = {"variance": "fixed_large", "clip_x0": False}

    def __init__(self, image_size: int, channels: int, hidden_dims: Sequence[int] = (32, 64, 128),
                 beta_start: float = 1e-4, beta_end: float = 0.02, noise_steps: int = 1000, device=None):
        device = default_device(device)
        self.beta_start, self.beta_end = beta_start, beta_end
        model = DiffusionModel(image_size, channels, list(hidden_dims)).to(device)
        super().__init__(image_size, channels, NoiseSchedule(cosine_betas(noise_steps)), model,
                         build_optimizer(model.parameters(), "adam", lr=1e-4, device=device), device)


class DiffusionProcessCIFAR(_Process):
    """The CIFAR-10 reference process: linear schedule, `DiffusionModelCIFAR` with dropout, AdamW
    (lr 2e-4, weight decay 1e-5), gradient clipping at 1.0 and an EMA model used for sampling.

    `sample` reconstructs x0, clamps it to [-1, 1] and takes the posterior mean and variance.
    """

    ddpm_kwargs = {"variance": "fixed_small", "clip_x0": True}

    def __init__(self, image_size: int = 32, channels: int = 3,
                 hidden_dims: Sequence[int] = (128, 256, 256, 256), beta_start: float = 1e-4,
                 beta_end: float = 0.02, noise_steps: int = 1000, dropout: float = 0.1,
                 ema_decay: float = 0.9999, device=None):
        device = default_device(device)
        model = DiffusionModelCIFAR(image_size, channels, list(hidden_dims), dropout=dropout).to(device)
        optimizer = build_optimizer(model.parameters(), "adamw", lr=2e-4, betas=(0.9, 0.999),
                                    weight_decay=1e-5, device=device)
        ema = EMA(model, decay=ema_decay, warmup=False)
        super().__init__(image_size, channels, NoiseSchedule(linear_betas(noise_steps, beta_start, beta_end)), model,
                         optimizer, device, grad_clip=1.0, ema=ema)

    @property
    def ema_model(self) -> torch.nn.Module:
        """The EMA network that `sample` and `sample_ddim` use."""
        return self.ema.module

    @ema_model.setter
    def ema_model(self, module: torch.nn.Module) -> None:
        """Sample from (a copy of) `module`'s weights from now on; training keeps averaging into them."""
        self._rebuild_step(self.model, self.optimizer, EMA(module, decay=self._ema_decay, warmup=False))
