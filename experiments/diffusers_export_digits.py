"""A digits run exported to diffusers and sampled there: the same images, the same FID.

Trains nothing: give it a finished `model=cifar` run (the DDPM U-Net, resample=ddpm, a discrete schedule), e.g.

    python -m diffusion_lab.train model=cifar data=digits model.base_channels=32 'model.channel_mult=[1,2]' \\
        'model.attention_resolutions=[]' model.dropout=0.0 model.norm_groups=8 logger=none
    python experiments/diffusers_export_digits.py RUN_DIR --out outputs/diffusers_digits

It runs `python -m diffusion_lab.export` on the run, then draws `--n` images from the exported folder with
diffusers alone (DDPMPipeline with its own DDPMScheduler over all T steps, and DDIMPipeline with DDIMScheduler at
50 steps) and the same number with our `ddpm` and `ddim` samplers on the run's checkpoint from the same seed, and
scores all four with the run's FID (and KID, precision/recall where the evaluator has them) against its held-out
reference, with the noise floor. Writes export.json (every number) and export_samples.png (the first images of
each, one row per sampler) into --out.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_lab import files
from diffusion_lab.config.trained import generate, load_trained, make_fid_evaluator
from diffusion_lab.diffusion.samplers import build_sampler
from diffusion_lab.evaluation.plots import image_rows

DDIM_STEPS = 50


def pipelines(folder: Path) -> dict:
    """name -> (diffusers pipeline read from `folder`, its call options)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    ddpm = DDPMPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    ddim = DDIMScheduler.from_config(ddpm.scheduler.config, timestep_spacing="leading", set_alpha_to_one=True,
                                     steps_offset=0, clip_sample=False)
    T = ddpm.scheduler.config.num_train_timesteps
    return {"diffusers DDPMPipeline": (ddpm, {"num_inference_steps": T}),
            f"diffusers DDIMPipeline {DDIM_STEPS}": (DDIMPipeline(unet=ddpm.unet, scheduler=ddim),
                                                     {"num_inference_steps": DDIM_STEPS, "eta": 0.0})}


def diffusers_images(pipeline, options: dict, n: int, seed: int) -> torch.Tensor:
    """n images in [-1, 1] from one pipeline call (one batch: the same draw order as our one batch)."""
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=n, generator=torch.Generator().manual_seed(seed), output_type="np", **options).images
    return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished model=cifar run dir")
    parser.add_argument("--out", type=Path, required=True, help="where the pipeline folder and results go (new)")
    parser.add_argument("--n", type=int, default=1000, help="images per sampler (one batch)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = args.out / "pipeline"
    subprocess.run([sys.executable, "-m", "diffusion_lab.export", f"checkpoint={args.run}", f"out={folder}",
                    f"hydra.run.dir={args.out / 'export_log'}"], check=True)
    trained = load_trained(args.run, torch.device("cpu"))
    ours = {"ours ddpm": build_sampler("ddpm"),
            f"ours ddim {DDIM_STEPS} (grid=leading)": build_sampler("ddim", steps=DDIM_STEPS, grid="leading")}
    images, seconds = {}, {}
    for (name, sampler), (their_name, (pipeline, options)) in zip(ours.items(), pipelines(folder).items()):
        for who, draw in ((name, lambda: generate(trained, sampler, args.n, args.n, args.seed, torch.device("cpu"),
                                                  progress=False)),
                          (their_name, lambda: diffusers_images(pipeline, options, args.n, args.seed))):
            started = time.perf_counter()
            images[who] = draw()
            seconds[who] = time.perf_counter() - started
            print(f"{who}: {args.n} images in {seconds[who]:.1f}s", flush=True)
    evaluator = make_fid_evaluator(trained.config.eval, trained.config, torch.device("cpu"), args.n)
    names = list(images)
    result = {"run": str(args.run), "pipeline": str(folder), "n": args.n, "seed": args.seed, "step": trained.step,
              "max_abs_difference": {pair[0]: float((images[pair[0]] - images[pair[1]]).abs().max())
                                     for pair in (names[0:2], names[2:4])},
              "scores": {}}
    for who, x in images.items():
        score = evaluator.score(x)
        result["scores"][who] = {k: v for k, v in vars(score).items() if isinstance(v, (int, float, str)) or v is None}
        result["scores"][who]["seconds"] = seconds[who]
        print(f"{who}: {score}", flush=True)
    files.write_json(args.out / "export.json", result)
    picture = image_rows({who: x[:12] for who, x in images.items()}, [str(i) for i in range(12)],
                         args.out / "export_samples.png",
                         f"digits run exported to diffusers: the same noise (seed {args.seed}), T = "
                         f"{trained.schedule.num_timesteps}")
    print(json.dumps(result["max_abs_difference"]), f"wrote {picture} and {args.out / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
