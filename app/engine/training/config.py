"""Training options shared by every learned paradigm (no torch import: the CLI lists them cheaply).

A learned paradigm's ``TrainConfig`` is a dataclass that subclasses :class:`LoopConfig` and adds
its own options with :func:`~app.engine.paradigms.base.param` (help, range, choices), exactly like
a paradigm's ``Params``: ``main.py train --paradigm KEY --list-options`` prints them and
``--param NAME=VALUE`` sets them.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..datasets import DEFAULT_IXI_ROOT, DEFAULT_SPLIT
from ..paradigms.base import param


@dataclass
class LoopConfig:
    """Options of the shared training loop (:func:`app.engine.training.loop.run`)."""

    out: str = param("", "checkpoint file to write")
    resume: str = param("", "checkpoint (with optimiser state) to continue training from")
    init: str = param("", "checkpoint to start the weights from (what is reused is the paradigm's choice)")
    steps: int = param(2000, "total optimisation steps", range=(1, 10_000_000))
    batch_size: int = param(1, "pairs per step (per process)", range=(1, 64))
    lr: float = param(1e-3, "Adam learning rate", range=(1e-7, 1.0))
    lr_schedule: str = param("cosine", "constant, or cosine decay to 10 % of lr at the last step",
                             choices=("constant", "cosine"))
    val_every: int = param(200, "validate every N steps (0: only at the end)", range=(0, 10_000_000))
    ckpt_every: int = param(500, "write the checkpoint every N steps (0: only at the end)", range=(0, 10_000_000))
    seed: int = param(0, "random seed", range=(0, 2**31 - 1))
    device: str = param("auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda"))
    amp: bool = param(True, "mixed precision (CUDA only)")
    threads: int = param(0, "torch CPU threads (0: default)", range=(0, 256))
    data_root: str = param(str(DEFAULT_IXI_ROOT), "IXI folder (t1/, seg/)")
    split: str = param(str(DEFAULT_SPLIT), "split JSON (train / val / val_pairs)")
    max_train_subjects: int = param(0, "use only the first N training subjects (0: all)", range=(0, 100_000))
    max_val_pairs: int = param(10, "validation pairs used (0: none)", range=(0, 100_000))
    cache_dir: str = param("", "cache preprocessed subjects here (.npz); empty: no cache")


def parse_grid(text: str) -> tuple[int, int, int]:
    """``"45x60x60"`` -> ``(45, 60, 60)`` (z x y x x voxels); ValueError naming the text otherwise."""
    try:
        shape = tuple(int(s) for s in str(text).lower().replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(f"grid must look like 45x60x60, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"grid must be 3 sizes >= 8 (z x y x x), got {text!r}")
    return shape  # type: ignore[return-value]
