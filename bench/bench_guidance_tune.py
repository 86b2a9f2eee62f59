"""How the image-aware guided correction's settings were chosen: IXI TRAINING pairs only.

Same protocol as ``bench_guidance.py`` (weakly result, the 6 worst label-centroid landmarks under 25 mm
are guides, the rest held back) on pairs of consecutive training subjects of
``resources/splits/ixi_split.json``. For each smoothness weight the optimiser (local NCC + diffusion +
guides as a landmark term, weight ``--landmark-weight``) runs once from the result; each taper width
(0 = none) then blends the refinement into the result around the guides, and the RBF snaps the residual.
Prints per pair the change of Dice, guide TRE after, and the change of held-back / near TRE (mm).

    OMP_NUM_THREADS=1 python bench/bench_guidance_tune.py --pairs 4 --smoothness 2,8 --taper 0,15,30
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import metrics as M  # noqa: E402
from app.engine.guidance import _distance_to_points, _rbf_snap  # noqa: E402
from app.engine.optimise import optimise  # noqa: E402
from app.engine.pipeline import register_pipeline  # noqa: E402
from app.engine.spatial import field_to_transform, resample, transform_to_field  # noqa: E402
from bench.bench_guidance import _cases, split_guides, centroids  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--smoothness", default="2,8")
    ap.add_argument("--taper", default="0,15,30")
    ap.add_argument("--landmark-weight", type=float, default=0.05)
    a = ap.parse_args()
    a.split, a.synthetic, a.csv, a.skip = "train", False, None, 0
    for pair in _cases(a):
        fixed, moving, fl, ml = pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"]
        cf, cm = centroids(fl), centroids(ml)
        ids = sorted(set(cf) & set(cm))
        F, Mv = np.array([cf[i] for i in ids]), np.array([cm[i] for i in ids])
        res = register_pipeline("weakly", fixed, moving, {}, device="cpu")
        err = np.linalg.norm(res.transform.transform_points(F) - Mv, axis=1)
        g, chk = split_guides(err, 6)
        near = chk[np.linalg.norm(F[chk][:, None] - F[g][None], axis=-1).min(1) < 30.0]

        def dice(t):
            return M.summarize_dice(M.dice_per_label(fl.array, resample(ml, fixed, t, "nearest").array))
        d0 = dice(res.transform)
        out = {"pair": pair["name"], "dice0": round(d0, 4), "guide0": round(err[g].mean(), 2),
               "check0": round(err[chk].mean(), 3)}
        dist = _distance_to_points(fixed, F[g])
        base = res.field.array.astype(np.float64)
        for reg in [float(v) for v in a.smoothness.split(",")]:
            t0 = time.perf_counter()
            r = optimise(fixed, moving, "velocity", initial=res.transform, similarity="lncc", weight=reg,
                         levels=(4, 2), iterations=(60, 30), landmarks=(F[g], Mv[g], a.landmark_weight), device="cpu")
            full = transform_to_field(r.transform, fixed).array
            for taper in [float(v) for v in a.taper.split(",")]:
                w = 1.0 if taper == 0 else np.exp(-dist ** 2 / (2 * taper ** 2))[..., None]
                fld = res.field.with_array((base + w * (full - base)).astype(np.float32))
                t2 = _rbf_snap(fixed, field_to_transform(fld), F[g], Mv[g], 0.1, fld)[0]
                e2 = np.linalg.norm(t2.transform_points(F) - Mv, axis=1)
                out[f"smooth{reg:g}_taper{taper:g}"] = {
                    "dice_change": round(dice(t2) - d0, 4), "guide_after": round(e2[g].mean(), 2),
                    "check_change": round(e2[chk].mean() - err[chk].mean(), 3),
                    "near_change": round(e2[near].mean() - err[near].mean(), 2), "s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
