"""Training of the learned paradigms, behind the paradigm interface.

A learned :class:`~app.engine.paradigms.base.Registrar` declares ``TrainConfig`` (a dataclass that
subclasses :class:`.config.LoopConfig`, typed like ``Params``) and ``trainer`` (a ``"module:Class"``
string naming a :class:`.loop.Trainer` subclass, imported when training starts). The shared loop
(:mod:`.loop`: DDP, AMP, checkpoints, resume, validation, progress, cancel) drives every trainer:

    cfg = make_config("weakly", {"steps": "3000", "init": "resources/checkpoints/unsupervised.pt"}, out="w.pt")
    path = train("weakly", cfg)

Importing this package does not import torch (the CLI lists options cheaply); :func:`train` does.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Optional

from ..types import ProgressFn
from .config import LoopConfig  # noqa: F401


def config_class(key: str) -> type:
    """The TrainConfig dataclass of learned paradigm ``key`` (ValueError when it is not trained)."""
    from .. import paradigms
    cls = getattr(paradigms.registrar_class(key), "TrainConfig", None)
    if cls is None:
        raise ValueError(f"paradigm '{key}' is not trained; trainable: {', '.join(paradigms.trainable())}")
    return cls


def make_config(key: str, overrides: Optional[dict[str, Any]] = None, **values):
    """``key``'s TrainConfig from its defaults, ``overrides`` (strings are parsed, as ``--param``) and
    ``values``; validated against ranges and choices (ValueError)."""
    from ..paradigms.base import make_params
    return make_params(config_class(key), {**(overrides or {}), **values})


def run_training(key: str, cfg, progress: Optional[ProgressFn] = None,
                 cancel: Optional[threading.Event] = None) -> dict:
    """Train ``key`` with ``cfg``: ``{"path", "model", "history", "val", "trainer"}`` (for scripts, tests)."""
    from .loop import run
    return run(key, cfg, progress, cancel)


def train(key: str, cfg, progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None) -> Path:
    """Train learned paradigm ``key``; returns the checkpoint path (written by rank 0).

    Raises ValueError for bad options, :class:`~app.engine.types.Cancelled` when ``cancel`` is set
    (the last periodic checkpoint, if any, stays valid: files are replaced atomically).
    """
    return run_training(key, cfg, progress, cancel)["path"]
