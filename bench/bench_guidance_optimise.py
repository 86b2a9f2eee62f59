"""Experiment for the next step of guided correction: an image-aware correction.

The weakly result is refined by app.engine.optimise (velocity field, local NCC + smoothness) with the guide
pairs as a landmark term (weight w, mm^2), then the remaining guide residual is snapped with the RBF correction.
Same guides and checks as bench_guidance.py (6 worst label-centroid landmarks < 25 mm), pairs 1, 4, 5 of
ixi_test20. Output: bench/results/guidance_optimise.log.

    OMP_NUM_THREADS=2 python bench/bench_guidance_optimise.py
"""
import sys, time, json, numpy as np
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine import io, metrics as M
from app.engine.optimise import optimise
from app.engine.guidance import guided_correction
from app.engine.pipeline import register_pipeline
from app.engine.spatial import resample
from app.engine.types import Landmarks
from bench.bench_guidance import centroids
pairs = io.read_pairs_csv(str(Path(__file__).resolve().parents[1] / "resources" / "splits" / "ixi_test20.csv"))[:6]
for idx in [0, 3, 4]:
    pair = pairs[idx]
    fixed, moving = io.read_volume(pair["fixed"]), io.read_volume(pair["moving"])
    fl = io.read_labels(pair["fixed_labels"], reference=fixed); ml = io.read_labels(pair["moving_labels"], reference=moving)
    cf, cm = centroids(fl), centroids(ml); ids = sorted(set(cf) & set(cm))
    F = np.array([cf[i] for i in ids]); Mv = np.array([cm[i] for i in ids])
    res = register_pipeline("weakly", fixed, moving, {}, device="cpu")
    err = np.linalg.norm(res.transform.transform_points(F) - Mv, axis=1)
    order = [i for i in np.argsort(err)[::-1] if err[i] < 25.0]; g = np.array(order[:6]); chk = np.setdiff1d(np.arange(len(ids)), g)
    dice = lambda t: M.summarize_dice(M.dice_per_label(fl.array, resample(ml, fixed, t, "nearest").array))
    out = {"pair": idx, "dice0": dice(res.transform), "g0": err[g].mean(), "c0": err[chk].mean()}
    for w in (0.05, 0.5):
        t0 = time.time()
        r = optimise(fixed, moving, "velocity", initial=res.transform, similarity="lncc", weight=0.5, levels=(4, 2), iterations=(60, 30), landmarks=(F[g], Mv[g], w), device="cpu")
        t1 = r.transform
        e1 = np.linalg.norm(t1.transform_points(F) - Mv, axis=1)
        t2, _, info = guided_correction(fixed, t1, Landmarks(F[g]), Landmarks(Mv[g]))
        e2 = np.linalg.norm(t2.transform_points(F) - Mv, axis=1)
        out[f"w{w}"] = dict(s=round(time.time()-t0,1), dice_opt=round(dice(t1),4), g_opt=round(e1[g].mean(),2), c_opt=round(e1[chk].mean(),2), dice_snap=round(dice(t2),4), g_snap=round(e2[g].mean(),3), c_snap=round(e2[chk].mean(),2))
    print(json.dumps(out, default=float), flush=True)
