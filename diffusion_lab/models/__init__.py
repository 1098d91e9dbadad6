"""Denoising networks; importing this package registers them in ``MODELS`` ("base", "cifar")."""
from .unet import DiffusionModel, DiffusionModelCIFAR, count_parameters

__all__ = ["DiffusionModel", "DiffusionModelCIFAR", "count_parameters"]
