"""Never silently worse than the input: the stage check of learned results and the input checks
against a checkpoint's training data (:mod:`app.engine.stagecheck`, :mod:`app.engine.expectations`).

A deliberately bad checkpoint (the bundled ``weakly`` with its displacement head biased by 3 working
voxels, a 12 mm shift everywhere) must be caught: the affine stage kept, the result flagged, the
check in ``metrics.json`` and on the CLI's output; the bundled model on an IXI pair must not be.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import io
from app.engine.expectations import check_inputs, expectations, image_features, looks_skull_stripped
from app.engine.stagecheck import MARGINS, check_stages
from app.engine.types import Transform, Volume

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "resources" / "demo"
MS = Path("/work/shared/data/multimodal/ms_cross_sectional_patient07")
CARD = json.loads((ROOT / "resources" / "checkpoints" / "weakly.card.json").read_text())


@pytest.fixture(scope="module")
def demo():
    fixed = io.read_volume(DEMO / "fixed_IXI174_T1.nii.gz")
    moving = io.read_volume(DEMO / "moving_IXI136_T1.nii.gz")
    labels = io.read_labels(DEMO / "fixed_IXI174_labels.nii.gz", reference=fixed)
    return fixed, moving, labels


@pytest.fixture(scope="module")
def bad_checkpoint(tmp_path_factory):
    import torch
    ckpt = torch.load(ROOT / "resources" / "checkpoints" / "weakly.pt", map_location="cpu", weights_only=True)
    ckpt["state_dict"]["deformable.head.bias"] = ckpt["state_dict"]["deformable.head.bias"] + torch.tensor([3.0, -3.0, 3.0])
    path = tmp_path_factory.mktemp("ckpt") / "weakly_bad.pt"
    torch.save(ckpt, path)
    return path


def _shift(mm: float) -> Transform:
    return Transform(sitk.TranslationTransform(3, (mm, 0.0, 0.0)), "rigid")


# ----------------------------------------------------------------------------- the check itself
def test_a_stage_that_makes_the_pair_worse_is_not_kept(demo):
    fixed = demo[0]
    moving = Volume(fixed.array.copy(), fixed.spacing, fixed.origin, fixed.direction.copy(), "same_T1")
    c = check_stages(fixed, moving, [("start", None), ("shifted", _shift(8.0))], multimodal=False)
    assert c.metric == "lncc" and c.kept == "start" and c.flagged
    assert c.values["start"] > c.values["shifted"] + MARGINS["lncc"]
    assert len(c.worse) == 1 and "shifted stage made the pair less similar" in c.worse[0]
    assert "kept the start stage" in c.message()
    d = c.to_dict()
    assert d["kept"] == "start" and d["last"] == "shifted" and d["flagged"] is True


def test_a_stage_that_improves_the_pair_is_kept(demo):
    fixed = demo[0]
    moving = Volume(fixed.array.copy(), fixed.spacing, fixed.origin, fixed.direction.copy(), "same_T1")
    # the moving image equals the fixed one: the start is off by 8 mm, the "registration" undoes it
    c = check_stages(fixed, moving, [("start", _shift(8.0)), ("affine", _shift(0.0))], multimodal=False)
    assert c.kept == "affine" and not c.flagged and not c.worse and c.message() == ""


def test_a_later_stage_within_the_margin_is_preferred(demo):
    fixed = demo[0]
    moving = Volume(fixed.array.copy(), fixed.spacing, fixed.origin, fixed.direction.copy(), "same_T1")
    c = check_stages(fixed, moving, [("start", None), ("affine", _shift(0.2))], multimodal=False)
    assert c.values["start"] >= c.values["affine"]          # a 0.2 mm shift is a hair worse...
    assert c.kept == "affine" and not c.flagged              # ...but within the margin


def test_multimodal_pairs_use_normalised_mutual_information(demo):
    fixed = demo[0]
    a = fixed.array.astype(np.float32)
    inverted = np.where(a > 0.05 * a.max(), a.max() - a, 0).astype(np.float32)   # another contrast
    moving = Volume(inverted, fixed.spacing, fixed.origin, fixed.direction.copy(), "inverted")
    c = check_stages(fixed, moving, [("start", None), ("shifted", _shift(10.0))], multimodal=True)
    assert c.metric == "nmi" and c.kept == "start" and c.flagged
    assert 1.0 < c.values["shifted"] < c.values["start"] <= 2.0


def test_bad_stage_list_is_refused(demo):
    with pytest.raises(ValueError, match="at least one stage"):
        check_stages(demo[0], demo[1], [])
    with pytest.raises(ValueError, match="unique"):
        check_stages(demo[0], demo[1], [("a", None), ("a", None)], multimodal=False)


# ----------------------------------------------------------------------------- learned results
def test_bad_checkpoint_is_caught_and_the_affine_stage_kept(demo, bad_checkpoint):
    from app.engine.evaluation import register_and_measure
    fixed, moving, labels = demo
    ml = io.read_labels(DEMO / "moving_IXI136_labels.nii.gz")
    result, m = register_and_measure("weakly", fixed, moving, checkpoint=bad_checkpoint, device="cpu",
                                     fixed_labels=labels, moving_labels=ml, with_hd95=False)
    sc = m["checks"]["stage_check"]
    assert sc["flagged"] and sc["last"] == "deformable" and sc["kept"] == "affine"
    assert sc["values"]["deformable"] < sc["values"]["affine"] - sc["margin"]
    assert m["flagged"] is True and result.flagged
    assert any(w.startswith("stage check: the deformable stage made the pair less similar") for w in m["warnings"])
    # the result is the affine stage's: a linear transform, and the labels overlap as an affine's do
    assert result.transform.kind in ("affine", "composite")
    assert m["fold_fraction"] == 0.0 and m["dice_mean"] > 0.35
    # the same pipeline through the pipeline runner carries the check per stage
    from app.engine.pipeline import register_pipeline
    res2 = register_pipeline(["weakly", "weakly"], fixed, moving, [None, None], checkpoint=bad_checkpoint, device="cpu")
    assert set(res2.checks) == {"1:weakly", "2:weakly"} and res2.flagged


def test_bundled_model_on_an_ixi_pair_passes_silently(demo):
    from app.engine.paradigms import get
    fixed, moving, _ = demo
    res = get("weakly").register(fixed, moving, device="cpu")
    sc = res.checks["stage_check"]
    assert sc["kept"] == "deformable" and not sc["flagged"] and not sc["worse"]
    assert list(sc["values"]) == ["start", "prealigned", "affine", "deformable"]
    assert sc["values"]["deformable"] > sc["values"]["affine"] > sc["values"]["start"]
    assert res.warnings == [] and res.checks["input_check"]["warnings"] == []
    assert res.checks["input_check"]["expects"]["skull"] is True


def test_cli_prints_the_check_and_metrics_json_carries_it(bad_checkpoint, tmp_path):
    out = tmp_path / "reg"
    r = subprocess.run([sys.executable, "main.py", "register", str(DEMO / "fixed_IXI174_T1.nii.gz"),
                        str(DEMO / "moving_IXI136_T1.nii.gz"), "--paradigm", "weakly", "--checkpoint",
                        str(bad_checkpoint), "--out", str(out), "--device", "cpu", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RESULT FLAGGED" in r.stdout and "kept affine" in r.stdout
    assert "WARNING: stage check: the deformable stage made the pair less similar" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["flagged"] is True and m["checks"]["stage_check"]["kept"] == "affine"
    assert set(m["checks"]["stage_check"]["values"]) == {"start", "prealigned", "affine", "deformable"}
    assert m["warnings"] and "input_check" in m["checks"]


# ----------------------------------------------------------------------------- inputs vs training data
def test_expectations_from_the_card_or_an_explicit_record():
    exp = expectations({"training": CARD["training"]})
    assert exp["skull"] is True and exp["spacing_mm"] == 2.0 and exp["modality"] == "T1"
    own = {"modality": "CT", "spacing_mm": 1.0}
    assert expectations({"expects": own, "training": CARD["training"]}) == own
    assert expectations({"training": {"data": "someone's private set"}}) == {}


def test_input_warnings_fire_on_unlike_inputs_and_not_on_ixi(demo):
    fixed, moving, labels = demo
    ckpt = {"training": CARD["training"]}
    assert check_inputs(fixed, moving, ckpt, "weakly.pt").warnings == []
    # skull-stripped: everything outside the (dilated) brain labels set to exactly 0
    brain = sitk.GetArrayFromImage(sitk.BinaryDilate(sitk.GetImageFromArray((labels.array > 0).astype(np.uint8)),
                                                     [2, 2, 2])) > 0
    stripped = fixed.with_array(np.where(brain, fixed.array, 0).astype(np.float32))
    f = image_features(stripped)
    assert looks_skull_stripped(f) and not looks_skull_stripped(image_features(fixed))
    w = check_inputs(stripped, moving, ckpt, "weakly.pt").warnings
    assert len(w) == 1 and "weakly.pt" in w[0] and "the fixed image looks skull-stripped" in w[0]
    assert "moving image" not in w[0]
    # 1 mm voxels
    img = fixed.to_sitk(sitk.sitkFloat32)
    size = [int(round(n * s)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    fine = Volume.from_sitk(sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                                          (1.0, 1.0, 1.0), img.GetDirection()), "fine_T1")
    w = check_inputs(fixed, fine, ckpt, "weakly.pt").warnings
    assert len(w) == 1 and "the moving image has 1 x 1 x 1 mm voxels (trained on 2 mm)" in w[0]
    # CT-like intensities and another contrast named
    ct = Volume(fixed.array.astype(np.float32) - 1000.0, fixed.spacing, fixed.origin, fixed.direction.copy(), "scan.nii")
    t2 = Volume(moving.array, moving.spacing, moving.origin, moving.direction.copy(), "sub-01_T2w.nii.gz")
    w = check_inputs(ct, t2, ckpt, "weakly.pt", modality={"multimodal": True, "reason": "names say T1 vs T2"}).warnings
    assert "has negative intensities" in w[0] and "is named as T2 (trained on T1)" in w[0]
    assert "the pair looks multimodal (names say T1 vs T2)" in w[0]


@pytest.mark.skipif(not MS.is_dir(), reason="shared sample data not available")
def test_real_skull_stripped_1mm_scan_is_named():
    t1 = io.read_volume(MS / "T1.nii.gz")
    w = check_inputs(t1, t1, {"training": CARD["training"]}, "weakly.pt").warnings
    assert len(w) == 1
    for part in ("the fixed image looks skull-stripped", "the moving image looks skull-stripped", "1 x 1 x 1 mm"):
        assert part in w[0]


def test_supervised_results_carry_the_check(demo):
    from app.engine.paradigms import get
    fixed, moving, _ = demo
    res = get("supervised").register(fixed, moving, device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "prealigned", "affine"] and sc["kept"] in sc["values"]
    assert sc["values"]["affine"] > sc["values"]["start"]          # a native-space IXI pair: the pose helps
    assert res.flagged == sc["flagged"]


def test_batch_rows_and_summary_carry_the_flag():
    from app.engine.evaluation import _flat_row, summarize
    m = {"before": {}, "dice_mean": 0.5, "flagged": True, "warnings": ["stage check: a", "input unlike b"]}
    row = _flat_row("f.nii.gz", "m.nii.gz", m)
    assert row["flagged"] is True and row["warnings"] == "stage check: a | input unlike b"
    plain = _flat_row("f.nii.gz", "m2.nii.gz", {"before": {}, "dice_mean": 0.7})
    assert plain["flagged"] is False and plain["warnings"] == ""
    s = summarize([row, plain])
    assert s["flagged"] == 1 and s["with_warnings"] == 1 and s["dice_mean"] == pytest.approx(0.6)
