"""Networks, layers (spatial transformer, velocity integration) and losses of the learned paradigms.

Modules: :mod:`.layers`, :mod:`.networks`, :mod:`.losses`, :mod:`.geometry` (grid matrices),
:mod:`.twostage` (the affine + deformable forward pass), :mod:`.similarity` (the registry of
image similarities as losses). Importing this package imports torch.
"""
from __future__ import annotations

import os

import torch


def resolve_device(device="auto") -> torch.device:
    """The one device resolution of the engine: a name from the caller -> ``torch.device``.

    * ``'auto'`` (or None / ''): CUDA when available, else the CPU;
    * ``'cpu'``;
    * ``'cuda'``: the current process's GPU; under ``torchrun`` (``LOCAL_RANK`` set) that is
      ``cuda:LOCAL_RANK`` so that each worker uses its own GPU (for ``'auto'`` too);
    * ``'cuda:N'``: GPU N, which must exist.

    A ``torch.device`` is accepted as is (after the same checks).

    Raises
    ------
    ValueError
        For an unknown name, when CUDA is asked for and absent, or for a GPU index beyond the count.
    """
    if isinstance(device, torch.device):
        device = str(device)
    name = "auto" if device in (None, "") else str(device).strip().lower()
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda:") and not name[5:].isdigit():
        raise ValueError(f"device must be 'cuda:N' with an integer N, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available; use 'auto' or 'cpu'")
    if name == "cuda":
        rank = os.environ.get("LOCAL_RANK")
        if rank is None:
            return torch.device("cuda")
        try:
            index = int(rank)
        except ValueError:
            raise ValueError(f"LOCAL_RANK must be an integer under torchrun, got {rank!r}") from None
    else:
        index = int(name[5:])
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"device {device!r} asks for GPU {index} but {count} GPU(s) are visible"
                         + (" (index from LOCAL_RANK)" if name == "cuda" else ""))
    return torch.device("cuda", index)
