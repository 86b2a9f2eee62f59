"""Model checkpoints: one file per model, with the metadata needed to rebuild and to trust it.

A checkpoint is a ``torch.save``'d dict of plain values and tensors::

    {format_version, paradigm,
     network: {kind, ...constructor config},          # rebuilt with nn.networks.build_model
     state_dict: {name: tensor},                       # loaded strictly
     preprocessing: {grid_shape, spacing_mm, direction, percentile, prealignment, spatial_dims, intensity},
     training: {data, split, steps, losses, final validation metrics, ...},
     created: ISO time,
     optimizer: optional optimiser state (for resuming)}

It is loaded with ``torch.load(weights_only=True)``: a file holding any other Python object is
refused without running its code. Bundled checkpoints live in ``resources/checkpoints/`` with a
card beside each (``NAME.card.json`` + ``NAME.md``: data, training, measured Dice / folding / time).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

FORMAT_VERSION = 1
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "resources" / "checkpoints"
_REQUIRED = ("format_version", "paradigm", "network", "state_dict", "preprocessing")


def _plain(obj):
    """Convert numpy scalars/arrays, tuples and paths to plain lists/floats (weights_only-safe)."""
    import numpy as np
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


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
    prep = _plain(dict(preprocessing))
    prep.setdefault("spatial_dims", len(prep.get("grid_shape", (0, 0, 0))))
    ckpt = {
        "format_version": FORMAT_VERSION,
        "paradigm": str(paradigm),
        "network": _plain(model.config),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocessing": prep,
        "training": _plain(training or {}),
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


def load_checkpoint(path: str | os.PathLike, expected_paradigm: Optional[str] = None, build: bool = True) -> dict:
    """Read and validate a checkpoint; rebuild its network.

    Returns the checkpoint dict plus ``"model"`` (the rebuilt network on the CPU, in eval mode, when
    ``build``) and ``"path"``. Raises ValueError with the reason when the file is missing, is not a
    checkpoint, holds foreign Python objects, has a newer format, belongs to another paradigm, is
    2D, or its weights do not fit its network config.
    """
    from .nn.networks import build_model
    path = Path(path)
    ckpt = _read_raw(path)
    if not isinstance(ckpt["format_version"], int) or ckpt["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path.name} has checkpoint format {ckpt['format_version']!r}; this RegStation reads "
                         f"format <= {FORMAT_VERSION} (update RegStation)")
    if expected_paradigm is not None and ckpt["paradigm"] != expected_paradigm:
        raise ValueError(f"{path.name} was trained for paradigm '{ckpt['paradigm']}', not '{expected_paradigm}'; "
                         f"pick a checkpoint made for '{expected_paradigm}'")
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


# --------------------------------------------------------------------------- cards and bundled files
def card_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(JSON card, markdown card) beside a checkpoint file."""
    p = Path(path)
    return p.with_suffix(".card.json"), p.with_suffix(".md")


def lineage(training: dict) -> list[str]:
    """One line per training run behind a checkpoint (from ``training["init"]`` chains), first run first."""
    out, t = [], training
    while isinstance(t, dict):
        losses = t.get("losses") or {}
        parts = [f"{t.get('stage', '?')} stage, {t.get('steps', '?')} steps"]
        sim = losses.get("similarity")
        if sim:
            parts.append(sim + (f" window {losses['lncc_window']}" if sim == "lncc" and losses.get("lncc_window") else ""))
        parts += [f"{k} {losses[k]}" for k in ("w_smooth", "w_dice", "dice_labels", "w_adv", "self_pairs")
                  if losses.get(k)]
        if t.get("lr") is not None:
            parts.append(f"lr {t['lr']}" + (f" {t['lr_schedule']}" if t.get("lr_schedule") else ""))
        init = t.get("init") if isinstance(t.get("init"), dict) else {}
        loaded = init.get("stages_loaded")
        if isinstance(loaded, dict) and loaded:
            def name(v):
                return Path(v["path"] if isinstance(v, dict) else str(v)).name
            parts.append("started from " + ", ".join(f"{k} of {name(v)}" for k, v in loaded.items()))
        elif isinstance(loaded, list) and init.get("path"):
            parts.append(f"started from {', '.join(loaded)} of {Path(init['path']).name}")
        out.append("; ".join(parts))
        t = init.get("training")
    return out[::-1]


def write_card(path: str | os.PathLike, card: dict) -> None:
    """Write the JSON and markdown cards beside checkpoint ``path``.

    The markdown card lists the training lineage (:func:`lineage`) instead of the nested ``init``
    records, which the JSON card keeps whole."""
    jpath, mpath = card_paths(path)
    card = _plain(card)
    if isinstance(card.get("training"), dict) and card["training"].get("init"):
        card["lineage"] = lineage(card["training"])
    jpath.write_text(json.dumps(card, indent=1))
    lines = [f"# {card.get('title', Path(path).stem)}", ""]
    if card.get("summary"):
        lines += [card["summary"], ""]
    for key, val in card.items():
        if key in ("title", "summary"):
            continue
        lines.append(f"## {key}")
        if key == "training" and isinstance(val, dict):
            val = {k: v for k, v in val.items() if k not in ("init", "val_history")}
        if isinstance(val, dict):
            lines += [f"- **{k}**: {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in val.items()]
        elif isinstance(val, list):
            lines += [f"- {json.dumps(v) if isinstance(v, (dict, list)) else v}" for v in val]
        else:
            lines.append(str(val))
        lines.append("")
    mpath.write_text("\n".join(lines))


def read_card(path: str | os.PathLike) -> dict:
    """The card of a checkpoint: its JSON card when present, else the metadata stored in the file."""
    jpath, _ = card_paths(path)
    if jpath.is_file():
        return json.loads(jpath.read_text())
    ckpt = _read_raw(Path(path))
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer")}


def list_checkpoints(paradigm_key: str, directory: str | os.PathLike | None = None) -> list[Path]:
    """Checkpoint files (``*.pt``) for ``paradigm_key`` in ``directory`` (default: the bundled ones)."""
    d = Path(directory) if directory else CHECKPOINT_DIR
    out = []
    for p in sorted(d.glob("*.pt")):
        try:
            card = read_card(p)
        except (ValueError, json.JSONDecodeError):
            continue
        if card.get("paradigm") == paradigm_key:
            out.append(p)
    return out


def default_checkpoint(paradigm_key: str, variant: str = "") -> Path:
    """The bundled checkpoint ``resources/checkpoints/<paradigm_key>[_<variant>].pt``.

    Raises ValueError (with how to get one) when it is not there.
    """
    name = f"{paradigm_key}_{variant}.pt" if variant else f"{paradigm_key}.pt"
    path = CHECKPOINT_DIR / name
    if not path.is_file():
        raise ValueError(f"no bundled checkpoint {name} for paradigm '{paradigm_key}' in {CHECKPOINT_DIR}; "
                         f"train one with `main.py train --paradigm {paradigm_key} --out FILE` and pass it as the checkpoint")
    return path


def checkpoint_id(ckpt: dict) -> str:
    """A short identifier for results: file name + creation time."""
    return f"{Path(ckpt.get('path', '?')).name}@{ckpt.get('created', '?')}"


def metadata(ckpt: dict) -> dict[str, Any]:
    """The checkpoint without weights / optimiser / rebuilt model (JSON-safe)."""
    return {k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer", "model")}
