"""Viewer responsiveness: open a 256^3 volume, slice-scroll frame rate, overlay switch latency.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/gui_speed.py [--size 256] [--json out.json]

The fixed image is the demo's fixed T1 resampled to SIZE^3 (written to a temporary NIfTI first,
not timed); the moving image is the demo's moving T1 on its own 120 x 120 x 90 grid, so overlays
exercise the general (resampling) slice path. Times are wall clock in the GUI thread, from the
action to the rendered frame of the three slice views (``Render()`` returns after the GL draw).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="edge of the cubic test volume (voxels)")
    ap.add_argument("--frames", type=int, default=60, help="slices scrolled per measurement")
    ap.add_argument("--window", default="1280x960", help="main window size WxH")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    a = ap.parse_args(argv)

    import SimpleITK as sitk
    from PySide6.QtWidgets import QApplication

    from app.engine import io, spatial
    from app.engine.types import RegistrationResult, Transform
    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow

    demo = demo_pair()
    tmp = Path(tempfile.mkdtemp(prefix="regstation_bench_"))
    src = io.read_volume(demo["fixed"])
    lo, hi = src.physical_bounds()
    n = a.size
    ref = sitk.Image([n, n, n], sitk.sitkFloat32)
    sp = float((hi - lo).max()) / (n - 1)
    ref.SetSpacing((sp, sp, sp))
    ref.SetOrigin(tuple(map(float, lo)))
    big = sitk.Resample(src.to_sitk(sitk.sitkFloat32), ref, sitk.Transform(), sitk.sitkLinear, 0.0)
    big_path = tmp / f"fixed_{n}.nii.gz"
    sitk.WriteImage(big, str(big_path))

    app = QApplication.instance() or QApplication(["gui_speed"])
    w = MainWindow(confirm_close=False, autosave_dir=tmp / "autosave")
    ww, wh = (int(x) for x in a.window.split("x"))
    w.resize(ww, wh)
    w.show()
    for _ in range(5):
        app.processEvents()
    views = list(w.slice_views.values())

    def frame() -> None:
        for v in views:
            v.flush()

    out: dict = {"volume": f"{n}^3 float32, {sp:.3f} mm", "window": a.window,
                 "view_pixels": [list(v.render_window.GetSize()) for v in views]}

    # -- open a 256^3 volume: read + first frame of the three slice views (+ 3D)
    t0 = time.perf_counter()
    ok = w.load_layer("fixed", big_path)
    t_read = time.perf_counter() - t0
    frame()
    t_slices = time.perf_counter() - t0
    app.processEvents()
    w.view3d.render()
    t_all = time.perf_counter() - t0
    assert ok, "loading the test volume failed"
    out["open_s"] = {"read_and_model": round(t_read, 3), "first_slice_frames": round(t_slices, 3),
                     "with_3d_view": round(t_all, 3)}
    w.load_layer("moving", demo["moving"])
    frame()

    # -- slice scrolling
    ax = w.slice_views["axial"]

    def scroll_fps(with_3d: bool) -> float:
        times = []
        for i in range(a.frames):
            t = time.perf_counter()
            ax.scroll(1 if (i // 20) % 2 == 0 else -1)
            frame()
            if with_3d:
                w.view3d.render()
            times.append(time.perf_counter() - t)
        return round(1.0 / float(np.median(times)), 1)

    st = w.state
    fps = {}
    fps["fixed_only"] = scroll_fps(False)
    st.set_overlay(mode="blend", source="moving", opacity=0.5)
    frame()
    fps["blend_moving"] = scroll_fps(False)
    st.set_overlay(contours_fixed=False, mode="none")
    frame()
    fps["fixed_only_with_3d_view"] = scroll_fps(True)
    out["scroll_fps"] = fps

    # -- overlay switch latency (a fake affine result on the big grid gives warped/grid/Jacobian)
    t = sitk.AffineTransform(3)
    t.SetCenter(tuple(map(float, (lo + hi) / 2)))
    t.SetMatrix(tuple((np.eye(3) * 1.05).ravel()))
    t.SetTranslation((4.0, -3.0, 2.0))
    tr = Transform(t, "affine")
    moving = st.moving
    result = RegistrationResult(tr, spatial.resample(moving, st.fixed, tr), paradigm="bench-affine")
    w.add_run(result, {})
    frame()
    lat = {}
    for name, setting in [("blend", {"mode": "blend"}), ("checkerboard", {"mode": "checkerboard"}),
                          ("difference", {"mode": "difference"}), ("flicker", {"mode": "flicker"}),
                          ("none", {"mode": "none"}),
                          ("grid_first", {"grid": True}), ("grid_off", {"grid": False}), ("grid_again", {"grid": True}),
                          ("jacobian_first", {"grid": False, "jacobian": True}), ("jacobian_off", {"jacobian": False}),
                          ("jacobian_again", {"jacobian": True})]:
        t0 = time.perf_counter()
        st.set_overlay(**setting)
        frame()
        lat[name] = round((time.perf_counter() - t0) * 1000, 1)
    out["overlay_switch_ms"] = lat
    w.close()

    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
