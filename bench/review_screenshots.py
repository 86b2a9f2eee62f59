"""Screenshots of the review workstation's second pass, to check by eye (issue 12).

    xvfb-run -a -s "-screen 0 1366x768x24" .venv/bin/python bench/review_screenshots.py [--out DIR]

Opens the demo pair in a window fitted to the screen (run it on a 1366 x 768 screen), runs two
quick iterative registrations (rigid; rigid + affine) and saves:

  layout_1366x768.png        the four-up layout on a 1366 x 768 screen
  compare_runs_ab.png        two runs side by side (A | B), label contours, linked cursors
  landmarks_side_by_side.png placing landmarks: fixed | moving
  colour_labels.png          filled colour labels with the status bar read-out under the cursor
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/screenshots")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from PySide6.QtWidgets import QApplication

    from app.engine.evaluation import register_and_measure
    from app.gui import demo_pair
    from app.widgets.main_window import MainWindow

    app = QApplication.instance() or QApplication(["review_screenshots"])
    w = MainWindow(confirm_close=False, autosave_dir=Path("/tmp") / "review_autosave")
    w.move(0, 0)
    w.show()

    def settle(seconds=0.4):
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            app.processEvents()
            time.sleep(0.02)
        for v in list(w.slice_views.values()) + list(w.side_by_side.views()):
            v.flush()
        w.view3d.render()
        app.processEvents()

    def shot(name):
        settle()
        g = w.frameGeometry()
        pix = app.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
        pix.save(str(out / f"{name}.png"))
        print("saved", out / f"{name}.png", f"{g.width()}x{g.height()}")

    d = demo_pair()
    w.load_pair(d["fixed"], d["moving"], d.get("fixed_labels"), d.get("moving_labels"))
    settle(1.0)
    shot("layout_1366x768")

    st = w.state
    common = {"levels": "4,2", "linear_iterations": 40}
    for stages in ("rigid", "rigid+affine"):
        t0 = time.perf_counter()
        res, m = register_and_measure("iterative", st.fixed, st.moving, {"stages": stages, **common},
                                      fixed_labels=st.fixed_labels, moving_labels=st.moving_labels)
        print(f"{stages}: {time.perf_counter() - t0:.1f} s, Dice {m.get('dice_mean')}")
        w.add_run(res, m)
    st.set_overlay(mode="none", contours_fixed=True, contours_warped=True)
    st.set_cursor(st.fixed.index_to_physical(np.asarray(st.fixed.size_xyz) // 2 + [0, 0, 6])[0])
    w.set_view_layout("runs")
    shot("compare_runs_ab")

    # landmarks: a few label centroids in each image, placed side by side
    st.set_overlay(contours_fixed=False, contours_warped=False)
    fl, ml = st.fixed_labels, st.moving_labels
    common_labels = np.intersect1d(fl.labels, ml.labels)
    lm = w.workspace.landmarks
    for lab in common_labels[:: max(1, len(common_labels) // 5)][:5]:
        for which, labels in (("fixed", fl), ("moving", ml)):
            k, j, i = np.nonzero(labels.array == lab)
            lm.add_point(which, labels.index_to_physical([[i.mean(), j.mean(), k.mean()]])[0])
    w.set_view_layout("landmarks")
    sbs = w.side_by_side
    sbs.left_state.set_cursor(lm.pairs()[0]["fixed"])
    sbs.right_state.set_cursor(lm.pairs()[0]["moving"])
    shot("landmarks_side_by_side")

    w.set_view_layout("four_up")
    st.set_overlay(label_fill="fixed", label_opacity=0.5)
    k, j, i = np.nonzero(fl.array == common_labels[len(common_labels) // 2])
    st.set_cursor(fl.index_to_physical([[int(np.median(i)), int(np.median(j)), int(np.median(k))]])[0])
    w._update_readout()
    shot("colour_labels")
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
