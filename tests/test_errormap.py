"""Error maps (inverse consistency, dissimilarity, TTA) and landmark-guided correction."""
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import errormap as E
from app.engine import guidance as G
from app.engine import paradigms
from app.engine.paradigms.base import param
from app.engine.spatial import field_to_transform, resample, transform_to_field
from app.engine.types import Landmarks, RegistrationResult, Transform, Volume


def _grid(shape=(18, 20, 22)):
    """An anisotropic, oblique grid with a smooth random image on it."""
    rng = np.random.default_rng(3)
    arr = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
        sitk.GetImageFromArray(rng.random(shape).astype(np.float32)), 1.5)) * 100
    d = np.asarray(sitk.VersorTransform((1, 2, 3), 0.4).GetMatrix()).reshape(3, 3)
    return Volume(arr.astype(np.float32), (1.4, 0.9, 2.2), (-10.0, 5.0, 2.0), d)


def _bump(grid: Volume, centre_idx_xyz, amp_mm, radius_mm=6.0) -> Volume:
    """A Gaussian bump of displacement ``amp_mm`` (xyz) around a voxel, (z, y, x, 3) mm."""
    zyx = np.indices(grid.shape).reshape(3, -1).T
    pts = grid.index_to_physical(zyx[:, ::-1])
    c = grid.index_to_physical([centre_idx_xyz])[0]
    w = np.exp(-np.sum((pts - c) ** 2, 1) / (2 * radius_mm ** 2))
    return grid.with_array((w[:, None] * np.asarray(amp_mm)[None]).reshape(*grid.shape, 3).astype(np.float32))


def test_inverse_consistency_is_zero_for_exact_inverses_and_grows_at_an_injected_error():
    grid = _grid((30, 34, 38))
    shift = np.array([3.0, -2.0, 1.5])
    forward = Transform(sitk.TranslationTransform(3, tuple(shift)))
    exact = Transform(sitk.TranslationTransform(3, tuple(-shift)))
    ic = E.inverse_consistency(forward, exact, grid)
    assert ic.shape == grid.shape and ic.max() < 1e-4
    # the reverse registration is wrong by a 4 mm bump: R(y) = y + bump(y) - shift, so
    # R(T(x)) - x = bump(x + shift): large near the bump, ~0 elsewhere
    wrong = exact.then(field_to_transform(_bump(grid, (11, 10, 9), (4.0, 0.0, 0.0), radius_mm=4.0)))
    ic = E.inverse_consistency(forward, wrong, grid)
    assert ic[9, 10, 11] > 2.0 and np.median(ic) < 0.1, (ic[9, 10, 11], np.median(ic))


def test_local_dissimilarity_is_zero_for_identical_images_and_high_where_they_differ():
    grid = _grid()
    assert E.local_dissimilarity(grid, grid).max() < 1e-3
    other = grid.array.copy()
    other[5:10, 5:10, 5:10] = other[5:10, 5:10, 5:10][::-1, ::-1, ::-1]      # a scrambled cube
    d = E.local_dissimilarity(grid, grid.with_array(other), smooth_mm=0.0)
    assert d[7, 7, 7] > 0.3 and d[15, 17, 19] < 1e-3
    smooth = E.local_dissimilarity(grid, grid.with_array(other))           # smoothed: still peaks there
    assert np.unravel_index(np.argmax(smooth), smooth.shape) in {(z, y, x) for z in range(4, 11)
                                                                 for y in range(4, 11) for x in range(4, 11)}
    with pytest.raises(ValueError, match="share the grid"):
        E.local_dissimilarity(grid, Volume(np.zeros((4, 4, 4), np.float32), (1, 1, 1)))


@dataclass
class _P:
    inject: bool = param(True, "inject an error into the reverse direction")


class KnownFieldRegistrar:
    """Registers by knowing the truth: forward = T*, reverse = T*^-1 (+ an injected bump)."""

    key: ClassVar[str] = "t_known"
    Params: ClassVar[type] = _P
    learned: ClassVar[bool] = False
    description: ClassVar[str] = "test"
    truth: ClassVar[Transform] = None
    inverse: ClassVar[Transform] = None
    fixed_grid: ClassVar[Volume] = None

    def register(self, fixed, moving, params=None, *, initial=None, **kw):
        forward = fixed is self.fixed_grid
        t = self.truth if forward else self.inverse
        if not forward and (params is None or params.inject):
            t = t.then(field_to_transform(_bump(fixed, (11, 10, 9), (5.0, 0.0, 0.0))))
        return RegistrationResult(t, resample(moving, fixed, t), paradigm=self.key)


def test_estimate_error_map_end_to_end_with_a_known_answer(monkeypatch):
    grid = _grid()
    shift = (2.0, 1.0, -1.0)
    KnownFieldRegistrar.truth = Transform(sitk.TranslationTransform(3, shift))
    KnownFieldRegistrar.inverse = Transform(sitk.TranslationTransform(3, tuple(-s for s in shift)))
    fixed = grid
    moving = resample(grid, grid, KnownFieldRegistrar.inverse)          # moving(T*(x)) = fixed(x) inside
    KnownFieldRegistrar.fixed_grid = fixed
    monkeypatch.setitem(paradigms.REGISTRY, "t_known", f"{__name__}:KnownFieldRegistrar")
    res = KnownFieldRegistrar().register(fixed, moving)
    vol, info = E.estimate_error_map("t_known", fixed, moving, res, {"inject": "true"}, method="consistency")
    assert vol.shape == fixed.shape and vol.spacing == fixed.spacing
    assert np.allclose(vol.direction, fixed.direction)
    # the reverse bump sits at moving-grid voxel (11, 10, 9): the fixed point mapped there lies 2, 1, -1 mm off
    assert vol.array.max() > 1.5 and info["error_map_method"] == "consistency"
    assert info["error_map_p95_mm"] >= info["error_map_mean_mm"] > 0
    clean, _ = E.estimate_error_map("t_known", fixed, moving, res, {"inject": "false"}, method="consistency")
    assert np.median(np.abs(clean.array - E.B_DISSIM * E.local_dissimilarity(fixed, res.warped))) < 1e-3
    quick, qinfo = E.estimate_error_map("t_known", fixed, moving, res)       # default: dissimilarity alone
    np.testing.assert_allclose(quick.array, E.B_ONLY * E.local_dissimilarity(fixed, res.warped), rtol=1e-6)
    assert qinfo["error_map_method"] == "dissimilarity"
    with pytest.raises(ValueError, match="consistency, dissimilarity, tta"):
        E.estimate_error_map("t_known", fixed, moving, res, method="nope")


def test_guided_correction_moves_guides_onto_partners_and_leaves_far_points():
    grid = _grid((30, 34, 38))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.03, 0.0, -0.02, 0.98, 0.01, 0.0, 0.02, 1.01))
    affine.SetTranslation((2.0, -1.0, 0.5))
    t = Transform(affine)
    fpts = grid.index_to_physical(np.array([[10, 12, 8], [25, 20, 15], [14, 26, 20]], float))
    mpts = t.transform_points(fpts) + np.array([[3.0, -2.0, 1.0], [-2.0, 2.5, 0.0], [1.0, 1.0, -3.0]])
    corrected, field, info = G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), sigma_mm=8.0)
    assert info["guide_tre_before_mm"] > 2.0
    assert info["guide_tre_after_mm"] < 0.5          # < 1 mm required; trilinear field sampling only
    assert np.linalg.norm(corrected.transform_points(fpts) - mpts, axis=1).max() < 1.0
    corners = grid.index_to_physical(np.array([[x, y, z] for x in (1, 36) for y in (1, 32) for z in (1, 28)], float))
    dist = np.linalg.norm(corners[:, None] - fpts[None], axis=-1).min(1)
    far = corners[dist > 4 * max(info["widths_mm"])]         # the correction has faded out there
    assert len(far) >= 2
    np.testing.assert_allclose(corrected.transform_points(far), t.transform_points(far), atol=0.02)
    assert info["fold_fraction"] == 0.0 and field.shape == grid.shape
    with pytest.raises(ValueError, match="matched"):
        G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts[:2]))


def test_image_aware_correction_honours_guides_on_an_oblique_grid_and_keeps_far_points():
    grid = _grid((30, 34, 38))
    t = Transform.identity()                    # moving = fixed: the image term holds the field at identity
    fpts = grid.index_to_physical(np.array([[12, 14, 10], [24, 20, 14]], float))
    mpts = fpts + np.array([[2.5, -1.5, 1.0], [-2.0, 2.0, 0.5]])
    quick = {"levels": (4, 2), "iterations": (15,)}        # level 4 is too coarse for this grid: dropped
    reports = []
    corrected, field, info = G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), sigma_mm=6.0,
                                                 method="optimise", moving=grid, options=dict(quick, taper_mm=8.0),
                                                 progress=reports.append, device="cpu")
    assert info["method"] == "optimise" and info["optimise"]["taper_mm"] == 8.0
    assert info["optimise"]["levels_used"] == [2] and info["optimise"]["iterations_used"] == [15]
    assert info["guide_tre_before_mm"] > 2.0 and info["guide_tre_after_mm"] < 0.5
    assert np.linalg.norm(corrected.transform_points(fpts) - mpts, axis=1).max() < 1.0
    assert reports and all(p.stage == "guidance" for p in reports)
    corners = grid.index_to_physical(np.array([[x, y, z] for x in (1, 36) for y in (1, 32) for z in (1, 28)], float))
    far = corners[np.linalg.norm(corners[:, None] - fpts[None], axis=-1).min(1) > 25.0]
    assert len(far) >= 2
    # 25 mm = 3 taper widths away the refinement has faded out: those points stay put
    np.testing.assert_allclose(corrected.transform_points(far), far, atol=0.05)
    assert field.shape == grid.shape and info["fold_fraction"] == 0.0
    # without the taper the smooth refinement reaches those points too: the taper is what keeps them
    untapered, _, info2 = G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), method="optimise",
                                              moving=grid, options=dict(quick, taper_mm=None), device="cpu")
    assert info2["guide_tre_after_mm"] < 0.5
    assert np.linalg.norm(untapered.transform_points(far) - far, axis=1).max() > 0.1
    with pytest.raises(ValueError, match="moving image"):
        G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), method="optimise")
    with pytest.raises(ValueError, match="rbf, optimise"):
        G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), method="tps")
    with pytest.raises(ValueError, match="unknown guide optimise option"):
        G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), method="optimise", moving=grid,
                            options={"lr": 1.0})
    import threading
    from app.engine.types import Cancelled
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        G.guided_correction(grid, t, Landmarks(fpts), Landmarks(mpts), method="optimise", moving=grid,
                            options=quick, cancel=stop)


def test_cli_register_writes_an_error_map_and_honours_guides(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    from tests.test_cli import blob_pair
    root = Path(__file__).resolve().parents[1]
    files = blob_pair(tmp_path)
    fixed = sitk.ReadImage(str(files["fixed"]))
    gf = [fixed.TransformContinuousIndexToPhysicalPoint((16.0, 14.0, 12.0)),
          fixed.TransformContinuousIndexToPhysicalPoint((10.0, 10.0, 10.0))]
    gm = [(p[0] + 3.0 + 2.0, p[1], p[2]) for p in gf]           # the 3 mm shift, and 2 mm more to honour
    for name, pts in (("gf.csv", gf), ("gm.csv", gm)):
        (tmp_path / name).write_text("x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in pts))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "main.py", "register", files["fixed"], files["moving"], "--paradigm",
                        "iterative", "--param", "stages=rigid", "--param", "metric=mse", "--error-map", "consistency",
                        "--guide-fixed-landmarks", tmp_path / "gf.csv", "--guide-moving-landmarks", tmp_path / "gm.csv",
                        "--out", out, "--no-progress"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["guidance"]["guide_tre_after_mm"] < 1.0 < m["guidance"]["guide_tre_before_mm"]
    assert m["error_map_method"] == "consistency" and m["error_map_p95_mm"] >= m["error_map_mean_mm"] >= 0
    em = sitk.ReadImage(str(out / "error_map.nii.gz"))
    assert em.GetSize() == fixed.GetSize() and np.allclose(em.GetDirection(), fixed.GetDirection())
    t = sitk.ReadTransform(str(out / "transform.h5"))
    np.testing.assert_allclose(t.TransformPoint(gf[0]), gm[0], atol=1.0)


def test_cli_evaluate_reports_the_error_map_per_pair(tmp_path):
    import csv
    import subprocess
    import sys
    from pathlib import Path
    from tests.test_cli import blob_pair
    root = Path(__file__).resolve().parents[1]
    files = blob_pair(tmp_path)
    (tmp_path / "pairs.csv").write_text("fixed,moving,fixed_labels,moving_labels\n"
                                        f"{files['fixed']},{files['moving']},{files['fixed_labels']},{files['moving_labels']}\n")
    out = tmp_path / "ev"
    r = subprocess.run([sys.executable, "main.py", "evaluate", "--pairs", tmp_path / "pairs.csv", "--paradigm",
                        "iterative", "--param", "stages=rigid", "--param", "metric=mse", "--error-map", "--out", out,
                        "--no-progress"], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert float(rows[0]["error_map_p95_mm"]) >= float(rows[0]["error_map_mean_mm"]) >= 0
    assert len(list(out.rglob("error_map.nii.gz"))) == 1


def test_the_worst_region_is_the_largest_piece_not_the_centroid_of_scattered_voxels():
    mask = np.zeros((10, 10, 30), bool)
    mask[4:6, 4:6, 1:3] = True            # two small pieces at either end
    mask[4:6, 4:6, 27:29] = True
    mask[1:4, 1:4, 10:13] = True          # the largest piece
    pts = E._largest_piece(mask)
    assert len(pts) == 27 and np.allclose(pts.mean(0), (2, 2, 11))
    assert len(E._largest_piece(np.zeros((3, 3, 3), bool))) == 0


def test_cli_guide_method_optimise_and_guide_columns_in_a_pairs_csv(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path
    from tests.test_cli import blob_pair
    root = Path(__file__).resolve().parents[1]
    files = blob_pair(tmp_path)
    fixed = sitk.ReadImage(str(files["fixed"]))
    gf = [fixed.TransformContinuousIndexToPhysicalPoint((16.0, 14.0, 12.0)),
          fixed.TransformContinuousIndexToPhysicalPoint((10.0, 10.0, 10.0))]
    gm = [(p[0] + 3.0 + 2.0, p[1], p[2]) for p in gf]           # the 3 mm shift, and 2 mm more to honour
    for name, pts in (("gf.csv", gf), ("gm.csv", gm)):
        (tmp_path / name).write_text("x,y,z\n" + "".join(f"{p[0]},{p[1]},{p[2]}\n" for p in pts))
    fast = ["--paradigm", "iterative", "--param", "stages=rigid", "--param", "metric=mse", "--no-progress"]
    # register: the RBF method, chosen
    out = tmp_path / "reg"
    r = subprocess.run([sys.executable, "main.py", "register", files["fixed"], files["moving"], *fast,
                        "--guide-fixed-landmarks", tmp_path / "gf.csv", "--guide-moving-landmarks", tmp_path / "gm.csv",
                        "--guide-method", "rbf", "--out", out], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    g = json.loads((out / "metrics.json").read_text())["guidance"]
    assert g["method"] == "rbf" and g["guide_tre_after_mm"] < 1.0 < g["guide_tre_before_mm"]
    t = sitk.ReadTransform(str(out / "transform.h5"))
    np.testing.assert_allclose(t.TransformPoint(gf[1]), gm[1], atol=1.0)
    # evaluate: guide pairs per row of the CSV (relative paths, resolved against the CSV's folder), the
    # default (image-aware) method
    (tmp_path / "pairs.csv").write_text("fixed,moving,guide_fixed_landmarks,guide_moving_landmarks\n"
                                        f"{files['fixed']},{files['moving']},gf.csv,gm.csv\n")
    ev = tmp_path / "ev"
    r = subprocess.run([sys.executable, "main.py", "evaluate", "--pairs", tmp_path / "pairs.csv", *fast, "--out", ev],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    full = json.loads((ev / "results.json").read_text())
    g = full[0]["guidance"]
    assert g["method"] == "optimise" and g["guide_tre_after_mm"] < 1.0 < g["guide_tre_before_mm"]
    r = subprocess.run([sys.executable, "main.py", "register", files["fixed"], files["moving"], *fast,
                        "--guide-method", "tps", "--out", out], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--guide-method" in r.stderr
