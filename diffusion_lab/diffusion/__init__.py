"""The diffusion math: noise schedules, what the network predicts, time grids, samplers, guidance, class labels,
and exact references (a Gaussian mixture and its exact denoiser). Nothing here knows about files, configs or runs."""
