"""diffusion_lab: a Hydra-configured sandbox for pixel-space diffusion ablations.

The reference classes are the programmatic face of the core:

    from diffusion_lab import DiffusionProcess, DiffusionProcessCIFAR, DiffusionModel, DiffusionModelCIFAR

They are imported on first use, so commands that do not need torch (compare) start quickly.
"""
from importlib import import_module

_EXPORTS = {
    "DiffusionProcess": ".reference",
    "DiffusionProcessCIFAR": ".reference",
    "DiffusionModel": ".models",
    "DiffusionModelCIFAR": ".models",
    "count_parameters": ".models",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusion_lab' has no attribute '{name}'")
    return getattr(import_module(_EXPORTS[name], __name__), name)
