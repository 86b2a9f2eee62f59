"""The stage check (:mod:`app.engine.stagecheck`) of ``dsm`` and ``agent`` results: every stage measured on
the fixed grid, a stage that made the pair worse dropped (the better earlier stage's transform is the
result, a warning names the stage), the record in ``RegistrationResult.checks``."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app.engine import paradigms
from app.engine import rigid_pose as RP
from app.engine.spatial import resample
from app.engine.types import LabelMap, Transform, Volume

DSM_BUNDLED = Path(__file__).resolve().parents[1] / "resources" / "checkpoints" / "dsm.pt"


def _oblique() -> np.ndarray:
    a, b = math.radians(15), math.radians(-25)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx


def _phantom(contrast: str, shift_mm=(0.0, 0.0, 0.0), shape=(26, 30, 28), spacing=(2.4, 2.0, 2.2),
             direction=None) -> Volume:
    """A head-like phantom in T1 or T2 contrast on an anisotropic (oblique) grid centred on 0 (LPS mm).

    Tissues (no symmetry, so shifts and rotations show): an ellipsoidal head of "grey matter" with an
    off-centre "white matter" core and a "ventricle". T1: white > grey > CSF; T2: CSF > grey > white
    (the intensity relation is not monotone: a multimodal pair). ``shift_mm``: the anatomy sits there.
    """
    direction = np.eye(3) if direction is None else direction
    v = Volume(np.zeros(shape, np.float32), spacing, (0.0, 0.0, 0.0), direction, f"{contrast}.nii.gz")
    lo, hi = v.physical_bounds()
    v.origin = tuple(-(np.asarray(lo) + np.asarray(hi)) / 2 + np.asarray(v.origin))
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    p = v.index_to_physical(np.stack([x.ravel(), y.ravel(), z.ravel()], 1)) - np.asarray(shift_mm)
    head = (p[:, 0] / 22) ** 2 + (p[:, 1] / 26) ** 2 + (p[:, 2] / 20) ** 2 < 1
    white = ((p[:, 0] - 5) / 11) ** 2 + ((p[:, 1] + 4) / 14) ** 2 + ((p[:, 2] - 2) / 9) ** 2 < 1
    csf = ((p[:, 0] + 6) / 4) ** 2 + ((p[:, 1] - 7) / 8) ** 2 + ((p[:, 2] + 3) / 4) ** 2 < 1
    level = {"T1": (0.55, 1.0, 0.15), "T2": (0.6, 0.3, 1.0)}[contrast]       # grey, white, CSF
    img = np.where(head, level[0], 0.0)
    img = np.where(head & white, level[1], img)
    img = np.where(head & csf, level[2], img)
    img = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(img.reshape(shape).astype(np.float32)), 1.0))
    return v.with_array(img.astype(np.float32))


def _translation(mm) -> Transform:
    return Transform(sitk.TranslationTransform(3, tuple(float(v) for v in mm)), "rigid")


def _dsm_params(**kw):
    return paradigms.make_params(paradigms.registrar_class("dsm").Params, {"similarity_map": False, **kw})


def _points_equal(a: Transform, b: Transform, atol=1e-5) -> None:
    pts = np.array([[0.0, 0.0, 0.0], [10.0, -12.0, 7.0], [-15.0, 4.0, -9.0]])
    np.testing.assert_allclose(a.transform_points(pts), b.transform_points(pts), atol=atol)


# --------------------------------------------------------------------------- dsm
@pytest.mark.skipif(not DSM_BUNDLED.exists(), reason="no bundled dsm checkpoint")
def test_dsm_result_carries_the_stage_check_of_its_named_stages():
    fixed = _phantom("T1", direction=_oblique())
    moving = _phantom("T2", shift_mm=(4.0, -3.0, 2.0))
    res = paradigms.get("dsm").register(fixed, moving, _dsm_params(levels="1", iterations="3",
                                                                   stages="rigid+affine", affine_iterations=2,
                                                                   patches=16),
                                        device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "prealigned", "rigid", "affine"] == list(sc["overlap"])
    assert sc["metric"] == "nmi" and sc["modality"]["multimodal"]          # T1 vs T2: normalised MI
    assert res.checks["input_check"]["checkpoint"] == "dsm.pt"
    assert res.checks["seconds"] > 0 and res.timings["checks"] == res.checks["seconds"]
    # the start leaves the phantoms 5.4 mm apart, the centre-of-mass start brings them together
    assert sc["values"]["prealigned"] > sc["values"]["start"] + 0.05
    assert sc["overlap"]["prealigned"] > sc["overlap"]["start"]
    # what was kept is what the result carries
    assert not sc["flagged"] and sc["kept"] == "affine" and res.transform.kind == "affine"


def test_dsm_with_mi_and_no_checkpoint_still_runs_the_stage_check():
    fixed = _phantom("T1")
    moving = _phantom("T2", shift_mm=(3.0, 2.0, -2.0))
    res = paradigms.get("dsm").register(fixed, moving, _dsm_params(similarity="mi", levels="2,1", iterations="4",
                                                                   prealign="none"), device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "rigid"] and sc["metric"] == "nmi"
    # no checkpoint: nothing to compare the inputs with (an empty record), no input warning
    assert res.checks["input_check"]["expects"] == {} and not res.checks["input_check"]["warnings"]
    assert res.checkpoint_id is None


@pytest.fixture
def optimiser_30mm_off(monkeypatch):
    """dsm's optimiser replaced: the affine stage (or every stage, ``which="all"``) lands 30 mm off its start."""
    from app.engine import optimise as O
    which = {"stage": "all"}

    def fake(fixed, moving, model, *, initial=None, stage="rigid", **kw):
        off = which["stage"] in ("all", stage)
        t = initial.then(_translation((30.0, 0.0, 0.0))) if off else initial
        return SimpleNamespace(transform=Transform(t.itk, model) if t.kind != "identity" else t, history=[],
                               device="cpu")

    monkeypatch.setattr(O, "optimise", fake)
    return which


@pytest.mark.parametrize("similarity", ["mi", "dsm"])
def test_a_dsm_rigid_stage_made_worse_gives_way_to_the_prealignment(optimiser_30mm_off, similarity):
    if similarity == "dsm" and not DSM_BUNDLED.exists():
        pytest.skip("no bundled dsm checkpoint")
    fixed = _phantom("T1", direction=_oblique())
    moving = _phantom("T2", shift_mm=(4.0, -3.0, 2.0))
    moving_labels = LabelMap((moving.array > 0.2).astype(np.int16), moving.spacing, moving.origin,
                             moving.direction, "labels")
    res = paradigms.get("dsm").register(fixed, moving, _dsm_params(similarity=similarity, levels="1",
                                                                   iterations="2"),
                                        moving_labels=moving_labels, device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "prealigned", "rigid"]
    assert sc["flagged"] and sc["kept"] == "prealigned"
    assert any("the rigid stage made the pair less similar than its input" in w for w in res.warnings)
    assert res.params["warnings"] == res.warnings
    # the result is the centre-of-mass start, the warped image resampled through it (not 30 mm off)
    from app.engine.datasets import center_of_mass
    com = np.asarray(center_of_mass(moving)) - np.asarray(center_of_mass(fixed))
    _points_equal(res.transform, _translation(com))
    np.testing.assert_allclose(res.warped.array, resample(moving, fixed, res.transform, "linear").array, atol=1e-6)
    np.testing.assert_array_equal(res.warped_labels.array,
                                  resample(moving_labels, fixed, res.transform, "nearest").array)


def test_a_dsm_affine_stage_made_worse_gives_way_to_the_rigid_one(optimiser_30mm_off):
    optimiser_30mm_off["stage"] = "affine"
    fixed = _phantom("T1")
    moving = _phantom("T2", shift_mm=(3.0, 0.0, 0.0))
    initial = _translation((3.0, 0.0, 0.0))         # a pipeline's previous stage: no prealignment stage
    res = paradigms.get("dsm").register(fixed, moving, _dsm_params(similarity="mi", levels="1", iterations="1",
                                                                   stages="rigid+affine"),
                                        initial=initial, device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "rigid", "affine"] and sc["kept"] == "rigid"
    assert any("the affine stage made the pair less similar" in w for w in res.warnings)
    _points_equal(res.transform, initial)


# --------------------------------------------------------------------------- agent
def _agent_ckpt(tmp_path, bias: float) -> Path:
    """A tiny agent whose policy is fixed by the head's bias: action 0 (+tx) valued ``bias``, the rest 0."""
    from app.engine import checkpoints
    from app.engine import datasets as D
    from app.engine.nn.agent_net import AgentNet
    torch.manual_seed(0)
    net = AgentNet(channels=(4, 8), hidden=16, pooled=(2, 2, 2))
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.bias[0] = bias
    prep = D.Preprocessing(grid_shape=(16, 16, 16), spacing_mm=4.0, direction=tuple(map(tuple, np.eye(3))))
    path = tmp_path / "agent.pt"
    checkpoints.save_checkpoint(path, paradigm="agent", model=net, preprocessing=prep.to_dict(), training={})
    return path


def test_an_agent_pose_made_worse_gives_way_to_the_prealignment(tmp_path):
    from app.engine.paradigms.agent import AgentParams
    fixed = _phantom("T1", direction=_oblique())
    moving = _phantom("T1", shift_mm=(4.0, -3.0, 2.0))
    # the policy always finds +tx helpful: 4 steps of 8 mm put the pose 32 mm off
    res = paradigms.get("agent").register(fixed, moving, AgentParams(max_steps=4),
                                          checkpoint=str(_agent_ckpt(tmp_path, 100.0)), device="cpu")
    end = res.history[-1]
    assert end["pose"][0] == pytest.approx(end["start_pose"][0] + 32.0)
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "prealigned", "agent"] and sc["metric"] == "lncc"
    assert sc["flagged"] and sc["kept"] == "prealigned"
    assert any("the agent stage made the pair less similar than its input" in w for w in res.warnings)
    assert any("did not converge" in w for w in res.warnings)
    _points_equal(res.transform, RP.pose_transform(end["start_pose"], end["centre"]))
    np.testing.assert_allclose(res.warped.array, resample(moving, fixed, res.transform, "linear").array, atol=1e-6)
    assert res.timings["checks"] == res.checks["seconds"]


def test_an_agent_pose_no_worse_than_its_start_is_kept(tmp_path):
    from app.engine.paradigms.agent import AgentParams
    fixed = _phantom("T1")
    moving = _phantom("T1", shift_mm=(4.0, -3.0, 2.0))
    initial = _translation((1.0, 0.0, 0.0))
    # nothing helps (every value 0 or below): the agent halves its step to the end and stays at the start pose
    res = paradigms.get("agent").register(fixed, moving, AgentParams(max_steps=20),
                                          checkpoint=str(_agent_ckpt(tmp_path, -100.0)), initial=initial,
                                          device="cpu")
    sc = res.checks["stage_check"]
    assert list(sc["values"]) == ["start", "prealigned", "agent"]
    assert not sc["flagged"] and sc["kept"] == "agent" and not any("stage check" in w for w in res.warnings)
    end = res.history[-1]
    _points_equal(res.transform, initial.then(RP.pose_transform(end["pose"], end["centre"])))
