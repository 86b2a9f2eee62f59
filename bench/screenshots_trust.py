"""Screenshots of "trust what you see": the error-map overlay of a run and a landmark-guided correction.

    xvfb-run -a -s "-screen 0 1400x1000x24" .venv/bin/python bench/screenshots_trust.py [--out DIR]

Opens the demo pair, runs a quick affine registration through the registration panel, computes its
error map through the trust panel (engine thread, dissimilarity estimator), then places three guide
pairs (centroids of the fixed and moving labels where the estimated error is largest) and presses
Correct. Writes (small PNGs):

* ``trust_error_map_window.png``   the whole window with the overlay, its colour bar and the metrics panel;
* ``trust_error_map_axial.png``    the axial view alone (cursor on the worst region);
* ``trust_correction_window.png``  the window after Correct (new run listed, guide TRE in the metrics);
* ``trust_correction_before_after.png``  the two-run layout at the first guide, uncorrected | corrected
  (zoomed; the fixed image with the deformation grid, which bends only around the guides;
  fixed guides as cyan squares);
* ``trust_error_map_before_after.png``  the same layout, both runs' error maps on one colour scale.

``--guide-method optimise`` corrects with the image-aware method instead and writes
``trust_correction_optimise_{window,before_after,error_map_before_after}.png``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

QUICK = {"stages": "rigid+affine", "levels": "4,2", "linear_iterations": 60}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/screenshots", help="output folder")
    ap.add_argument("--size", default="1400x950", help="window size WxH")
    ap.add_argument("--scale", type=float, default=0.75, help="shrink the saved window shots by this factor")
    ap.add_argument("--guide-method", default="rbf", choices=("rbf", "optimise"),
                    help="the correction's method; 'optimise' names the correction shots trust_correction_optimise_*")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    from PySide6.QtCore import Qt
    from PySide6.QtGui import QImage
    from PySide6.QtWidgets import QApplication

    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow
    from bench.screenshots import _raise_dock, _register

    app = QApplication.instance() or QApplication(["screenshots"])
    import tempfile
    w = MainWindow(confirm_close=False, autosave_dir=Path(tempfile.mkdtemp(prefix="regstation_shots_")))
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

    def shot(name: str) -> None:
        settle()
        g = w.frameGeometry()
        pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
        if a.scale != 1.0:
            pix = pix.scaledToWidth(int(g.width() * a.scale), Qt.SmoothTransformation)
        pix.save(str(out / name))
        _shrink(out / name)
        print("saved", out / name)

    def save_rgb(img: np.ndarray, name: str) -> None:
        img = np.ascontiguousarray(img)
        QImage(img.data, img.shape[1], img.shape[0], img.strides[0], QImage.Format_RGB888).save(str(out / name))
        _shrink(out / name)
        print("saved", out / name)

    d = demo_pair()
    assert w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    st, ws, tp = w.state, w.workspace, w.trust_panel
    t0 = time.perf_counter()
    _register(w, app, QUICK)
    print(f"registration: {time.perf_counter() - t0:.1f} s")
    if st.result is None:
        print("no result: registration failed")
        return 1
    ws.runs.rename(ws.runs.current, "affine")

    # -- error map (engine thread), overlay and colour bar, cursor on the worst region
    t0 = time.perf_counter()
    assert tp.compute_error_map("dissimilarity")
    w.engine.wait(tp.error_job)
    m = ws.runs.current_run.metrics
    print(f"error map: {time.perf_counter() - t0:.1f} s; mean {m['error_map_mean_mm']:.2f} mm, "
          f"p95 {m['error_map_p95_mm']:.2f} mm, peak at {m['error_map_peak_mm']}")
    st.set_overlay(mode="none", error_map=True)
    w.metrics_panel.goto_worst_error()
    _raise_dock(w, "Metrics")
    if a.guide_method == "rbf":          # the error-map shots do not depend on the correction's method
        shot("trust_error_map_window.png")
        ax = w.slice_views["axial"]
        save_rgb(ax.grab_pixels(), "trust_error_map_axial.png")

    # -- guides where the estimated error is largest: label centroids (fixed, moving)
    em = st.error_map.array
    fl, ml = st.fixed_labels, st.moving_labels
    scores = []
    for lab in np.intersect1d(fl.labels, ml.labels):
        mask = fl.array == lab
        if lab == 0 or mask.sum() < 80 or (ml.array == lab).sum() < 80:
            continue
        scores.append((float(em[mask].mean()), int(lab)))
    # where the estimate is high and the labels' centroids are a few mm apart after the run (a local fix)
    t = st.result.transform
    chosen = []
    for _, lab in sorted(scores, reverse=True):
        cen = []
        for lm in (fl, ml):
            k, j, i = np.nonzero(lm.array == lab)
            cen.append(lm.index_to_physical([[i.mean(), j.mean(), k.mean()]])[0])
        if 2.0 <= np.linalg.norm(t.transform_points(cen[0][None])[0] - cen[1]) <= 6.0:
            chosen.append(lab)
        if len(chosen) == 3:
            break
    for lab in chosen:
        for lm, which in ((fl, "fixed"), (ml, "moving")):
            k, j, i = np.nonzero(lm.array == lab)
            ws.guides.add_point(which, lm.index_to_physical([[i.mean(), j.mean(), k.mean()]])[0])
    print("guide labels:", chosen)
    t0 = time.perf_counter()
    assert tp.correct(a.guide_method)
    w.engine.wait(tp.correct_job)
    print(f"correction: {time.perf_counter() - t0:.1f} s")
    new = ws.runs.current_run
    g = new.metrics["guidance"]
    print(f"{new.name}: guide TRE {g['guide_tre_before_mm']:.2f} -> {g['guide_tre_after_mm']:.2f} mm, "
          f"Dice {ws.runs[0].metrics.get('dice_mean'):.4f} -> {new.metrics.get('dice_mean'):.4f}, "
          f"widths {g.get('widths_mm')} mm")

    # -- before | after side by side (the workstation's two-run layout, linked cursors), at the first
    #    guide: the deformation grid bends only around the guides; then both error maps on one scale
    first = ws.guides.fixed_landmarks().points[0]
    corrected = len(ws.runs) - 1
    st.set_cursor(first)
    st.set_overlay(error_map=False, mode="none", grid=True, grid_every_vox=4)
    w.select_run(0)
    w.set_view_layout("runs")
    sbs = w.side_by_side
    sbs.set_run_b(corrected)
    settle()

    def grab_side_by_side(name: str, zoom: float) -> None:
        settle()
        sbs.flush()
        for v in sbs.views():
            v.fit()
            if zoom != 1.0:
                v.zoom(zoom, about_display=v.lps_to_display(first))
            v.render()
        settle()                        # let the X screen catch up with the renders before grabbing
        top_left = sbs.mapToGlobal(sbs.rect().topLeft())
        pix = app.primaryScreen().grabWindow(0, top_left.x(), top_left.y(), sbs.width(), sbs.height())
        pix.save(str(out / name))
        _shrink(out / name)
        print("saved", out / name)

    tag = "trust_correction" if a.guide_method == "rbf" else f"trust_correction_{a.guide_method}"
    grab_side_by_side(f"{tag}_before_after.png", 1.6)
    _raise_dock(w, "Trust")
    shot(f"{tag}_window.png")
    w.select_run(corrected)
    assert tp.compute_error_map("dissimilarity")
    w.engine.wait(tp.error_job)
    mc = ws.runs[corrected].metrics
    print(f"error map of the corrected run: mean {mc['error_map_mean_mm']:.2f} mm, p95 {mc['error_map_p95_mm']:.2f} mm")
    w.select_run(0)
    sbs.set_run_b(corrected)
    st.set_overlay(grid=False, error_map=True)
    grab_side_by_side("trust_error_map_before_after.png" if a.guide_method == "rbf"
                      else f"{tag}_error_map_before_after.png", 1.0)
    w.close()
    return 0


def _shrink(path: Path) -> None:
    """256-colour PNG (a third of the size; the screenshots stay legible), when Pillow is there."""
    try:
        from PIL import Image
    except ImportError:
        return
    img = Image.open(path).convert("RGB")
    img.quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
