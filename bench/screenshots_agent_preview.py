"""Screenshots of the agent's live preview in the registration panel (mid-run and at the end).

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/screenshots_agent_preview.py [--out DIR]

Loads the demo pair, runs the bundled ``agent`` through the registration panel (the window's engine
thread) and grabs the window while the agent steps (the preview shows the moving image through its
current pose) and after it ends: DIR/agent_preview_running.png, DIR/agent_preview_done.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/screenshots")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow

    app = QApplication.instance() or QApplication(["agent-preview"])
    w = MainWindow(confirm_close=False, autosave_dir=out / "autosave_agent")
    w.resize(1400, 1000)
    w.move(0, 0)
    w.show()
    d = demo_pair()
    w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    panel = w.registration_panel
    panel.set_paradigm("agent")
    t_end = time.perf_counter() + 60
    while getattr(panel, "_probing", False) and time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.02)

    def grab(name: str) -> None:
        from PySide6.QtWidgets import QDockWidget
        for dock in w.findChildren(QDockWidget):
            if dock.windowTitle() == "Registration":
                dock.show()
                dock.raise_()
        app.processEvents()
        g = w.frameGeometry()
        pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
        pix.save(str(out / name))
        print("saved", out / name, "previews so far:", panel.preview_count())

    loop = QEventLoop()
    for sig in (panel.run_finished, panel.run_failed, panel.run_cancelled):
        sig.connect(lambda *args: loop.quit())
    timer = QTimer()
    timer.setInterval(50)
    timer.timeout.connect(lambda: (panel.preview_count() >= 1 and not getattr(timer, "done", False)
                                   and (setattr(timer, "done", True) or grab("agent_preview_running.png"))))
    timer.start()
    QTimer.singleShot(10 * 60 * 1000, loop.quit)
    if panel.run():
        loop.exec()
    timer.stop()
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:
        app.processEvents()
        time.sleep(0.02)
    grab("agent_preview_done.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
