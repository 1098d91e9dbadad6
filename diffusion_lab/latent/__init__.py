"""Latent spaces for diffusion: an encoder/decoder pair (the sandbox's own autoencoder run, PCA, a diffusers
AutoencoderKL folder), latents standardised per channel and cached once per dataset."""
