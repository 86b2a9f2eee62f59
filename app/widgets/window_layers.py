"""The main window's layers: reading images and label maps into the viewer, closing them, and the
data that goes stale when an image is replaced.

:class:`LayersMixin` is combined into :class:`app.widgets.main_window.MainWindow`. Every read
runs on the window's engine thread (:func:`read_layer`); a failed read shows why and leaves every
loaded layer as it was. Replacing (or closing) a fixed or moving image makes its label map, its
landmarks and every run stale (:meth:`app.viewer.workspace.Workspace.stale_if_replaced`): they
are cleared, or kept when the user says so. Files dropped on the window are sorted here into
sessions, landmark files and images by role; a label colour table is read here too.

The mixin uses the window's ``state``, ``workspace``, ``engine``, ``landmark_panel``,
``metrics_panel``, ``replace_policy`` and ``_running``, and its ``show_error``, ``data_dir``,
``open_session`` and ``_update_readout``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QFileDialog, QMenu, QMessageBox

from app.engine.types import Volume

from . import session as session_io

IMAGE_FILTER = ("Images (*.nii *.nii.gz *.nrrd *.nhdr *.mha *.mhd *.dcm *.DCM *.ima *.IMA);;"
                "DICOM (*.dcm *.DCM *.ima *.IMA);;All files (*)")
ROLE_TITLES = {"fixed": "fixed image", "moving": "moving image", "fixed_labels": "fixed labels",
               "moving_labels": "moving labels"}


def read_layer(role: str, path, reference: Optional[Volume] = None) -> Volume:
    """Read an image (or a label map for the '*_labels' roles) through the engine's io module."""
    from app.engine import io
    if role.endswith("labels"):
        return io.read_labels(str(path), reference=reference)
    return io.read_volume(str(path))


class LayersMixin:
    """Loading, closing and replacing the window's layers (see the module docstring)."""

    # ------------------------------------------------------------------ loading
    def load_layer(self, role: str, path, wait: bool = True) -> bool:
        """Read ``path`` into layer ``role`` on the engine thread; on failure show why and keep
        everything as it was.

        Replacing a loaded fixed or moving image makes its labels, its landmarks and every run
        stale: they are cleared, or kept when the user says so (:meth:`confirm_stale`).
        ``wait``: keep the event loop running until the layer is in (the GUI stays live) and
        return False when nothing was loaded (unreadable file, or the user cancelled); else
        return at once (True: the read was queued)."""
        if role not in ROLE_TITLES:
            raise ValueError(f"unknown layer '{role}'; use one of {', '.join(ROLE_TITLES)}")
        if not self.engine.alive:       # the window closed while a multi-file load was waiting
            return False
        ref = {"fixed_labels": self.state.fixed, "moving_labels": self.state.moving}.get(role)
        outcome: dict = {}

        def done(vol):
            QApplication.restoreOverrideCursor()
            vol.name = vol.name or Path(path).name
            outcome["ok"] = self._apply_layer(role, path, vol)

        def failed(message):
            QApplication.restoreOverrideCursor()
            self.show_error(f"Could not open the {ROLE_TITLES[role]}", f"{Path(path).name}:\n{message}")
            outcome["ok"] = False

        QApplication.setOverrideCursor(Qt.BusyCursor)
        self.statusBar().showMessage(f"Reading {Path(path).name}…")
        job = self.engine.submit(read_layer, role, path, ref, name=f"read {role}", context=self,
                                 on_done=done, on_error=failed, on_cancelled=lambda: failed("cancelled"))
        if not wait:
            return True
        self.engine.wait(job)
        return bool(outcome.get("ok"))

    def _apply_layer(self, role: str, path, vol) -> bool:
        same_file = self.state.paths.get(role) == str(Path(path).resolve())
        if not same_file and not self._release_dependents(role, f"Loading {Path(path).name} as the {ROLE_TITLES[role]}"):
            self.statusBar().showMessage(f"Kept the {ROLE_TITLES[role]}", 5000)
            return False
        try:
            self.state.set_layer(role, vol, str(Path(path).resolve()))
        except ValueError as e:
            self.show_error(f"Could not open the {ROLE_TITLES[role]}", f"{Path(path).name}:\n{e}")
            return False
        self.statusBar().showMessage(f"Loaded {ROLE_TITLES[role]}: {Path(path).name}", 5000)
        return True

    def load_colour_table(self, path) -> bool:
        """Label names and colours from a Slicer / ITK-SNAP / FreeSurfer table (engine thread)."""
        from app.viewer.colour_table import read_colour_table
        try:
            table = self.engine.call(read_colour_table, str(path), name="read colour table")
        except ValueError as e:
            self.show_error("Could not read the colour table", str(e))
            return False
        self.label_table_path = str(Path(path).resolve())
        self.state.set_label_table(table)
        if self.metrics_panel is not None:
            self.metrics_panel.set_label_names({v: name for v, (name, _) in table.items()})
        self._update_readout()
        self.statusBar().showMessage(f"{len(table)} label names from {Path(path).name}", 5000)
        return True

    def _ask_open_colour_table(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open label colour table", self.data_dir(),
                                              "Colour tables (*.ctbl *.txt *.lut *.label);;All files (*)")
        if path:
            self.load_colour_table(path)

    # ------------------------------------------------------------------ stale data
    def stale_if_replaced(self, role: str) -> list[str]:
        """What replacing or closing layer ``role`` makes stale (see :class:`Workspace`)."""
        return self.workspace.stale_if_replaced(role)

    def confirm_stale(self, action: str, stale: list[str]) -> str:
        """Ask what to do with data computed on an image that is being replaced:
        'clear' (default button), 'keep' or 'cancel'. ``replace_policy`` other than 'ask'
        answers without a dialog."""
        if self.replace_policy != "ask":
            return self.replace_policy
        box = QMessageBox(QMessageBox.Warning, "Replace image",
                          f"{action} makes these stale:\n  - " + "\n  - ".join(stale) +
                          "\n\nThey belong to the previous image. Clear them, or keep them anyway?", parent=self)
        clear = box.addButton("Clear them", QMessageBox.AcceptRole)
        clear.setObjectName("clear")
        keep = box.addButton("Keep them", QMessageBox.DestructiveRole)
        keep.setObjectName("keep")
        cancel = box.addButton(QMessageBox.Cancel)
        cancel.setObjectName("cancel")
        box.setDefaultButton(clear)
        box.setEscapeButton(cancel)
        box.exec()
        b = box.clickedButton()
        return "clear" if b is clear else "keep" if b is keep else "cancel"

    def _release_dependents(self, role: str, action: str) -> bool:
        """Before ``role`` changes: clear (or keep, if the user says so) what depends on it.
        False when the user cancelled."""
        stale = self.stale_if_replaced(role)
        if not stale:
            return True
        answer = self.confirm_stale(action, stale)
        if answer == "cancel":
            return False
        if answer == "clear":
            self.clear_dependents(role)
        return True

    def clear_dependents(self, role: str) -> None:
        """Drop the label map and landmarks of image ``role`` and every run."""
        self.workspace.clear_dependents(role)

    def unload_layer(self, role: str) -> bool:
        """Remove layer ``role`` (and, for an image, what depends on it; see :meth:`load_layer`)."""
        if role not in ROLE_TITLES:
            raise ValueError(f"unknown layer '{role}'; use one of {', '.join(ROLE_TITLES)}")
        if getattr(self.state, role) is None:
            return True
        if self._running:
            self.show_error("Registration running", "Wait for the run to end (or cancel it) before closing layers.")
            return False
        if not self._release_dependents(role, f"Closing the {ROLE_TITLES[role]}"):
            return False
        self.state.set_layer(role, None)
        self.statusBar().showMessage(f"Closed the {ROLE_TITLES[role]}", 5000)
        return True

    def unload_all(self, ask: bool = True) -> bool:
        """Close every layer, landmark and run (a fresh start). ``ask``: confirm first when there
        is anything to lose."""
        has = any(getattr(self.state, r) is not None for r in ROLE_TITLES)
        if ask and has and self.replace_policy == "ask":
            if QMessageBox.question(self, "Close all", "Close every image, label map, landmark and run?",
                                    QMessageBox.Yes | QMessageBox.Cancel) != QMessageBox.Yes:
                return False
        self.workspace.clear()
        return True

    def load_pair(self, fixed, moving, fixed_labels=None, moving_labels=None) -> bool:
        """Load a fixed/moving pair (and labels); True when all given files loaded."""
        ok = True
        for role, p in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                        ("moving_labels", moving_labels)):
            if p is not None:
                ok = self.load_layer(role, p) and ok
        return ok

    def load_files(self, paths: list) -> None:
        """Open dropped files: sessions, landmarks, or images by name and count."""
        paths = [Path(p) for p in paths]
        for p in [p for p in paths if p.name.endswith(".json") and not p.name.endswith(".mrk.json")]:
            self.open_session(p)
            return
        images = [p for p in paths if not p.name.lower().endswith(session_io.LANDMARK_SUFFIXES)]
        # images before label maps: a new image clears its old labels, then the dropped ones come
        for role, p in sorted(self._roles_for(images), key=lambda rp: rp[0].endswith("labels")):
            self.load_layer(role, p)
        marks = [p for p in paths if p.name.lower().endswith(session_io.LANDMARK_SUFFIXES)]
        for i, p in enumerate(marks):
            # two files: fixed then moving; one file: the side that has no points yet
            has_fixed = self.landmark_panel is not None and any(
                q["fixed"] is not None for q in self.landmark_panel.pairs())
            which = ("fixed", "moving")[i] if len(marks) == 2 else ("moving" if has_fixed else "fixed")
            self.import_landmarks(p, which)

    def _roles_for(self, images: list[Path]) -> list[tuple[str, Path]]:
        return session_io.guess_roles(images, self.state)

    def import_landmarks(self, path, which: str) -> bool:
        """Read a landmark file into the fixed or moving side of the landmark panel."""
        if self.landmark_panel is None:
            self.show_error("Landmarks", "The landmark panel is not available.")
            return False
        try:
            n = self.landmark_panel.import_file(str(path), which)
        except Exception as e:  # noqa: BLE001
            self.show_error("Could not read landmarks", f"{Path(path).name}:\n{e}")
            return False
        self.statusBar().showMessage(f"Imported {n} {which} landmarks from {Path(path).name}", 5000)
        return True

    def _ask_open(self, role: str) -> None:
        path, _ = QFileDialog.getOpenFileName(self, f"Open {ROLE_TITLES[role]}", self.data_dir(), IMAGE_FILTER)
        if path:
            self.load_layer(role, path, wait=False)

    # ------------------------------------------------------------------ drag and drop
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and not self._running:
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            if len(paths) == 1 and not paths[0].endswith(".json") and \
                    not paths[0].lower().endswith(session_io.LANDMARK_SUFFIXES):
                self._ask_drop_role(Path(paths[0]), event.position().toPoint())
            else:
                self.load_files(paths)

    def _ask_drop_role(self, path: Path, pos) -> None:
        menu = QMenu(self)
        for role, title in ROLE_TITLES.items():
            menu.addAction(f"Open as {title}").setData(role)
        chosen = menu.exec(self.mapToGlobal(pos))
        if chosen is not None:
            self.load_layer(chosen.data(), path)
