"""Training and inference speed of diffusion_lab's DDPM CIFAR-10 U-Net against diffusers' UNet2DModel.

Both networks have the DDPM CIFAR-10 architecture (Ho et al. 2020: channels 128, 256, 256, 256, two ResBlocks per
level, attention at 16x16, dropout 0.1, 32x32x3) and 35,746,307 parameters each:

  A  diffusion_lab   MODELS.build("cifar", ...) with diffusion_lab/conf/model/cifar.yaml as the ddpm_cifar10 experiment sets it
                     (resample=ddpm, zero_init=true).
  B  diffusers       UNet2DModel in google/ddpm-cifar10-32's configuration (attention in the second down and
                     third up block, norm_eps 1e-6) with dropout=0.1.

Both train through the same harness: TrainStep (fp32 on CPU, grad clip 1.0, no EMA) with AdamW(lr 2e-4) from
build_optimizer, the same fixed batch, and the same eps-MSE loss on the DDPM linear schedule, each drawing t and
eps from its own generator with the same seed (so both see the same sequence). Timing alternates A and B in one
process, the order flipped every round (bench_vs_peer.run_rounds); only the per-round ratios mean anything on a
shared machine. Peak memory is measured per network in a fresh subprocess (VmHWM: the process's resident
high-water mark; tracemalloc cannot see torch's allocations). Sampling throughput is our DDIM-50 and
DPM-Solver++(2M)-20 driving our network.

    python experiments/bench_vs_diffusers.py            # batch 8 and 32, 5 rounds, memory, sampling at batch 16
    python experiments/bench_vs_diffusers.py --quick    # batch 8, 3 rounds, no memory or sampling
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from bench_vs_peer import eps_loss, machine_info, run_rounds  # noqa: E402  (experiments/ is on sys.path: this file's dir)

from diffusion_lab.config import CONF_DIR  # noqa: E402
from diffusion_lab.diffusion.objectives import EpsObjective  # noqa: E402
from diffusion_lab.diffusion.samplers import build_sampler  # noqa: E402
from diffusion_lab.diffusion.schedules import linear  # noqa: E402
from diffusion_lab.models import unet  # noqa: E402,F401  (registers "cifar")
from diffusion_lab.registry import MODELS  # noqa: E402
from diffusion_lab.training.step import TrainStep, autocast_dtype, build_optimizer  # noqa: E402

T, LR, GRAD_CLIP, SEED = 1000, 2e-4, 1.0, 0
NAMES = ("diffusion_lab", "diffusers")
SAMPLERS = {"DDIM-50": ("ddim", {"steps": 50}), "DPM-Solver++-20": ("dpm_solver", {"steps": 20})}


def lab_unet() -> nn.Module:
    """diffusion_lab/conf/model/cifar.yaml with the ddpm_cifar10 experiment's overrides."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "cifar.yaml")
    recipe = OmegaConf.load(CONF_DIR / "experiment" / "ddpm_cifar10.yaml").model
    params = {k: v for k, v in OmegaConf.to_container(OmegaConf.merge(cfg, recipe)).items()
              if k not in ("name", "defaults")}
    torch.manual_seed(SEED)
    return MODELS.build("cifar", image_size=32, channels=3, **params)


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel in the DDPM CIFAR-10 configuration, called as model(x, t) -> eps."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        torch.manual_seed(SEED)
        self.net = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1,
            norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t).sample


def build(name: str, device: torch.device, channels_last: bool) -> nn.Module:
    net = (lab_unet() if name == "diffusion_lab" else DiffusersUNet()).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def train_step(net: nn.Module, x0: torch.Tensor, device: torch.device, precision: str) -> Callable[[], float]:
    """One TrainStep of eps-MSE with AdamW; t and eps from a generator seeded the same for both networks."""
    schedule, objective = linear(noise_steps=T).to(device), EpsObjective()
    optimizer = build_optimizer(net.parameters(), "adamw", LR, device=device)
    step = TrainStep(net, optimizer, device, precision=precision, grad_clip=GRAD_CLIP)
    loss_fn = eps_loss(net, x0, schedule, objective, device)

    def run() -> float:
        net.train()
        return step(loss_fn)[0]

    return run


def forward_step(net: nn.Module, x0: torch.Tensor, device: torch.device, precision: str) -> Callable[[], None]:
    """One inference forward (eval mode, inference_mode, autocast as in training)."""
    t = torch.full((x0.shape[0],), T // 2, device=device, dtype=torch.long)
    dtype = autocast_dtype(precision, device)

    @torch.inference_mode()
    def run() -> None:
        net.eval()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            net(x0, t)

    return run


def summarise(times: Dict[str, List[float]], per_round: int, batch: int) -> Dict[str, object]:
    """Median seconds per call and images/s per network; per-round ratios A/B of throughput."""
    ratios = [b / a for a, b in zip(times[NAMES[0]], times[NAMES[1]])]  # time_B / time_A = speed_A / speed_B
    median = {n: statistics.median(ts) / per_round for n, ts in times.items()}
    return {"median_s": median, "images_per_s": {n: batch / s for n, s in median.items()},
            "ratios": ratios, "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}


def bench_batch(nets: Dict[str, nn.Module], batch: int, args, device: torch.device, sync) -> Dict[str, object]:
    """Warm-up, then alternated rounds of training steps and of forwards at one batch size."""
    x0 = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)).clamp(-1, 1).to(device)
    if args.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    result = {}
    for kind, make in (("train", train_step), ("forward", forward_step)):
        fns = {n: make(net, x0, device, args.precision) for n, net in nets.items()}
        for _ in range(args.warmup):
            for fn in fns.values():
                fn()
        result[kind] = summarise(run_rounds(fns, args.rounds, args.steps_per_round, sync), args.steps_per_round, batch)
    return result


def peak_memory(name: str, batch: int, args) -> Dict[str, float]:
    """Run 2 training steps of one network in a fresh process; its peak RSS (MiB) after build and after the steps."""
    cmd = [sys.executable, __file__, "--_memory-child", name, "--batch-sizes", str(batch), "--device", args.device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's resident high-water mark: VmHWM (Linux), else ru_maxrss. ru_maxrss alone would be wrong on
    Linux: a child inherits its parent's value across fork and exec, so every child would report the parent's."""
    try:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def memory_child(name: str, batch: int, device: torch.device) -> None:
    maxrss_mib = peak_rss_mib
    net = build(name, device, channels_last=False)
    built = maxrss_mib()
    x0 = torch.randn(batch, 3, 32, 32, device=device)
    step = train_step(net, x0, device, "auto")
    for _ in range(2):  # the second step has AdamW's state allocated
        step()
    peak = maxrss_mib() if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps({"after_build_mib": built, "peak_mib": peak}))


@torch.inference_mode()
def sampling(net: nn.Module, batch: int, device: torch.device, sync) -> Dict[str, float]:
    """Images/s of our samplers driving `net` (one untimed forward first)."""
    net.eval()
    schedule, objective = linear(noise_steps=T).to(device), EpsObjective()
    x_T = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(SEED)).to(device)
    net(x_T, torch.zeros(batch, dtype=torch.long, device=device))
    rates = {}
    for label, (name, params) in SAMPLERS.items():
        sampler = build_sampler(name, **params)
        sync()
        start = time.perf_counter()
        sampler(net, schedule, objective, x_T)
        sync()
        rates[label] = batch / (time.perf_counter() - start)
    return rates


def table(results: Dict[int, Dict[str, object]], memory: Dict[str, Dict[int, Dict[str, float]]]) -> str:
    """The README's markdown table: one row per batch size and measurement."""
    lines = ["| batch | measurement | diffusion_lab img/s | diffusers img/s | ratio (min-max over rounds) |"
             " diffusion_lab peak RSS | diffusers peak RSS |", "|---|---|---|---|---|---|---|"]
    for batch, res in results.items():
        for kind in ("train", "forward"):
            r = res[kind]
            mem = [f"{memory[n][batch]['peak_mib']:.0f} MiB" if kind == "train" and batch in memory.get(n, {})
                   else "" for n in NAMES]
            lines.append(f"| {batch} | {'training step' if kind == 'train' else 'forward (inference)'} | "
                         f"{r['images_per_s'][NAMES[0]]:.1f} | {r['images_per_s'][NAMES[1]]:.1f} | "
                         f"{r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}) | "
                         f"{mem[0]} | {mem[1]} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 8 32 (--quick: 8)")
    parser.add_argument("--rounds", type=int, help="alternated rounds per batch size after warm-up; default 5 (--quick: 3)")
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per network before the rounds")
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 rounds, no memory or sampling runs")
    parser.add_argument("--sample-batch", type=int, default=16, help="sampling throughput batch; 0 skips it")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process peak-memory runs")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="autocast dtype for both networks; auto = bf16 on a GPU that has it, fp32 on CPU")
    parser.add_argument("--channels-last", action="store_true", help="both networks and the batch in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks (slow to start on CPU)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--_memory-child", dest="memory_child", choices=NAMES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:  # explicit --batch-sizes / --rounds still win
        args.sample_batch, args.no_memory = 0, True
    args.batch_sizes = args.batch_sizes or ([8] if args.quick else [8, 32])
    args.rounds = args.rounds if args.rounds is not None else (3 if args.quick else 5)
    for flag in ("rounds", "steps_per_round"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if min(args.batch_sizes) < 1 or args.warmup < 0 or args.sample_batch < 0:
        parser.error("--batch-sizes must be >= 1, --warmup and --sample-batch >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return args


def main() -> int:
    args = parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    try:
        import diffusers  # noqa: F401
    except ImportError as error:
        print(f"bench_vs_diffusers: diffusers is not importable ({error}); pip install diffusers", file=sys.stderr)
        return 2
    if args.memory_child:
        memory_child(args.memory_child, args.batch_sizes[0], device)
        return 0
    if device.type == "cuda":  # as train.py sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    nets = {n: build(n, device, args.channels_last) for n in NAMES}
    params = {n: sum(p.numel() for p in net.parameters()) for n, net in nets.items()}
    if args.compile:
        nets = {n: torch.compile(net) for n, net in nets.items()}
    info = machine_info(device)
    config = {"parameters": params, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
              "warmup": args.warmup, "precision": str(autocast_dtype(args.precision, device) or "fp32"),
              "channels_last": args.channels_last, "compile": args.compile, "optimizer": f"AdamW(lr={LR})",
              "grad_clip": GRAD_CLIP}
    print("machine  " + "  ".join(f"{k}={v}" for k, v in info.items()))
    print("config   " + "  ".join(f"{k}={v}" for k, v in config.items()))
    if device.type == "cpu":
        print("note     no GPU here: bf16 autocast is off (fp32), channels_last/--compile only if asked")

    results = {}
    for batch in args.batch_sizes:
        results[batch] = bench_batch(nets, batch, args, device, sync)
        for kind, r in results[batch].items():
            print(f"batch {batch:>3} {kind:<8} " + "  ".join(
                f"{n} {r['median_s'][n] * 1e3:.0f} ms ({r['images_per_s'][n]:.1f} img/s)" for n in NAMES)
                + f"  ratio {r['ratio']:.2f} (per round: {' '.join(f'{x:.2f}' for x in r['ratios'])})")
    memory = {} if args.no_memory else {n: {b: peak_memory(n, b, args) for b in args.batch_sizes} for n in NAMES}
    for n, per_batch in memory.items():
        for b, m in per_batch.items():
            print(f"memory   {n} batch {b}: peak RSS {m['peak_mib']:.0f} MiB "
                  f"({m['peak_mib'] - m['after_build_mib']:+.0f} MiB over the built model)")
    rates = sampling(nets[NAMES[0]], args.sample_batch, device, sync) if args.sample_batch else {}
    for label, rate in rates.items():
        print(f"sampling diffusion_lab {label} at batch {args.sample_batch}: {rate:.2f} img/s")
    print()
    print(table(results, memory))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "config": config, "results": results, "memory": memory,
                                         "sampling": {"batch": args.sample_batch, "images_per_s": rates}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
