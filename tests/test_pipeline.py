"""Pipelines of paradigms (A+B): stage parameters, composition against SimpleITK, one resampling."""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import paradigms, pipeline
from app.engine.evaluation import register_and_measure
from app.engine.paradigms.base import param
from app.engine.spatial import resample
from app.engine.types import RegistrationResult, Transform, Volume

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ShiftParams:
    dx: float = param(0.0, "translation along x (mm)", range=(-100.0, 100.0))
    tag: str = param("a", "a free-text option")


@dataclass
class TurnParams:
    degrees: float = param(0.0, "rotation about z (degrees), about the centre (5, -3, 8) mm", range=(-90.0, 90.0))
    tag: str = param("b", "a free-text option")


class _Known:
    """A paradigm whose own transform S is known: the result is ``initial.then(S)``."""

    Params: ClassVar[type]
    learned: ClassVar[bool] = False
    description: ClassVar[str] = "test stage with a known transform"

    def own(self, p) -> sitk.Transform:
        raise NotImplementedError

    def register(self, fixed, moving, params=None, *, initial=None, moving_labels=None, progress=None,
                 cancel=None, **kw):
        p = params or self.Params()
        own = Transform(self.own(p))
        t = own if initial is None else initial.then(own)
        if progress:
            progress(__import__("app.engine.types", fromlist=["Progress"]).Progress(self.key, 1, 1, 0.0, 1.0, "ok"))
        return RegistrationResult(t, resample(moving, fixed, t), history=[{"stage": self.key, "iteration": 1}],
                                  timings={"total": 0.0}, paradigm=self.key, params={"seen_initial": initial is not None},
                                  warped_labels=None if moving_labels is None else resample(moving_labels, fixed, t, "nearest"))


class ShiftRegistrar(_Known):
    key: ClassVar[str] = "t_shift"
    Params: ClassVar[type] = ShiftParams

    def own(self, p):
        return sitk.TranslationTransform(3, (p.dx, 0.0, 0.0))


class TurnRegistrar(_Known):
    key: ClassVar[str] = "t_turn"
    Params: ClassVar[type] = TurnParams

    def own(self, p):
        t = sitk.Euler3DTransform()
        t.SetCenter((5.0, -3.0, 8.0))
        t.SetRotation(0.0, 0.0, np.deg2rad(p.degrees))
        return t


@pytest.fixture
def known(monkeypatch):
    monkeypatch.setitem(paradigms.REGISTRY, "t_shift", f"{__name__}:ShiftRegistrar")
    monkeypatch.setitem(paradigms.REGISTRY, "t_turn", f"{__name__}:TurnRegistrar")


def _oblique(seed=0, shape=(20, 24, 28)):
    """An anisotropic, oblique smooth random image (different grids for fixed and moving)."""
    rng = np.random.default_rng(seed)
    arr = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), 2.0))
    d = np.asarray(sitk.VersorTransform((1, 2, 3), 0.4).GetMatrix()).reshape(3, 3)
    return Volume(arr * 100, (1.3, 0.9, 2.1), (-12.0 + seed, 7.0, 3.0), d)


def test_split_params_distributes_prefixed_and_plain_names(known):
    keys = ["t_shift", "t_turn"]
    assert pipeline.split_params(keys, {"t_turn.degrees": "10", "dx": "3"}) == [{"dx": "3"}, {"degrees": "10"}]
    assert pipeline.split_params(keys, {"tag": "z"}) == [{"tag": "z"}, {"tag": "z"}]      # both declare it
    assert pipeline.split_params(keys, {"2.tag": "z"}) == [{}, {"tag": "z"}]
    assert pipeline.split_params(["t_shift", "t_shift"], {"1.dx": "1", "2.dx": "2"}) == [{"dx": "1"}, {"dx": "2"}]
    with pytest.raises(ValueError, match="'iterative' is not a stage"):
        pipeline.split_params(keys, {"iterative.stages": "rigid"})
    with pytest.raises(ValueError, match="no stage declares it"):
        pipeline.split_params(keys, {"bogus": "1"})
    with pytest.raises(ValueError, match="unknown parameter 'dx' for stage 2"):
        pipeline.split_params(keys, {"t_turn.dx": "1"})
    with pytest.raises(ValueError, match="position 1..2"):
        pipeline.split_params(keys, {"3.dx": "1"})
    with pytest.raises(ValueError, match="unknown paradigm 'nope'"):
        pipeline.stages_of("t_shift+nope")
    with pytest.raises(ValueError, match="looks like"):
        pipeline.stages_of("t_shift++t_turn")


def test_a_then_b_is_one_composite_resampled_once_as_simpleitk_does(known):
    fixed, moving = _oblique(0), _oblique(1, (22, 20, 26))
    res = pipeline.register_pipeline("t_shift+t_turn", fixed, moving, {"dx": "7.5", "degrees": "12"})
    # B starts from A's transform: T(x) = A(B(x)) = shift(turn(x))
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(sitk.TranslationTransform(3, (7.5, 0.0, 0.0)))
    turn = sitk.Euler3DTransform()
    turn.SetCenter((5.0, -3.0, 8.0))
    turn.SetRotation(0.0, 0.0, np.deg2rad(12))
    comp.AddTransform(turn)                      # ITK applies the last added first
    pts = fixed.index_to_physical(np.array([[0, 0, 0], [10, 5, 3], [27, 23, 19]]))
    want = np.array([comp.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(res.transform.transform_points(pts), want, atol=1e-9)
    # the warped image is the original moving image resampled once through the composite
    ref = sitk.Resample(moving.to_sitk(sitk.sitkFloat32), fixed.to_sitk(sitk.sitkFloat32), comp,
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(res.warped.array, sitk.GetArrayFromImage(ref), atol=1e-4)
    twice = resample(resample(moving, fixed, Transform(sitk.TranslationTransform(3, (7.5, 0, 0)))), fixed,
                     Transform(turn))
    assert np.abs(twice.array - res.warped.array).max() > 1.0      # two resamplings would differ
    assert res.paradigm == "t_shift+t_turn" and [s["paradigm"] for s in res.stages] == ["t_shift", "t_turn"]
    assert [s["params"]["seen_initial"] for s in res.stages] == [False, True]
    assert [h["pipeline_stage"] for h in res.history] == [1, 2]
    assert set(res.timings) == {"1:t_shift", "2:t_turn", "total"}


def test_pipeline_progress_is_one_bar_and_measure_names_the_stages(known):
    fixed, moving = _oblique(0), _oblique(1)
    seen = []
    res, m = register_and_measure("t_shift+t_turn", fixed, moving, {"t_shift.dx": "2"}, progress=seen.append)
    fracs = [p.fraction for p in seen if p.fraction is not None]
    assert fracs == sorted(fracs) and fracs[0] == pytest.approx(0.5) and fracs[-1] == 1.0
    assert any("stage 2/2 (t_turn)" in p.message for p in seen)
    assert m["paradigm"] == "t_shift+t_turn" and [s["paradigm"] for s in m["stages"]] == ["t_shift", "t_turn"]
    assert m["params"]["1:t_shift"] == {"seen_initial": False}
    single, m1 = register_and_measure("t_shift", fixed, moving, {"dx": "2"})
    assert "stages" not in m1 and m1["params"] == {"dx": 2.0, "tag": "a"}


def test_cli_register_runs_a_pipeline_of_real_paradigms(tmp_path):
    """iterative rigid, then iterative affine from it, on an anisotropic, oblique phantom."""
    from tests.test_cli import blob_pair
    files = blob_pair(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "main.py", "register", files["fixed"], files["moving"],
                        "--paradigm", "iterative+iterative", "--param", "1.stages=rigid", "--param", "2.stages=affine",
                        "--param", "metric=mse", "--fixed-labels", files["fixed_labels"],
                        "--moving-labels", files["moving_labels"], "--out", out, "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["paradigm"] == "iterative+iterative"
    assert [s["paradigm"] for s in m["stages"]] == ["iterative", "iterative"]
    assert m["params"]["1:iterative"]["stages"] == "rigid" and m["params"]["2:iterative"]["stages"] == "affine"
    assert m["dice_mean"] > m["before"]["dice_mean"] and m["dice_mean"] > 0.9
    t = sitk.ReadTransform(str(out / "transform.h5"))
    assert np.allclose(t.TransformPoint((0.0, 0.0, 0.0)), (3.0, 0.0, 0.0), atol=1.0)   # the 3 mm shift
    bad = subprocess.run([sys.executable, "main.py", "register", files["fixed"], files["moving"], "--paradigm",
                          "iterative+nope", "--out", tmp_path / "bad", "--no-progress"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "unknown paradigm 'nope'" in bad.stderr and not (tmp_path / "bad").exists()
