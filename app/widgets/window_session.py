"""The main window's saving and restoring: sessions (open / save / save as), the results of the
run on screen, and where file dialogs start.

:class:`SessionMixin` is combined into :class:`app.widgets.main_window.MainWindow`. The file
formats and the snapshots of the window live in :mod:`app.widgets.session`; this room holds the
window side: the dialogs, running the writes on the engine thread, the ``unsaved_results`` flag
and moving the landmark and guide autosaves along with the session file.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from . import session as session_io


class SessionMixin:
    """Session and results saving of the main window (see the module docstring)."""

    # ------------------------------------------------------------------ saving
    def data_dir(self) -> str:
        """Where file dialogs start: next to the session, else next to the fixed (or moving)
        image, else the home folder."""
        if self.session_path is not None:
            return str(Path(self.session_path).parent)
        for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
            if role in self.state.paths:
                return str(Path(self.state.paths[role]).parent)
        return str(Path.home())

    def save_results(self, folder) -> list[Path]:
        """Write the current run into ``folder`` on the engine thread (see
        :func:`app.widgets.session.write_results`)."""
        written = self.engine.call(session_io.write_results, session_io.results_snapshot(self), folder,
                                   name="save results")
        self.unsaved_results = False
        return written

    def _ask_save_results(self) -> None:
        if self.state.result is None:
            self.show_error("Nothing to save", "Run a registration first: there is no result to save yet.")
            return
        folder = QFileDialog.getExistingDirectory(self, "Save results into folder", self.data_dir())
        if folder:
            try:
                written = self.save_results(folder)
                self.statusBar().showMessage(f"Saved {len(written)} files to {folder}", 8000)
            except Exception as e:  # noqa: BLE001
                self.show_error("Could not save the results", str(e))

    def save_session(self, path) -> None:
        """Write the session (JSON and the runs' transforms) on the engine thread."""
        self.engine.call(session_io.write_session, session_io.session_snapshot(self, path), path,
                         name="save session")
        self._set_session_path(path)
        self.unsaved_results = False

    def _set_session_path(self, path) -> None:
        self.session_path = Path(path)
        if self.landmark_panel is not None:
            self.landmark_panel.set_autosave_path(session_io.landmarks_autosave_path(self))
        if getattr(self, "guide_panel", None) is not None:
            self.guide_panel.set_autosave_path(session_io.guides_autosave_path(self))

    def open_session(self, path) -> bool:
        """Restore a saved session; on failure show why and keep the current work."""
        lp = self.landmark_panel
        if lp is not None:
            lp.set_autosave_path(None)   # do not overwrite the current autosave while loading
        gp = getattr(self, "guide_panel", None)
        if gp is not None:
            gp.set_autosave_path(None)
        try:
            session_io.load_session(self, path)
        except Exception as e:  # noqa: BLE001
            if lp is not None:
                lp.set_autosave_path(session_io.landmarks_autosave_path(self))
            if gp is not None:
                gp.set_autosave_path(session_io.guides_autosave_path(self))
            self.show_error("Could not open the session", f"{Path(path).name}:\n{e}")
            return False
        self._set_session_path(path)
        return True

    def _ask_open_session(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", self.data_dir(), "RegStation session (*.json)")
        if path:
            self.open_session(path)

    def _ask_save_session(self, force_ask: bool = False) -> None:
        path = self.session_path
        if path is None or force_ask:
            p, _ = QFileDialog.getSaveFileName(self, "Save session", str(Path(self.data_dir()) / "session.json"),
                                               "RegStation session (*.json)")
            if not p:
                return
            path = Path(p)
        try:
            self.save_session(path)
            self.statusBar().showMessage(f"Session saved to {path}", 5000)
        except Exception as e:  # noqa: BLE001
            self.show_error("Could not save the session", str(e))
