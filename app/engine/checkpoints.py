"""Model checkpoints: one file per model, with the metadata needed to rebuild and to trust it.

A checkpoint is a ``torch.save``'d dict of plain values and tensors::

    {format_version, paradigm,
     network: {kind, ...constructor config},          # rebuilt through nn.registry (one registry of network kinds)
     state_dict: {name: tensor},                       # loaded strictly
     preprocessing: {grid_shape, spacing_mm, direction, percentile, prealignment, spatial_dims, intensity},
     training: {data, split, steps, losses, final validation metrics, ...},
     created: ISO time,
     optimizer: optional optimiser state (for resuming)}

It is loaded with ``torch.load(weights_only=True)``: a file holding any other Python object is
refused without running its code. Bundled checkpoints live in ``resources/checkpoints/`` with a
card beside each (``NAME.card.json`` + ``NAME.md``: data, training, measured Dice / folding / time);
cards and bundled paths are in :mod:`app.engine.cards` (no torch) and re-exported here.
"""
from __future__ import annotations

import datetime as _dt
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

# Cards and bundled paths live in a module without torch (the GUI uses it); re-exported here.
from .cards import (CHECKPOINT_DIR, bundled_path, card_paths, default_checkpoint, lineage,  # noqa: F401
                    list_checkpoints, read_card, write_card)
from .jsonsafe import to_jsonable

FORMAT_VERSION = 1
_REQUIRED = ("format_version", "paradigm", "network", "state_dict", "preprocessing")


def save_checkpoint(path: str | os.PathLike, *, paradigm: str, model: torch.nn.Module, preprocessing: dict,
                    training: Optional[dict] = None, optimizer: Optional[dict] = None) -> Path:
    """Write ``model`` (with its ``config``) and metadata to ``path`` atomically (temp file + rename).

    ``preprocessing`` is :meth:`app.engine.datasets.Preprocessing.to_dict`; ``training`` any
    JSON-like dict. Returns the path.
    """
    if not hasattr(model, "config"):
        raise ValueError(f"{type(model).__name__} has no .config; only models that store their constructor "
                         f"config can be checkpointed")
    path = Path(path)
    prep = to_jsonable(dict(preprocessing), nonfinite_to_none=False)
    prep.setdefault("spatial_dims", len(prep.get("grid_shape", (0, 0, 0))))
    ckpt = {
        "format_version": FORMAT_VERSION,
        "paradigm": str(paradigm),
        "network": to_jsonable(model.config, nonfinite_to_none=False),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocessing": prep,
        "training": to_jsonable(training or {}, nonfinite_to_none=False),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _read_raw(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"checkpoint file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"refusing to load {path.name}: it contains Python objects other than tensors and plain "
                         f"values (a foreign or unsafe pickle); nothing in it was executed ({str(e).splitlines()[0]})") from None
    except Exception as e:  # zip/format errors, truncated files, text files...
        raise ValueError(f"{path.name} is not a RegStation checkpoint (cannot be read as a torch file: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        have = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path.name} is not a RegStation checkpoint: expected keys {', '.join(_REQUIRED)}, got {have}")
    return ckpt


def load_checkpoint(path: str | os.PathLike, expected_paradigm: Optional[str] = None, build: bool = True,
                    kinds: tuple[str, ...] = ()) -> dict:
    """Read and validate a checkpoint; rebuild its network.

    Returns the checkpoint dict plus ``"model"`` (the rebuilt network on the CPU, in eval mode, when
    ``build``) and ``"path"``. Raises ValueError with the reason when the file is missing, is not a
    checkpoint, holds foreign Python objects, has a newer format, belongs to another paradigm, is
    2D, its network kind is not one of ``kinds`` (when given: the kinds the paradigm accepts), or its
    weights do not fit its network config. Networks are rebuilt through :mod:`app.engine.nn.registry`.
    """
    from .nn.registry import build_network as build_model
    path = Path(path)
    ckpt = _read_raw(path)
    if not isinstance(ckpt["format_version"], int) or ckpt["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path.name} has checkpoint format {ckpt['format_version']!r}; this RegStation reads "
                         f"format <= {FORMAT_VERSION} (update RegStation)")
    if expected_paradigm is not None and ckpt["paradigm"] != expected_paradigm:
        raise ValueError(f"{path.name} was trained for paradigm '{ckpt['paradigm']}', not '{expected_paradigm}'; "
                         f"pick a checkpoint made for '{expected_paradigm}'")
    if kinds:
        from .nn.registry import check_kind
        who = f"paradigm '{expected_paradigm}'" if expected_paradigm else "this use"
        check_kind(ckpt["network"], tuple(kinds), f"{path.name} (for {who})")
    prep = ckpt["preprocessing"]
    dims = prep.get("spatial_dims", len(prep.get("grid_shape", ())))
    if dims != 3 or len(prep.get("grid_shape", ())) != 3:
        raise ValueError(f"{path.name} is a {dims}D model (grid {prep.get('grid_shape')}); RegStation's learned "
                         f"paradigms register 3D volumes")
    ckpt["path"] = str(path)
    if build:
        model = build_model(ckpt["network"])
        try:
            model.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as e:
            raise ValueError(f"{path.name}: the weights do not fit the network config it declares "
                             f"({str(e).splitlines()[0]})") from None
        model.eval()
        ckpt["model"] = model
    return ckpt


def checkpoint_id(ckpt: dict) -> str:
    """A short identifier for results: file name + creation time."""
    return f"{Path(ckpt.get('path', '?')).name}@{ckpt.get('created', '?')}"


def metadata(ckpt: dict) -> dict[str, Any]:
    """The checkpoint without weights / optimiser / rebuilt model (JSON-safe)."""
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "model")}
