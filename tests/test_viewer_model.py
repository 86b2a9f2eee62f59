"""The workspace model (headless, no Qt): landmarks with undo, run history, stale data, TRE."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine.types import LabelMap, RegistrationResult, Transform, Volume
from app.viewer.landmarks import LandmarkPairs
from app.viewer.runs import RunHistory, describe_run
from app.viewer.workspace import Workspace


def _shift(dx, dy=0.0, dz=0.0) -> Transform:
    return Transform(sitk.TranslationTransform(3, (dx, dy, dz)), "rigid")


def _result(t: Transform, paradigm="iterative", params=None) -> RegistrationResult:
    vol = Volume(np.zeros((4, 4, 4), np.float32))
    return RegistrationResult(t, vol, paradigm=paradigm, params=params or {}, device="cpu")


def test_landmark_pairs_undo_sides_and_tre_from_the_engine():
    lm = LandmarkPairs()
    seen = []
    lm.events.changed.connect(seen.append)
    lm.add_point("fixed", (0, 0, 0))
    lm.add_point("moving", (3, 4, 0))
    lm.add_point("fixed", (10, 0, 0))
    assert seen == [0, 0, 1] and lm.pair_count() == 2 and lm.pair_count(complete_only=True) == 1
    before, after = lm.tre(_shift(3, 4))
    np.testing.assert_allclose(before[:1], [5.0]) and np.testing.assert_allclose(after[:1], [0.0], atol=1e-12)
    assert np.isnan(before[1]) and np.isnan(after[1])
    assert lm.tre_summary(_shift(0, 4))["tre_mean_mm"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="3 finite"):
        lm.add_point("fixed", (1, np.nan, 2))
    assert lm.clear_side("moving") == 1 and lm.point_count("moving") == 0 and lm.pair_count() == 2
    assert lm.undo() and lm.point_count("moving") == 1           # clear_side undone
    lm.clear()
    assert len(lm) == 0 and lm.undo() and len(lm) == 2           # clear undone
    while lm.undo():
        pass
    assert len(lm) == 0 and not lm.can_undo


def test_run_history_names_rename_delete_and_current():
    h = RunHistory()
    log = []
    for n in ("added", "removed", "renamed", "current", "cleared"):
        getattr(h.events, n).connect(lambda *a, n=n: log.append((n, *a)))
    i0 = h.add(_result(_shift(1), "unsupervised", {"diffeomorphic": True, "steps": 7}), {"dice_mean": 0.7})
    i1 = h.add(_result(_shift(1), "unsupervised", {"diffeomorphic": True}), {})
    i2 = h.add(_result(_shift(1), "iterative", {"stages": "rigid+affine", "deformable": "none"}), {})
    assert [r.name for r in h.runs] == ["unsupervised (diffeomorphic)", "unsupervised (diffeomorphic) #2",
                                        "iterative (rigid+affine)"]
    assert h.current == i2 and h[i0].metrics["paradigm"] == "unsupervised" and h[i0]["name"] == h[i0].name
    h.rename(i1, "my best")
    assert h[i1].name == "my best" and ("renamed", 1) in log
    with pytest.raises(ValueError, match="empty"):
        h.rename(0, "  ")
    h.set_current(1)
    h.remove(0)                     # the current run moves up with its row
    assert h.current == 0 and h.current_run.name == "my best"
    h.remove(0)                     # the current run itself: the next one becomes current
    assert h.current == 0 and h.current_run.name.startswith("iterative")
    h.clear()
    assert len(h) == 0 and h.current is None and ("cleared",) in log
    assert describe_run("unsupervised+instance", {"1:unsupervised": {"diffeomorphic": True}, "2:instance": {}}) \
        == "unsupervised (diffeomorphic) → instance"


def test_workspace_shows_the_current_run_and_recomputes_every_runs_tre():
    ws = Workspace()
    ws.state.set_layer("fixed", Volume(np.zeros((6, 6, 6), np.float32)))
    ws.state.set_layer("moving", Volume(np.zeros((6, 6, 6), np.float32)))
    a, b = _result(_shift(3.0)), _result(_shift(1.0))
    ws.add_run(a, {})
    ws.add_run(b, {})
    assert ws.state.result is b
    ws.runs.set_current(0)
    assert ws.state.result is a
    # landmarks placed after the runs: both runs get TRE before and after from their transforms
    ws.landmarks.add_point("fixed", (0, 0, 0))
    ws.landmarks.add_point("moving", (3, 0, 0))
    m0, m1 = ws.runs[0].metrics, ws.runs[1].metrics
    assert m0["tre_mean_mm"] == pytest.approx(0.0, abs=1e-9) and m1["tre_mean_mm"] == pytest.approx(2.0)
    assert m0["before"]["tre_mean_mm"] == pytest.approx(3.0) == m1["before"]["tre_mean_mm"]
    np.testing.assert_allclose(ws.state.fixed_points, [[0, 0, 0]])
    ws.landmarks.set_point(0, "moving", (1, 0, 0))
    assert ws.runs[1].metrics["tre_mean_mm"] == pytest.approx(0.0, abs=1e-9)
    ins = ws.registration_inputs()
    assert len(ins["fixed_points"]) == 1 and ins["fixed"] is ws.state.fixed
    ws.landmarks.clear()
    assert ws.runs[0].metrics["tre_mean_mm"] is None         # no landmarks: no TRE
    assert ws.jacobian_at((1.0, 1.0, 1.0)) == pytest.approx(1.0)


def test_replacing_an_image_clears_what_was_computed_on_it():
    ws = Workspace()
    z = np.zeros((6, 6, 6), np.float32)
    ws.state.set_layer("fixed", Volume(z))
    ws.state.set_layer("moving", Volume(z))
    ws.state.set_layer("moving_labels", LabelMap(z.astype(np.int16) + 1))
    ws.state.set_layer("fixed_labels", LabelMap(z.astype(np.int16) + 1))
    ws.landmarks.add_point("fixed", (0, 0, 0))
    ws.landmarks.add_point("moving", (1, 0, 0))
    ws.add_run(_result(_shift(1.0)), {})
    assert ws.stale_if_replaced("moving") == ["the moving labels", "1 moving landmark",
                                              "1 registration run and their metrics"]
    assert ws.stale_if_replaced("moving_labels") == []
    ws.set_layer("moving", Volume(z + 1), keep_dependents=True)
    assert ws.state.moving_labels is not None and len(ws.runs) == 1 and ws.state.result is None
    ws.set_layer("moving", Volume(z + 2))
    assert ws.state.moving_labels is None and len(ws.runs) == 0 and ws.landmarks.point_count("moving") == 0
    assert ws.state.fixed_labels is not None and ws.landmarks.point_count("fixed") == 1
    ws.clear()
    assert ws.state.fixed is None and len(ws.landmarks) == 0


def test_colour_tables_of_slicer_itksnap_and_freesurfer(tmp_path):
    from app.viewer.colour_table import colour_lut, label_rgb_image, read_colour_table
    slicer = tmp_path / "GenericColors.ctbl"
    slicer.write_text("# Color table file\n# 3 values\n0 background 0 0 0 0\n1 tissue 128 174 128 255\n"
                      "17 Left-Hippocampus 220 216 20 255\n")
    snap = tmp_path / "labels.txt"
    snap.write_text('################################################\n# ITK-SnAP Label Description File\n'
                    '    0     0    0    0        0  0  0    "Clear Label"\n'
                    '    1   255    0    0        1  1  1    "Left ventricle"\n')
    fs = tmp_path / "FreeSurferColorLUT.txt"
    fs.write_text("#$Id: FreeSurferColorLUT.txt $\n\n#No. Label Name:   R   G   B   A\n\n"
                  "0   Unknown   0   0   0   0\n2   Left-Cerebral-White-Matter   245 245 245 0\n")
    t = read_colour_table(slicer)
    assert t[17] == ("Left-Hippocampus", (220, 216, 20)) and t[1][0] == "tissue"
    assert read_colour_table(snap)[1] == ("Left ventricle", (255, 0, 0))
    assert read_colour_table(fs)[2] == ("Left-Cerebral-White-Matter", (245, 245, 245))
    bad = tmp_path / "bad.txt"
    bad.write_text("hello world\n")
    with pytest.raises(ValueError, match="line 1"):
        read_colour_table(bad)
    lut = colour_lut([0, 1, 5], t)
    assert 0 not in lut and lut[1] == pytest.approx((128 / 255, 174 / 255, 128 / 255)) and len(lut[5]) == 3
    rgb, mask = label_rgb_image(np.array([[0, 17], [1, 0]]), t)
    assert mask.tolist() == [[False, True], [True, False]]
    np.testing.assert_allclose(rgb[0, 1], np.array([220, 216, 20]) / 255, atol=1e-6)


def test_filled_labels_blend_with_their_opacity():
    from app.viewer import compositing as comp
    base = np.full((2, 2), 0.5, np.float32)
    ins = np.ones((2, 2), bool)
    rgb = np.zeros((2, 2, 3), np.float32)
    rgb[0, 0] = (1.0, 0.0, 0.0)
    mask = np.array([[True, False], [False, False]])
    out = comp.compose(base, ins, labels_rgb=rgb, labels_mask=mask, labels_opacity=0.5)
    assert tuple(out[0, 0, :3]) == (191, 64, 64) and tuple(out[1, 1, :3]) == (128, 128, 128)
    with pytest.raises(ValueError, match="label_fill"):
        Workspace().state.set_overlay(label_fill="both")
