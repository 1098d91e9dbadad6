"""diffusion_lab: a Hydra-configured sandbox for pixel-space diffusion ablations.

The reference classes are the programmatic face of the core:

    from diffusion_lab import DiffusionProcess, DiffusionProcessCIFAR, DiffusionModel, DiffusionModelCIFAR
"""
from .models import DiffusionModel, DiffusionModelCIFAR, count_parameters
from .process import DiffusionProcess, DiffusionProcessCIFAR

__all__ = ["DiffusionProcess", "DiffusionProcessCIFAR", "DiffusionModel", "DiffusionModelCIFAR", "count_parameters"]
