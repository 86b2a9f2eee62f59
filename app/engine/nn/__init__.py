"""Networks, layers (spatial transformer, velocity integration) and losses of the learned paradigms.

Modules: :mod:`.layers`, :mod:`.networks`, :mod:`.losses`, :mod:`.geometry` (grid matrices),
:mod:`.twostage` (the affine + deformable forward pass). Importing this package imports torch.
"""
from __future__ import annotations

import os

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available (the local rank's GPU under torchrun), else CPU.

    Raises ValueError for an unknown name or when 'cuda' is asked for and absent.
    """
    device = str(device)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(device)
