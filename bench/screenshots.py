"""Open the demo pair, run a registration and save PNG screenshots of the main viewer states.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/screenshots.py [--out DIR] [--quick]
        [--paradigm KEY [--param NAME=VALUE ...]]

Writes DIR/NN_<state>.png (whole window, grabbed from the X screen so the VTK areas are real
pixels) and DIR/overlays_axial.png (the axial view in every overlay mode, side by side).
The run goes through the registration panel (worker thread) when the window has one, else
through the engine's ``register_and_measure``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

QUICK = {"stages": "rigid+affine", "levels": "4,2", "linear_iterations": 60}
FULL = {"stages": "rigid+affine+deformable", "deformable": "diffeomorphic_demons",
        "deformable_levels": "4,2", "deformable_iterations": 40}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/screenshots", help="output folder")
    ap.add_argument("--quick", action="store_true", help="affine only (faster, no deformation to show)")
    ap.add_argument("--size", default="1400x1000", help="window size WxH")
    ap.add_argument("--paradigm", default="iterative", help="paradigm to run (learned ones: bundled checkpoint)")
    ap.add_argument("--param", action="append", default=[], help="NAME=VALUE (replaces the iterative presets)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtWidgets import QApplication

    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow

    app = QApplication.instance() or QApplication(["screenshots"])
    w = MainWindow(confirm_close=False, autosave_dir=out / "autosave")
    ww, wh = (int(x) for x in a.size.split("x"))
    w.resize(ww, wh)
    w.move(0, 0)
    w.show()

    def settle(seconds: float = 0.25) -> None:
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)
        for v in w.slice_views.values():
            v.flush()
        w.view3d.render()
        app.processEvents()

    shots: list[str] = []

    def shot(name: str) -> None:
        settle()
        g = w.frameGeometry()
        pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
        path = out / f"{len(shots) + 1:02d}_{name}.png"
        pix.save(str(path))
        shots.append(path.name)
        print("saved", path)

    d = demo_pair()
    t0 = time.perf_counter()
    ok = w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    settle()
    print(f"demo loaded in {time.perf_counter() - t0:.2f} s (ok={ok})")
    st = w.state
    shot("loaded")
    st.set_overlay(mode="blend", source="moving", opacity=0.5, contours_fixed=True, contours_warped=True)
    shot("before_blend_contours")

    from app.engine.paradigms import parse_param_args
    if a.paradigm == "iterative" and not a.param:
        params = QUICK if a.quick else FULL
    else:
        params = parse_param_args(a.param)
    t0 = time.perf_counter()
    _register(w, app, params, a.paradigm)
    print(f"registration done in {time.perf_counter() - t0:.1f} s")
    if st.result is None:
        print("no result: registration failed (see the dialog text above)")
        return 1

    st.set_overlay(mode="blend", source="warped", opacity=0.5, contours_fixed=False, contours_warped=False)
    shot("after_blend")
    st.set_overlay(mode="checkerboard", checker_mm=20.0)
    shot("checkerboard")
    st.set_overlay(mode="difference")
    shot("difference")
    st.set_overlay(mode="none", contours_fixed=True, contours_warped=True)
    shot("label_contours")
    st.set_overlay(contours_fixed=False, contours_warped=False, grid=True, grid_every_vox=5)
    shot("deformation_grid")
    st.set_overlay(grid=False, jacobian=True)
    shot("jacobian")
    st.set_overlay(jacobian=False)
    _add_landmarks(w)
    shot("landmarks")
    if w.metrics_panel is not None:
        _raise_dock(w, "Metrics")
    w.view3d.labels_box.setChecked(True)
    shot("metrics_3d_labels")

    # axial close-ups of every overlay mode, one strip
    ax = w.slice_views["axial"]
    strip = []
    for setting in ({"mode": "none"}, {"mode": "blend", "opacity": 0.5}, {"mode": "checkerboard"},
                    {"mode": "difference"}, {"mode": "flicker"}, {"mode": "none", "contours_fixed": True,
                                                                   "contours_warped": True},
                    {"mode": "none", "contours_fixed": False, "contours_warped": False, "grid": True},
                    {"grid": False, "jacobian": True}):
        st.set_overlay(**setting)
        if setting.get("mode") == "flicker":
            st.set_flicker_phase(1)
        ax.flush()
        strip.append(ax.grab_pixels())
    st.set_overlay(mode="none", jacobian=False)
    h = min(p.shape[0] for p in strip)
    from PySide6.QtGui import QImage
    img = np.ascontiguousarray(np.concatenate([p[:h] for p in strip], 1))
    QImage(img.data, img.shape[1], img.shape[0], img.strides[0], QImage.Format_RGB888).save(
        str(out / "overlays_axial.png"))
    print("saved", out / "overlays_axial.png")
    w.close()
    return 0


def _register(w, app, params: dict, key: str = "iterative") -> None:
    """Run paradigm ``key`` on the loaded pair: through the registration panel (its worker
    thread) when the window has one, else by calling the engine and handing the result to the
    window's run-finished slot."""
    from app.engine import paradigms
    panel = w.registration_panel
    if panel is not None:
        from PySide6.QtCore import QEventLoop, QTimer
        panel.set_paradigm(key)
        panel.set_params(paradigms.make_params(paradigms.get(key).Params, params))
        t_end = time.perf_counter() + 60          # learned: wait for the checkpoint check
        while getattr(panel, "_probing", False) and time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)
        loop = QEventLoop()
        for sig in (panel.run_finished, panel.run_failed, panel.run_cancelled):
            sig.connect(lambda *args: loop.quit())
        QTimer.singleShot(20 * 60 * 1000, loop.quit)
        if panel.run():
            loop.exec()
        return
    from app.engine.evaluation import register_and_measure
    st = w.state
    try:
        result, metrics = register_and_measure(key, st.fixed, st.moving, params,
                                               fixed_labels=st.fixed_labels, moving_labels=st.moving_labels)
    except Exception as e:  # noqa: BLE001
        w._on_run_failed(f"{type(e).__name__}: {e}")
        return
    w._on_run_finished(result, metrics)


def _add_landmarks(w) -> None:
    """A few corresponding points: centroids of some labels in the fixed and moving label maps."""
    st = w.state
    if st.fixed_labels is None or st.moving_labels is None:
        return
    fixed_pts, moving_pts = [], []
    common = np.intersect1d(st.fixed_labels.labels, st.moving_labels.labels)
    for lab in common[:: max(1, len(common) // 6)][:6]:
        for lm, dst in ((st.fixed_labels, fixed_pts), (st.moving_labels, moving_pts)):
            k, j, i = np.nonzero(lm.array == lab)
            dst.append(lm.index_to_physical([[i.mean(), j.mean(), k.mean()]])[0])
    if w.landmark_panel is not None:
        for f, m in zip(fixed_pts, moving_pts):
            w.landmark_panel.add_point("fixed", f)
            w.landmark_panel.add_point("moving", m)
    else:
        st.set_landmarks(np.array(fixed_pts), np.array(moving_pts))
    st.set_cursor(fixed_pts[0])
    st.set_landmarks(selected=fixed_pts[0])


def _raise_dock(w, title: str) -> None:
    from PySide6.QtWidgets import QDockWidget
    for dock in w.findChildren(QDockWidget):
        if dock.windowTitle() == title:
            dock.show()
            dock.raise_()


if __name__ == "__main__":
    sys.exit(main())
