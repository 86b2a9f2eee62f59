"""The issue's case: a native T2W (moving) -> T1W (fixed) pair of one MS study, checked against the
dataset's reference transforms (``*_intrastudy_to_FLAIR.txt``, ITK, FLAIR points -> T1W / T2W points).

Reference fixed -> moving map: ``x_T1 -> R_T2(R_T1^-1(x_T1))``. Error: mean (and 95th percentile)
distance to it over the T1W head (Otsu mask, every 4th voxel), for the identity and the ``iterative``
defaults before (modality=same, no guard, demons) and after (auto)::

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 .venv/bin/python bench/bench_ms_reference.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import io, paradigms  # noqa: E402
from app.engine.types import Transform  # noqa: E402

RAW = Path("/work/shared/data/ms_longitudinal/raw_patient01")


def main(study: str = "study1") -> int:
    fixed = io.read_volume(RAW / f"{study}_T1W.nii.gz")
    moving = io.read_volume(RAW / f"{study}_T2W.nii.gz")
    r_t1 = sitk.ReadTransform(str(RAW / f"{study}_T1W_intrastudy_to_FLAIR.txt"))
    r_t2 = sitk.ReadTransform(str(RAW / f"{study}_T2W_intrastudy_to_FLAIR.txt"))
    inv_t1 = r_t1.GetInverse()
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(fixed.to_sitk(sitk.sitkFloat32), 0, 1))
    idx = np.argwhere(mask > 0)[::4][:, ::-1].astype(float)
    pts = fixed.index_to_physical(idx)
    ref = np.array([r_t2.TransformPoint(inv_t1.TransformPoint(tuple(p))) for p in pts])

    def err(t: Transform):
        d = np.linalg.norm(t.transform_points(pts) - ref, axis=1)
        return float(d.mean()), float(np.percentile(d, 95))

    print(f"{study} T2W -> T1W, {len(pts)} head points; identity: mean {err(Transform.identity())[0]:.2f} mm, "
          f"p95 {err(Transform.identity())[1]:.2f} mm", flush=True)
    reg = paradigms.get("iterative")
    for name, over in (("before", {"modality": "same", "linear_guard": False, "deformable": "diffeomorphic_demons"}),
                       ("after", {}), ("after, rigid+affine", {"stages": "rigid+affine"})):
        t0 = time.perf_counter()
        res = reg.register(fixed, moving, paradigms.make_params(reg.Params, over))
        m, p95 = err(res.transform)
        print(f"{name:>20}: mean {m:.2f} mm, p95 {p95:.2f} mm, {time.perf_counter() - t0:.0f} s; "
              f"{res.params['chosen']['reason']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
