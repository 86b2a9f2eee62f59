"""Validate (and calibrate) the registration-error maps of app.engine.errormap on exact answers.

A subject's T1 is warped by a known smooth random field: fixed = the warped image, moving = the
original, truth ``T*`` = that field (fixed points -> moving points). Each method registers the pair,
the error map is estimated, and the estimate is compared with the true error ``|T(x) - T*(x)|`` over
brain voxels (Spearman), and per region (mean over each DLMUSE label, Spearman across labels).

    python bench/bench_error_map.py --calibrate --subjects 3                  # training subjects -> a, b
    python bench/bench_error_map.py --subjects 3 --methods iterative weakly   # held-back test subjects
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import datasets as D  # noqa: E402
from app.engine import errormap as E  # noqa: E402
from app.engine import io  # noqa: E402
from app.engine.pipeline import register_pipeline  # noqa: E402
from app.engine.spatial import field_to_transform, resample, transform_to_field  # noqa: E402


def make_case(subject: str, seed: int, max_mm: float = 8.0):
    t1, seg = D.ixi_paths(subject)
    moving = io.read_volume(t1)
    labels = io.read_labels(seg, reference=moving)
    phi = D.synthetic_deformation(moving, max_mm=max_mm, control_points=6, rng=np.random.default_rng(seed))
    truth = field_to_transform(phi)
    fixed = resample(moving, moving, truth, "linear")
    fixed_labels = resample(labels, moving, truth, "nearest")
    return fixed, moving, fixed_labels, truth


def spearman(a, b) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(a, b).statistic)


def run_case(method: str, params: dict, fixed, moving, fixed_labels, truth, estimators, rng):
    """Register once, then score every estimator against the true error; returns (rows, pooled parts)."""
    t0 = time.perf_counter()
    res = register_pipeline(method, fixed, moving, params, device="cpu")
    t_reg = time.perf_counter() - t0
    true_err = np.linalg.norm(transform_to_field(res.transform, fixed).array.astype(np.float64)
                              - transform_to_field(truth, fixed).array, axis=-1)
    brain = fixed_labels.array > 0
    idx = np.flatnonzero(brain.ravel())
    pick = rng.choice(idx, min(30000, idx.size), replace=False)
    labs = fixed_labels.array.ravel()
    ids = [i for i in np.unique(labs[idx]) if i != 0]
    n = np.maximum(np.bincount(labs, minlength=max(ids) + 1), 1)
    te = np.bincount(labs, true_err.ravel(), minlength=max(ids) + 1) / n
    rows, parts = [], {}
    for est_method in estimators:
        t1 = time.perf_counter()
        if est_method == "consistency":
            rev = register_pipeline(method, moving, fixed, params, device="cpu")
            ic = E.inverse_consistency(res.transform, rev.transform, fixed)
            d = E.local_dissimilarity(fixed, res.warped)
            est = E.A_IC * ic + E.B_DISSIM * d
            parts = {"ic": ic.ravel()[pick], "d": d.ravel()[pick]}
        else:
            est = E.estimate_error_map(method, fixed, moving, res, params, method=est_method, device="cpu")[0].array
        t_est = time.perf_counter() - t1
        ee = np.bincount(labs, est.ravel(), minlength=max(ids) + 1) / n
        rows.append({"method": method, "estimator": est_method, "seconds_register": round(t_reg, 2),
                     "seconds_estimate": round(t_est, 2), "true_error_mean_mm": float(true_err[brain].mean()),
                     "estimate_mean_mm": float(est[brain].mean()),
                     "spearman_voxels": spearman(est.ravel()[pick], true_err.ravel()[pick]),
                     "spearman_regions": spearman(ee[ids], te[ids])})
    return rows, parts, true_err.ravel()[pick]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=["iterative", "weakly"])
    ap.add_argument("--subjects", type=int, default=5)
    ap.add_argument("--calibrate", action="store_true", help="fit a, b on training subjects (consistency)")
    ap.add_argument("--estimators", nargs="+", default=["dissimilarity", "consistency"], choices=E.METHODS)
    ap.add_argument("--out", default="bench/results/error_map.json")
    a = ap.parse_args()
    split = D.load_split()
    names = split["train"][:a.subjects] if a.calibrate else split["test"][-a.subjects:]
    rng = np.random.default_rng(0)
    rows, pool = [], {"ic": [], "d": [], "true": []}
    for si, name in enumerate(names):
        case = make_case(name, 1000 + si)
        for method in a.methods:
            case_rows, parts, true = run_case(method, {}, *case, a.estimators, rng)
            for row in case_rows:
                row["subject"] = name
                rows.append(row)
                print(json.dumps(row), flush=True)
            if parts:
                pool["ic"].append(parts["ic"])
                pool["d"].append(parts["d"])
                pool["true"].append(true)
    out = {"rows": rows, "calibrate": a.calibrate, "subjects": names}
    if a.calibrate and pool["true"]:
        X = np.stack([np.concatenate(pool["ic"]), np.concatenate(pool["d"])], 1)
        y = np.concatenate(pool["true"])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        only, *_ = np.linalg.lstsq(X[:, 1:], y, rcond=None)
        out["fit"] = {"A_IC": float(coef[0]), "B_DISSIM": float(coef[1]), "B_ONLY": float(only[0])}
        print("fit", out["fit"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
