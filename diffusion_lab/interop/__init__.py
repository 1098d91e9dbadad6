"""diffusers interop: our DDPM U-Net and discrete schedules as diffusers' UNet2DModel and DDPMScheduler (export),
and a diffusers UNet2DModel folder as a network our samplers run (import)."""
