"""Content hashes of weights, so a run can tell the autoencoder it was trained on from another one."""
from __future__ import annotations

import hashlib
from typing import Dict

import torch


def tensor_hash(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors` in sorted-name order: the same weights give
    the same hash wherever and however often they were saved."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
