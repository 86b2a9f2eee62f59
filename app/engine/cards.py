"""Checkpoint cards and the bundled checkpoint folder, without torch.

A checkpoint file (see :mod:`app.engine.checkpoints`, which needs torch) has two cards beside it:
``NAME.card.json`` (data, training, measured Dice / folding / time) and ``NAME.md`` (the same, to
read). Bundled checkpoints live in ``resources/checkpoints/<paradigm>[_<variant>].pt``. The GUI
lists and describes checkpoints through this module so that it opens without importing torch;
only :func:`read_card` of a checkpoint *without* a JSON card loads the file (and torch).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .jsonsafe import to_jsonable

CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "resources" / "checkpoints"

__all__ = ["CHECKPOINT_DIR", "card_paths", "lineage", "write_card", "read_card", "list_checkpoints",
           "bundled_path", "default_checkpoint"]


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
    card = to_jsonable(card)
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
    from .checkpoints import _read_raw  # torch, only for a checkpoint without a JSON card
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


def bundled_path(paradigm_key: str, variant: str = "") -> Path:
    """Where the bundled checkpoint of ``paradigm_key`` (and ``variant``) lives, whether or not it exists:
    ``resources/checkpoints/<paradigm_key>[_<variant>].pt``."""
    return CHECKPOINT_DIR / (f"{paradigm_key}_{variant}.pt" if variant else f"{paradigm_key}.pt")


def default_checkpoint(paradigm_key: str, variant: str = "") -> Path:
    """The bundled checkpoint ``resources/checkpoints/<paradigm_key>[_<variant>].pt``.

    Raises ValueError (with how to get one) when it is not there.
    """
    path = bundled_path(paradigm_key, variant)
    name = path.name
    if not path.is_file():
        raise ValueError(f"no bundled checkpoint {name} for paradigm '{paradigm_key}' in {CHECKPOINT_DIR}; "
                         f"train one with `main.py train --paradigm {paradigm_key} --out FILE` and pass it as the checkpoint")
    return path
