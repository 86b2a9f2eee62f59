"""Screenshots of "never silently worse than the input": learned runs whose checks raised warnings.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/screenshots_stagecheck.py [--out DIR]

1. ``stagecheck_flagged_window.png``: the demo pair (IXI, 2 mm) registered by ``weakly`` with a
   deliberately bad checkpoint (the bundled one with its displacement head biased by 3 working
   voxels, a 12 mm shift): the stage check rejects the deformable stage and keeps the affine one;
   the run is marked FLAGGED in the registration panel, the metrics panel and the status bar.
2. ``stagecheck_inputs_window.png`` (when the shared sample data is there): two skull-stripped 1 mm
   MS T1 scans registered by the bundled ``weakly``: the inputs differ from its training data
   (skull-stripped, 1 mm), named in the warning banner.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MS = Path("/work/shared/data/multimodal")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/screenshots", help="output folder")
    ap.add_argument("--size", default="1400x950", help="window size WxH")
    ap.add_argument("--scale", type=float, default=0.75, help="shrink the saved window shots by this factor")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from PySide6.QtCore import QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow
    from bench.screenshots import _raise_dock
    from bench.screenshots_trust import _shrink

    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="regstation_stagecheck_"))
    ckpt = torch.load(root / "resources/checkpoints/weakly.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["deformable.head.bias"] += torch.tensor([3.0, -3.0, 3.0])
    bad = tmp / "weakly_bad.pt"
    torch.save(ckpt, bad)

    app = QApplication.instance() or QApplication(["screenshots"])
    ww, wh = (int(x) for x in a.size.split("x"))

    def window():
        win = MainWindow(confirm_close=False, autosave_dir=tmp / f"autosave{time.time_ns()}")
        win.resize(ww, wh)
        win.move(0, 0)
        win.show()
        return win
    w = window()

    def settle(seconds: float = 0.5) -> None:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)

    def shot(name: str) -> None:
        settle()
        g = w.frameGeometry()
        pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
        if a.scale != 1.0:
            pix = pix.scaledToWidth(int(g.width() * a.scale), Qt.SmoothTransformation)
        pix.save(str(out / name))
        _shrink(out / name)
        print("saved", out / name)

    def run_weakly(checkpoint) -> dict:
        panel = w.registration_panel
        panel.set_paradigm("weakly")
        if checkpoint:
            panel.set_checkpoint(checkpoint)
        t_end = time.perf_counter() + 120
        while (getattr(panel, "_probing", False) or not panel.run_button.isEnabled()) and time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)
        got = {}
        loop = QEventLoop()
        panel.run_finished.connect(lambda r, m: (got.update(metrics=m), loop.quit()))
        panel.run_failed.connect(lambda msg: (got.update(error=msg), loop.quit()))
        QTimer.singleShot(10 * 60 * 1000, loop.quit)
        if panel.run():
            loop.exec()
        return got

    d = demo_pair()
    assert w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    got = run_weakly(bad)
    m = got.get("metrics") or {}
    print("flagged:", m.get("flagged"), "| kept:", (m.get("checks") or {}).get("stage_check", {}).get("kept"),
          "| error:", got.get("error"))
    _raise_dock(w, "Metrics")
    shot("stagecheck_flagged_window.png")

    if (MS / "ms_cross_sectional_patient07/T1.nii.gz").is_file():
        w.close()
        w = window()       # a fresh window: no "replace the images?" question
        assert w.load_pair(MS / "ms_cross_sectional_patient07/T1.nii.gz", MS / "ms_cross_sectional_patient19/T1.nii.gz")
        got = run_weakly(root / "resources/checkpoints/weakly.pt")
        m = got.get("metrics") or {}
        print("MS T1: flagged:", m.get("flagged"), "| warnings:", len(m.get("warnings") or []), "| error:", got.get("error"))
        _raise_dock(w, "Metrics")
        shot("stagecheck_inputs_window.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
