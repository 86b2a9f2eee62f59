"""Screenshot of the dsm agreement map overlay: a real multimodal pair registered with ``dsm`` from the GUI.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/screenshots_dsm.py [--out DIR]

Fixed: T1 of the held-out MS patient (``/work/shared/data/multimodal/ms_cross_sectional_patient19``,
never seen by the bundled checkpoint); moving: its T2 moved by a known rigid transform (12 degrees,
10 mm; written to a temporary file). The pair is registered with the ``dsm`` defaults through the
registration panel (worker thread), the overlay "dsm disagreement map" is switched on and the cursor is
put on the brain voxel of lowest agreement. Writes ``dsm_similarity_window.png`` (the window, with the
colour bar and the read-out in the status line) and ``dsm_similarity_axial.png`` (the axial view).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

DATA = Path("/work/shared/data/multimodal/ms_cross_sectional_patient19")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/screenshots", help="output folder")
    ap.add_argument("--size", default="1400x950", help="window size WxH")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    import SimpleITK as sitk
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage
    from PySide6.QtWidgets import QApplication

    from app.engine import io
    from app.engine.spatial import resample
    from app.engine.types import Transform
    from app.widgets.main_window import MainWindow
    from bench.screenshots import _register

    tmp = Path(tempfile.mkdtemp(prefix="regstation_dsm_shot_"))
    t2 = io.read_volume(DATA / "T2.nii.gz")
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(t2.index_to_physical([[(n - 1) / 2 for n in t2.size_xyz]])[0]))
    t.SetRotation(np.deg2rad(8), np.deg2rad(-6), np.deg2rad(6))
    t.SetTranslation((6.0, -6.0, 5.0))
    moved = resample(t2, t2, Transform(t, "rigid"), "linear")   # moved(x) = T2(T(x))
    io.write_volume(moved, tmp / "T2_moved.nii.gz")

    app = QApplication.instance() or QApplication(["screenshots"])
    w = MainWindow(confirm_close=False, autosave_dir=tmp / "autosave")
    ww, wh = (int(x) for x in a.size.split("x"))
    w.resize(ww, wh)
    w.move(0, 0)
    w.show()

    def settle(seconds: float = 0.3) -> None:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)
        for v in w.slice_views.values():
            v.flush()
        w.view3d.render()
        app.processEvents()

    assert w.load_pair(DATA / "T1.nii.gz", tmp / "T2_moved.nii.gz")
    st = w.state
    t0 = time.perf_counter()
    w.registration_panel.run_failed.connect(lambda *args: print("run failed:", *args))
    _register(w, app, {}, key="dsm")
    if st.result is None or st.similarity_map is None:
        print("no result / no similarity map")
        return 1
    print(f"dsm registration + map: {time.perf_counter() - t0:.1f} s; timings {st.result.timings}")
    sm = st.similarity_map.array
    print(f"agreement over scored voxels: mean {np.nanmean(sm):.3f}, 5th percentile {np.nanpercentile(sm, 5):.3f}")
    st.set_overlay(mode="none", similarity_map=True)
    inside = np.isfinite(sm) & (st.fixed.array > np.percentile(st.fixed.array, 60))   # in the brain
    k, j, i = np.unravel_index(np.argmin(np.where(inside, sm, np.inf)), sm.shape)
    st.set_cursor(st.fixed.index_to_physical([[i, j, k]])[0])
    settle(1.0)
    g = w.frameGeometry()
    pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
    pix = pix.scaledToWidth(int(g.width() * 0.75), Qt.SmoothTransformation)
    pix.save(str(out / "dsm_similarity_window.png"))
    img = np.ascontiguousarray(w.slice_views["axial"].grab_pixels())
    QImage(img.data, img.shape[1], img.shape[0], img.strides[0], QImage.Format_RGB888).save(
        str(out / "dsm_similarity_axial.png"))
    print("status line:", w.cursor_label.text())
    print("saved", out / "dsm_similarity_window.png", out / "dsm_similarity_axial.png")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
