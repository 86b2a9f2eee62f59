"""Multimodal pairs: detection (names, intensity relation), the settings chosen for them, the rule
that no linear stage keeps a result worse than its start, and a real T2 -> T1 crop registered with
the `iterative` defaults."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import modality, paradigms
from app.engine.paradigms import iterative
from app.engine.spatial import resample
from app.engine.types import Transform, Volume

MM = Path("/work/shared/data/multimodal/ms_cross_sectional_patient07")
needs_mm = pytest.mark.skipif(not MM.is_dir(), reason="multimodal sample data not available")


def brainlike(seed=0) -> Volume:
    """A smooth head-like phantom with 'tissue' structure: background 0, a bright shell, darker
    blobs inside, on an oblique anisotropic grid (z, y, x) = (44, 56, 52), about 130 mm across."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (44, 56, 52)], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    head = (r < 0.8).astype(float)
    arr = head * (0.6 + 0.4 * np.exp(-((r - 0.65) / 0.08) ** 2))
    for _ in range(8):
        c = rng.uniform(-0.45, 0.45, 3)
        s = rng.uniform(0.08, 0.18)
        arr -= 0.45 * head * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s ** 2))
    d = sitk.VersorTransform((0, 0, 1), 0.3).GetMatrix()
    return Volume(np.clip(arr, 0, None).astype(np.float32), (2.5, 2.3, 3.0), (10.0, -5.0, 3.0),
                  np.array(d).reshape(3, 3), "phantom")


# --------------------------------------------------------------------------- detection
@pytest.mark.parametrize("name, expected", [("IXI002-Guys-0828_T1.nii.gz", "T1"), ("study1_T2W.nii.gz", "T2"),
                                            ("t1c.nii.gz", "T1"), ("T1POST.nii.gz", "T1"), ("FLAIR.nii.gz", "FLAIR"),
                                            ("patient_ct_head.mha", "CT"), ("moving.nii.gz", None),
                                            ("t1_to_t2.nii.gz", None), ("", None)])
def test_modality_from_name(name, expected):
    assert modality.modality_from_name(name) == expected


def test_inverted_copy_is_multimodal_noisy_copy_is_not():
    fixed = brainlike()
    a = fixed.array
    inverted = fixed.with_array(np.where(a > 0.05, 1.2 - a, 0).astype(np.float32), name="copy")
    noisy = fixed.with_array((a + np.random.default_rng(1).normal(0, 0.05, a.shape)).astype(np.float32), name="copy2")
    d_inv = modality.detect(fixed, inverted)
    d_noisy = modality.detect(fixed, noisy)
    assert d_inv.source == "intensity" and d_inv.multimodal, d_inv
    assert d_noisy.source == "intensity" and not d_noisy.multimodal, d_noisy
    assert d_inv.evidence["ratio"] < 0.2 < 0.9 < d_noisy.evidence["ratio"]


def test_names_and_hint_decide_before_intensities():
    fixed = brainlike()
    same_img = fixed.with_array(fixed.array, name="sub01_T2w.nii.gz")
    d = modality.detect(fixed.with_array(fixed.array, name="sub01_T1w.nii.gz"), same_img)
    assert d.multimodal and d.source == "names" and "T1 vs T2" in d.reason
    d = modality.detect(fixed, fixed, hint="multi")
    assert d.multimodal and d.source == "hint"
    with pytest.raises(ValueError, match="modality hint"):
        modality.detect(fixed, fixed, hint="t1")


def test_relation_statistics_by_hand():
    b = np.repeat(np.arange(10.0), 100)
    st = modality.relation_statistics(2 * b + 1, b, bins=10)
    assert st["eta2"] == pytest.approx(1.0) and st["ratio"] == pytest.approx(1.0)
    st = modality.relation_statistics(-b, b, bins=10)
    assert st["monotone2"] == pytest.approx(0.0, abs=1e-12) and st["decreasing2"] == pytest.approx(1.0)
    st = modality.relation_statistics((b - 4.5) ** 2, b, bins=10)           # U-shaped: not monotone
    assert st["eta2"] == pytest.approx(1.0) and 0.0 < st["ratio"] < 0.6
    with pytest.raises(ValueError, match="differ in number"):
        modality.relation_statistics(b, b[:5])


# --------------------------------------------------------------------------- settings
def _decision(multi):
    return modality.ModalityDecision(multi, "hint", "test")


def test_settings_for_a_multimodal_pair():
    p = iterative.IterativeParams(metric="mse")
    c = iterative.choose_settings(p, _decision(True), has_labels=False)
    assert (c["metric"], c["histogram_match"], c["mask"], c["deformable"]) == ("mattes", False, "none", "bspline")
    assert any("Mattes" in n for n in c["notes"])
    text = iterative.describe_settings(c)
    assert "multimodal pair" in text and "no histogram matching" in text and "no fixed mask" in text
    # one modality: the parameters as given, deformable auto -> diffeomorphic demons
    c = iterative.choose_settings(iterative.IterativeParams(), _decision(False), has_labels=False)
    assert (c["metric"], c["histogram_match"], c["mask"], c["deformable"]) == \
        ("mattes", True, "otsu", "diffeomorphic_demons")
    # an explicit demons choice on a multimodal pair is kept, with a warning; a labels mask is kept
    c = iterative.choose_settings(iterative.IterativeParams(deformable="demons", mask_from_labels=True),
                                  _decision(True), has_labels=True)
    assert c["deformable"] == "demons" and c["mask"] == "labels"
    assert any(n.startswith("warning") for n in c["notes"])


def test_register_reports_the_choice_in_params_and_progress():
    fixed = brainlike()
    moving = fixed.with_array(fixed.array, name="m")
    msgs = []
    res = paradigms.get("iterative").register(
        fixed, moving, paradigms.make_params(iterative.IterativeParams,
                                             {"stages": "rigid", "modality": "multi", "levels": "2",
                                              "linear_iterations": 5}),
        progress=lambda pr: msgs.append(pr.message))
    chosen = res.params["chosen"]
    assert chosen["multimodal"] and chosen["source"] == "hint" and chosen["mask"] == "none"
    assert res.params["modality"] == "multi"
    assert any(m.startswith("multimodal pair") for m in msgs)
    assert [g["stage"] for g in chosen["guards"]] == ["rigid"]
    assert res.warnings == (["the rigid stage kept its start: its result was worse by its own metric"]
                            if chosen["guards"][0]["kept"] == "start" else [])


# --------------------------------------------------------------------------- no worse than the start
def _run_for(p, f_img):
    return iterative._Run(p, ["rigid"], [1], [1], None, None)


def test_guard_keeps_the_start_when_the_result_is_worse():
    fixed = brainlike()
    f_img = iterative._normalise(fixed.to_sitk(sitk.sitkFloat32))
    p = iterative.IterativeParams(metric="mse", sampling_percentage=1.0)
    run = _run_for(p, f_img)
    run.last_start = Transform.identity()
    bad = sitk.Euler3DTransform()
    bad.SetTranslation((6.0, -4.0, 3.0))
    chosen = {"guards": []}
    kept = iterative._guard(run, "rigid", f_img, f_img, None, Transform.identity(), Transform(bad, "rigid"), chosen)
    assert kept.kind == "identity" or np.allclose(kept.transform_points([[0, 0, 0]]), [[0, 0, 0]])
    g = chosen["guards"][0]
    assert g["kept"] == "start" and g["end"] > g["start"]
    # a result better than its start is kept: moving(x) = fixed(bad^-1(x)), so moving(bad(x)) = fixed(x)
    moving_img = sitk.Resample(f_img, f_img, bad.GetInverse(), sitk.sitkLinear, 0.0)
    kept = iterative._guard(run, "rigid", f_img, moving_img, None, Transform.identity(), Transform(bad, "rigid"),
                            chosen)
    assert chosen["guards"][-1]["kept"] == "result" and kept.kind == "rigid"
    assert chosen["guards"][-1]["end"] < chosen["guards"][-1]["start"]


def test_every_linear_stage_ends_no_worse_than_its_start():
    fixed = brainlike()
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(fixed.index_to_physical([[26, 28, 22]])[0]))
    t.SetRotation(0.1, -0.05, 0.08)
    t.SetTranslation((4.0, -3.0, 2.0))
    moving = resample(fixed, fixed, Transform(t.GetInverse(), "rigid"), "linear")
    p = paradigms.make_params(iterative.IterativeParams, {"stages": "rigid+affine", "levels": "2,1",
                                                           "linear_iterations": 60, "use_mask": False})
    res = paradigms.get("iterative").register(fixed, moving, p)
    guards = res.params["chosen"]["guards"]
    assert [g["stage"] for g in guards] == ["rigid", "affine"]
    for g in guards:
        assert g["end"] <= g["start"] + 1e-6 or g["kept"] == "start"


# --------------------------------------------------------------------------- a real multimodal crop
def _to_grid(v: Volume, spacing: float) -> Volume:
    img = v.to_sitk(sitk.sitkFloat32)
    size = [int(round(s * p / spacing)) for s, p in zip(img.GetSize(), img.GetSpacing())]
    out = sitk.Resample(sitk.SmoothingRecursiveGaussian(img, [spacing / 2] * 3), size, sitk.Transform(),
                        sitk.sitkLinear, img.GetOrigin(), [spacing] * 3, img.GetDirection(), 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, v.name)


@needs_mm
def test_iterative_defaults_register_a_real_t2_to_t1_crop():
    from app.engine import io
    t1 = _to_grid(io.read_volume(MM / "T1.nii.gz"), 4.0)
    t2 = _to_grid(io.read_volume(MM / "T2.nii.gz"), 4.0)
    centre = t1.index_to_physical([[(n - 1) / 2 for n in t1.size_xyz]])[0]
    truth = sitk.Euler3DTransform()
    truth.SetCenter(tuple(centre))
    truth.SetRotation(np.deg2rad(6), np.deg2rad(-5), np.deg2rad(4))
    truth.SetTranslation((6.0, -5.0, 4.0))
    truth_t = Transform(truth, "rigid")
    fixed = resample(t1, t1, truth_t, "linear")                  # fixed(x) = T1(T(x)): T maps fixed -> moving
    fixed.name = "T1 (known transform)"
    # the defaults, but a short deformable stage (a B-spline with Mattes MI costs minutes on a loaded CPU)
    p = paradigms.make_params(iterative.IterativeParams, {"deformable_levels": "2", "deformable_iterations": 5})
    res = paradigms.get("iterative").register(fixed, t2, p)
    chosen = res.params["chosen"]
    assert chosen["multimodal"] and chosen["deformable"] == "bspline" and not chosen["histogram_match"]
    brain = np.argwhere(fixed.array > 0.05 * fixed.array.max())[::7][:, ::-1].astype(float)
    pts = fixed.index_to_physical(brain)
    err = np.linalg.norm(res.transform.transform_points(pts) - truth_t.transform_points(pts), axis=1).mean()
    start = np.linalg.norm(pts - truth_t.transform_points(pts), axis=1).mean()
    assert start > 8.0 and err < 2.0, (start, err)


# --------------------------------------------------------------------------- multi-start rigid, deformable guard
def test_start_rotations_are_proper_and_distinct():
    rs = iterative._start_rotations(21, 25.0)
    assert len(rs) == 21 and np.allclose(rs[0], np.eye(3))
    for r in rs:
        assert np.allclose(r @ r.T, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(r), 1.0)
    angles = [np.rad2deg(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1))) for r in rs]
    assert np.allclose(angles[1:15], 25.0) and np.allclose(angles[15:], 50.0)
    flat = np.array([r.ravel() for r in rs])
    assert min(np.linalg.norm(a - b) for i, a in enumerate(flat) for b in flat[i + 1:]) > 0.1
    assert len(iterative._start_rotations(7, 25.0)) == 7


def test_rigid_starts_auto_is_several_for_multimodal_one_for_one_modality():
    p = iterative.IterativeParams()
    assert iterative.choose_settings(p, _decision(True), False)["rigid_starts"] == iterative.MULTIMODAL_RIGID_STARTS
    assert iterative.choose_settings(p, _decision(False), False)["rigid_starts"] == 1
    assert iterative.choose_settings(iterative.IterativeParams(rigid_starts=5), _decision(False), False)[
        "rigid_starts"] == 5
    assert "13 rigid starts" in iterative.describe_settings(iterative.choose_settings(p, _decision(True), False))


def test_multistart_captures_a_rotation_one_start_misses():
    fixed = brainlike(3)
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(fixed.index_to_physical([[(n - 1) / 2 for n in fixed.size_xyz]])[0]))
    t.SetRotation(np.deg2rad(30), 0.0, 0.0)
    truth = Transform(t, "rigid")
    # moving(T(x)) = inverted fixed(x): a multimodal pair rotated by 30 degrees (one start: ~15 mm off)
    inv = fixed.with_array(np.where(fixed.array > 0, 1.2 - fixed.array, 0).astype(np.float32), "moving")
    moving = resample(inv, fixed, Transform(t.GetInverse(), "rigid"), "linear")
    pts = fixed.index_to_physical(np.argwhere(fixed.array > 0.3)[::29][:, ::-1].astype(float))

    def err(starts):
        p = paradigms.make_params(iterative.IterativeParams, {"stages": "rigid", "modality": "multi", "levels": "2",
                                                               "rigid_starts": starts, "sampling_percentage": 0.5})
        res = paradigms.get("iterative").register(fixed, moving, p)
        return np.linalg.norm(res.transform.transform_points(pts) - truth.transform_points(pts), axis=1).mean(), res

    e1, _ = err(1)
    e13, res = err(13)
    assert e1 > 8.0 and e13 < 2.0, (e1, e13)
    assert res.params["chosen"]["rigid_search"]["starts"] == 13


def test_deformable_guard_keeps_a_gain_and_drops_a_loss():
    fixed = brainlike()
    img = iterative._normalise(fixed.to_sitk(sitk.sitkFloat32))
    b = sitk.BSplineTransformInitializer(img, [3, 3, 3], 3)
    coef = np.random.default_rng(0).normal(0, 4.0, len(b.GetParameters()))
    b.SetParameters(tuple(coef))
    step = Transform(b, "bspline")
    p = iterative.IterativeParams(metric="mse", sampling_percentage=1.0)
    run = iterative._Run(p, ["deformable"], [1], [1], None, None)
    chosen = {"guards": []}
    # aligned pair: the B-spline can only make it worse -> dropped (identity step)
    kept = iterative._guard_deformable(run, img, img, None, Transform.identity(), step, chosen)
    assert kept.kind == "identity" and chosen["guards"][-1]["kept"] == "start" and chosen["guards"][-1]["gain"] < 0
    # fixed(x) = moving(B(x)): the B-spline is the answer -> kept
    fixed_img = sitk.Resample(img, img, b, sitk.sitkLinear, 0.0)
    kept = iterative._guard_deformable(run, fixed_img, img, None, Transform.identity(), step, chosen)
    assert kept is step and chosen["guards"][-1]["kept"] == "result" and chosen["guards"][-1]["gain"] > 0
    # a required gain it does not reach -> dropped
    gain = chosen["guards"][-1]["gain"]
    run.p = iterative.IterativeParams(metric="mse", sampling_percentage=1.0, deformable_min_gain=gain + 1e-9)
    assert iterative._guard_deformable(run, fixed_img, img, None, Transform.identity(), step, chosen).kind == "identity"
