"""The registration panel's checkpoint room: which checkpoint a learned paradigm runs with, and
whether CUDA is there to run it on.

:class:`CheckpointMixin` is combined into :class:`app.widgets.registration_panel.RegistrationPanel`.
The checkpoints of a paradigm are listed and the chosen one validated (its card read, the file
loaded against the paradigm) by :func:`_probe_checkpoints`, a job on the panel's engine thread;
Run stays disabled until it fits. The bundled checkpoint follows the form's ``diffeomorphic``
option unless the user picked one of their own. torch is imported only inside those jobs, never
on the GUI thread.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Slot
from PySide6.QtWidgets import QFileDialog

from app import workers
from app.engine import cards

_ERROR_STYLE = "color: #b00020;"


_BUNDLED_DIR = cards.CHECKPOINT_DIR  # app.engine.cards does not import torch: the panel opens fast


def _probe_checkpoints(key: str, chosen: Optional[str]) -> dict:
    """Worker thread: list the checkpoints of ``key`` and validate ``chosen`` (or the first).

    Returns {"paths": [str], "chosen": str | None, "card": str, "error": str | None}.
    """
    out = {"paths": [], "chosen": None, "card": "", "error": None}
    try:
        from app.engine import checkpoints as C
    except ImportError as e:
        out["error"] = f"checkpoint support is not available ({e})"
        return out
    try:
        paths = [str(p) for p in C.list_checkpoints(key)]
    except Exception as e:  # noqa: BLE001 - a bad folder must not break the panel
        paths = []
        out["error"] = f"could not list checkpoints: {workers.error_message(e)}"
    if chosen and chosen not in paths:
        paths.append(chosen)
    out["paths"] = paths
    chosen = chosen or (paths[0] if paths else None)
    out["chosen"] = chosen
    if chosen is None:
        out["error"] = out["error"] or (f"no checkpoint for '{key}' was found; use Open… to pick one "
                                        f"(train one with: main.py train --paradigm {key})")
        return out
    try:
        out["card"] = format_card(C.read_card(chosen))
    except Exception as e:  # noqa: BLE001
        out["card"] = f"(no card: {workers.error_message(e)})"
    try:
        C.load_checkpoint(chosen, key)
    except (ValueError, OSError) as e:
        out["error"] = workers.error_message(e)
    return out


def _probe_cuda() -> bool:
    import torch
    return bool(torch.cuda.is_available())


def format_card(card: dict, max_chars: int = 4000) -> str:
    """A checkpoint card (dict) as readable text: title, summary, then ``key: value`` lines."""
    if not isinstance(card, dict):
        return str(card)[:max_chars]
    lines = []
    if card.get("title"):
        lines.append(str(card["title"]))
    if card.get("summary"):
        lines.append(str(card["summary"]))
    for k, v in card.items():
        if k in ("title", "summary"):
            continue
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for kk, vv in v.items():
                s = json.dumps(vv, default=str) if isinstance(vv, (dict, list)) else str(vv)
                lines.append(f"  {kk}: {s}")
        else:
            s = json.dumps(v, default=str) if isinstance(v, list) else str(v)
            lines.append(f"{k}: {s}")
    text = "\n".join(lines)
    return text if len(text) <= max_chars else text[:max_chars] + "\n…"


class CheckpointMixin:
    """Checkpoint choice, validation and the CUDA check of the registration panel."""

    # ================================================================ public API
    @property
    def checkpoint(self) -> Optional[str]:
        return self._checkpoint

    @property
    def checkpoint_error(self) -> Optional[str]:
        return self._checkpoint_error

    def set_checkpoint(self, path) -> None:
        """Choose a checkpoint file for the current (learned) paradigm; it is validated in the
        background and Run stays disabled until it fits."""
        self._checkpoint = str(path) if path else None
        self._start_checkpoint_probe()

    # ================================================================ probes (engine thread) and their answers
    def _start_checkpoint_probe(self) -> None:
        key = self._learned_stage()[1]
        if key is None:
            return
        self._probe_gen += 1
        gen = self._probe_gen
        self._probing = True
        self._checkpoint_error = "checking the checkpoint…"
        self.checkpoint_status.setStyleSheet("")
        self.checkpoint_status.setText("Checking checkpoints…")
        self._update_enabled()
        if self._probe_job is not None:
            self._probe_job.cancel()        # superseded: skipped if it has not started yet
        self._probe_job = self.engine.submit(
            _probe_checkpoints, key, self._checkpoint or self._bundled_default(), name="probe_checkpoints", context=self,
            on_done=lambda out: self._on_probe_done(gen, out),
            on_error=lambda msg: self._on_probe_done(gen, {"error": msg, "paths": [], "chosen": None, "card": ""}))

    def _bundled_default(self) -> Optional[str]:
        """The bundled checkpoint matching the form: ``<key>.pt``, or ``<key>_diffeomorphic.pt`` when
        the paradigm has a ``diffeomorphic`` option and it is on (None when there is none)."""
        idx, key = self._learned_stage()
        if key is None:
            return None
        variant = ""
        if idx < len(self.forms):
            try:
                variant = "diffeomorphic" if getattr(self.forms[idx].values(), "diffeomorphic", False) else ""
            except Exception:  # noqa: BLE001 - a half-typed value: keep the plain default
                variant = ""
        path = cards.bundled_path(key, variant)
        return str(path) if path.is_file() else None

    @Slot()
    def _on_form_changed(self) -> None:
        """Follow the form's ``diffeomorphic`` option with the bundled checkpoint of that variant,
        unless the user picked a checkpoint of their own."""
        if not self.is_learned or self.is_running:
            return
        want, cur = self._bundled_default(), self._checkpoint
        if want and cur != want and (cur is None or Path(cur).parent == _BUNDLED_DIR):
            self.set_checkpoint(want)

    def _on_probe_done(self, gen: int, out: dict) -> None:
        if gen != self._probe_gen:
            return      # the user chose something else meanwhile
        self._probing = False
        self.checkpoint_combo.blockSignals(True)
        self.checkpoint_combo.clear()
        for p in out.get("paths", []):
            self.checkpoint_combo.addItem(Path(p).name, p)
            self.checkpoint_combo.setItemData(self.checkpoint_combo.count() - 1, p, Qt.ToolTipRole)
        chosen = out.get("chosen")
        if chosen is not None:
            self.checkpoint_combo.setCurrentIndex(max(0, self.checkpoint_combo.findData(chosen)))
        self.checkpoint_combo.blockSignals(False)
        self._checkpoint = chosen
        self._checkpoint_error = out.get("error")
        self.card_text.setPlainText(out.get("card", ""))
        if self._checkpoint_error:
            self.checkpoint_status.setStyleSheet(_ERROR_STYLE)
            self.checkpoint_status.setText(self._checkpoint_error)
        else:
            self.checkpoint_status.setStyleSheet("")
            self.checkpoint_status.setText(f"{Path(chosen).name} fits '{self._learned_stage()[1]}'")
        self._update_enabled()

    @Slot()
    def _on_checkpoint_change(self, *_):
        self.set_checkpoint(self.checkpoint_combo.currentData())

    @Slot()
    def _on_open_checkpoint(self):
        start = str(Path(self._checkpoint).parent) if self._checkpoint else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open checkpoint", start, "Checkpoints (*.pt *.pth);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def _ensure_cuda_probe(self) -> None:
        if self._cuda is not None or self._cuda_probing:
            return
        self._cuda_probing = True

        def done(ok):
            self._cuda_probing = False
            self._cuda = bool(ok)
            if self._cuda and self.device_combo.findData("cuda") < 0:
                self.device_combo.addItem("cuda", "cuda")

        def failed(msg):
            self._cuda_probing = False
            self._cuda = False

        self.engine.submit(_probe_cuda, name="probe_cuda", context=self, on_done=done, on_error=failed,
                           on_cancelled=lambda: failed("cancelled"))
