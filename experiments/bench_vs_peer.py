"""Training speed of diffusion_lab against lucidrains' denoising-diffusion-pytorch, measured in the same run.

Both pipelines train the same network (same architecture, identical initial weights) on the same fixed batch of
sklearn digits with plain eps-MSE on the DDPM linear schedule, and both do a full training step:

  A  diffusion_lab   TrainStep(model, Adam, precision="auto", grad_clip=1.0, ema=EMA(model, 0.995)) with
                     train.py's loss_fn (sample_timesteps, randn, add_noise, EpsObjective().loss).
  B  the peer        the body of its Trainer.train, through accelerate as the Trainer runs it:
                     model.train(); with accelerator.autocast(): loss = GaussianDiffusion(x); loss.item();
                     accelerator.backward; accelerator.clip_grad_norm_(1.0); Adam step; zero_grad;
                     ema_pytorch.EMA(diffusion, beta=0.995, update_every=1).update().
                     Left out: the data loader (both pipelines use the fixed batch), tqdm, and
                     accelerator.wait_for_everyone() (a no-op on one process).

Timing: warm-up steps, then rounds of A and B, --steps-per-round steps each, timed with perf_counter (after a
CUDA synchronize), the order flipped every round (A B, B A, ...). Reports each pipeline's median steps/s over
rounds and the median of the per-round ratios A/B.

Optimizer: Adam(lr=1e-4, betas=(0.9, 0.99)) for both, each built the way its project builds it: A through
build_optimizer (the fused kernel on CUDA), B as torch.optim.Adam (foreach on CUDA); the same code on CPU.
Precision: fp32 on CPU. On CUDA both run in bf16 autocast (fp16 on GPUs without bf16): A through TrainStep
(precision="auto", channels_last weights as train.py sets them), B through Accelerator(mixed_precision=...).

    pip install denoising-diffusion-pytorch   # the peer; the script installs nothing
    python experiments/bench_vs_peer.py       # see --help; exit code 2 when the peer is missing
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from diffusion_lab.diffusion.losses import DiffusionLoss  # noqa: E402
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from diffusion_lab.data.datasets import digits  # noqa: E402
from diffusion_lab.diffusion.objectives import EpsObjective  # noqa: E402
from diffusion_lab.diffusion.schedules import linear  # noqa: E402
from diffusion_lab.models import DiffusionModel  # noqa: E402
from diffusion_lab.training.ema import EMA  # noqa: E402
from diffusion_lab.training.step import TrainStep, autocast_dtype, build_optimizer  # noqa: E402

T = 1000
LR, BETAS = 1e-4, (0.9, 0.99)  # the peer Trainer's defaults, used by both
EMA_DECAY = 0.995
GRAD_CLIP = 1.0
SEED = 0


class LabModelForPeer(nn.Module):
    """Lets the peer's GaussianDiffusion drive a diffusion_lab network: the attributes it reads, its call signature."""

    def __init__(self, net: DiffusionModel):
        super().__init__()
        self.net = net
        self.channels = self.out_dim = net.channels
        self.self_condition = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, x_self_cond=None) -> torch.Tensor:
        return self.net(x, t)


def build_network(name: str, image_size: int) -> nn.Module:
    """The shared architecture: the peer's Unet(dim=32, dim_mults=(1, 2, 4)) or diffusion_lab's base U-Net."""
    torch.manual_seed(SEED)
    if name == "peer-unet":
        from denoising_diffusion_pytorch import Unet

        return Unet(dim=32, dim_mults=(1, 2, 4), channels=1)
    return DiffusionModel(image_size, 1, hidden_dims=(32, 64, 128))


def fixed_batch(batch_size: int, image_size: int) -> torch.Tensor:
    """batch_size digits (fixed random pick) resized to image_size, in [-1, 1]."""
    images = digits(image_size).images
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(SEED))[:batch_size]
    return images[pick].clone()


def eps_loss(net: nn.Module, x0: torch.Tensor, schedule, objective, device: torch.device) -> Callable[[], torch.Tensor]:
    """train.py's loss_fn on a fixed batch: t and eps from a generator seeded the same for every network."""
    generator = torch.Generator(device=device).manual_seed(SEED + 1)

    def loss_fn() -> torch.Tensor:
        t = schedule.sample_timesteps(x0.shape[0], device, generator)
        eps = torch.randn(x0.shape, generator=generator, device=device)
        x_t, _ = schedule.add_noise(x0, t, eps)
        return DiffusionLoss(schedule, objective).mse(net(x_t, t), x0, eps, t)

    return loss_fn


def lab_pipeline(net: nn.Module, x0: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """Pipeline A: diffusion_lab's TrainStep and train.py's loss_fn."""
    if device.type == "cuda":  # as train.py does on a GPU
        net = net.to(memory_format=torch.channels_last)
    schedule, objective = linear(noise_steps=T).to(device), EpsObjective()
    optimizer = build_optimizer(net.parameters(), "adam", LR, BETAS, device=device)
    step_fn = TrainStep(net, optimizer, device, precision="auto", grad_clip=GRAD_CLIP, ema=EMA(net, EMA_DECAY))
    loss_fn = eps_loss(net, x0, schedule, objective, device)

    return lambda: step_fn(loss_fn)[0]


def peer_pipeline(diffusion: nn.Module, x01: torch.Tensor, device: torch.device) -> Callable[[], float]:
    """Pipeline B: one iteration of the peer's Trainer.train (see the module docstring)."""
    from accelerate import Accelerator
    from ema_pytorch import EMA as PeerEMA

    dtype = autocast_dtype("auto", device)  # the same choice as pipeline A: bf16 on GPUs that have it, else fp16
    mixed = {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=LR, betas=BETAS)
    # update_after_step=0: the Trainer's steady state (lerp every update) from the first step, not after 100.
    ema = PeerEMA(diffusion, beta=EMA_DECAY, update_every=1, update_after_step=0).to(device)
    diffusion, optimizer = accelerator.prepare(diffusion, optimizer)

    def step() -> float:
        diffusion.train()
        with accelerator.autocast():
            loss = diffusion(x01)
            value = loss.item()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(diffusion.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        ema.update()
        return value

    return step


@torch.no_grad()
def loss_check(lab_net: nn.Module, diffusion: nn.Module, x0: torch.Tensor, device: torch.device) -> Dict[str, float]:
    """Both losses on the same timesteps, noise and weights (fp32): they must agree to float rounding."""
    schedule = linear(noise_steps=T).to(device)
    generator = torch.Generator(device=device).manual_seed(SEED + 2)
    t = schedule.sample_timesteps(x0.shape[0], device, generator)
    eps = torch.randn(x0.shape, generator=generator, device=device)
    lab = DiffusionLoss(schedule, EpsObjective()).mse(lab_net(schedule.add_noise(x0, t, eps)[0], t), x0, eps, t).item()
    peer = diffusion((x0 + 1) / 2, eps, times=t).item()  # -> p_losses(normalize(img), t, noise=eps)
    gap = (schedule.sqrt_alphas_cumprod - diffusion.sqrt_alphas_cumprod).abs().max().item()
    return {"lab": lab, "peer": peer, "schedule_max_abs_diff": gap}


def run_rounds(pipelines: Dict[str, Callable[[], float]], rounds: int, steps: int, sync: Callable[[], None]):
    """rounds x (A B, then B A on odd rounds; `steps` steps each) -> {name: [seconds per round]}.

    Flipping the order every round keeps "always runs first" from biasing the ratio.
    """
    times: Dict[str, List[float]] = {name: [] for name in pipelines}
    for r in range(rounds):
        order = list(pipelines.items())
        for name, step in order[::-1] if r % 2 else order:
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def machine_info(device: torch.device) -> Dict[str, object]:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpu": platform.processor() or None}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", default="peer-unet", choices=["peer-unet", "lab-base"],
                        help="peer-unet: Unet(dim=32, dim_mults=(1, 2, 4)); lab-base: DiffusionModel [32, 64, 128]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16, choices=[16, 32])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per pipeline before the rounds (the first gives the step-0 loss)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for flag in ("batch_size", "rounds", "steps_per_round", "warmup"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")

    try:
        from denoising_diffusion_pytorch import GaussianDiffusion
    except ImportError as error:
        print(f"bench_vs_peer: the peer is not importable ({error}); pip install denoising-diffusion-pytorch")
        return 2

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":  # global, so both pipelines get it (train.py sets the same)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    net = build_network(args.model, args.image_size)
    lab_net = copy.deepcopy(net).to(device)
    peer_net = copy.deepcopy(net) if args.model == "peer-unet" else LabModelForPeer(copy.deepcopy(net))
    # Plain eps-MSE on the DDPM linear schedule: pred_noise with min_snr off gives loss_weight = snr / snr = 1.
    diffusion = GaussianDiffusion(peer_net, image_size=args.image_size, timesteps=T, objective="pred_noise",
                                  beta_schedule="linear", min_snr_loss_weight=False, auto_normalize=True).to(device)
    x0 = fixed_batch(args.batch_size, args.image_size).to(device)  # [-1, 1] for diffusion_lab
    x01 = (x0 + 1) / 2  # [0, 1] for the peer, which maps it back to [-1, 1] (auto_normalize)

    check = loss_check(lab_net, diffusion, x0, device)
    pipelines = {"diffusion_lab": lab_pipeline(lab_net, x0, device), "peer": peer_pipeline(diffusion, x01, device)}
    first = {name: step() for name, step in pipelines.items()}  # step 0, own timesteps and noise
    for _ in range(args.warmup - 1):
        for step in pipelines.values():
            step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = run_rounds(pipelines, args.rounds, args.steps_per_round, sync)

    rates = {name: [args.steps_per_round / s for s in ts] for name, ts in times.items()}
    ratios = [lab / peer for lab, peer in zip(rates["diffusion_lab"], rates["peer"])]
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = statistics.median(ratios)
    n_params = sum(p.numel() for p in net.parameters())
    config = {"model": args.model, "parameters": n_params, "batch_size": args.batch_size,
              "image_size": args.image_size, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
              "warmup": args.warmup, "lr": LR, "betas": BETAS, "ema_decay": EMA_DECAY, "grad_clip": GRAD_CLIP,
              "precision": str(autocast_dtype("auto", device) or "fp32")}
    info = machine_info(device)

    print("machine  " + "  ".join(f"{k}={v}" for k, v in info.items()))
    print("config   " + "  ".join(f"{k}={v}" for k, v in config.items()))
    print(f"loss check (same t, noise, weights; fp32): diffusion_lab {check['lab']:.6f}  peer {check['peer']:.6f}  "
          f"|diff| {abs(check['lab'] - check['peer']):.2e}  schedule max|diff| {check['schedule_max_abs_diff']:.1e}")
    print(f"step-0 loss (own t and noise): diffusion_lab {first['diffusion_lab']:.4f}  peer {first['peer']:.4f}")
    print()
    print(f"{'pipeline':<15}{'median steps/s':>16}{'min':>9}{'max':>9}{'median img/s':>15}")
    for name, r in rates.items():
        print(f"{name:<15}{median[name]:>16.2f}{min(r):>9.2f}{max(r):>9.2f}{median[name] * args.batch_size:>15.0f}")
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratio, ratio, ratio)
    print(f"per-round ratios A/B: {' '.join(f'{x:.3f}' for x in ratios)}")
    print(f"diffusion_lab is {ratio:.2f}x the peer's speed (median of per-round ratios; "
          f"interquartile range {q1:.2f}-{q3:.2f})")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "machine": info, "config": config, "loss_check": check, "step0_loss": first,
            "seconds_per_round": times, "steps_per_s": rates, "median_steps_per_s": median,
            "ratios": ratios, "ratio_lab_over_peer": ratio, "ratio_iqr": [q1, q3]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
