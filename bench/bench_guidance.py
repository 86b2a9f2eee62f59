"""Landmark-guided correction on inter-subject IXI test pairs (issue: trust what you see).

Landmarks are label centroids (DLMUSE labels present in both subjects, LPS mm). After a registration,
the user places guides where the error is worst: the K landmarks with the largest TRE become guide
pairs, every other landmark is a held-back check. The result is corrected with
:func:`app.engine.guidance.guided_correction` and scored by the same code before and after: guide
TRE, held-back TRE (mean, and for the checks within 30 mm of a guide), Dice.

    python bench/bench_guidance.py --pairs 6 --method weakly --guides 6
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import io  # noqa: E402
from app.engine import metrics as M  # noqa: E402
from app.engine.guidance import guided_correction  # noqa: E402
from app.engine.pipeline import register_pipeline  # noqa: E402
from app.engine.spatial import resample  # noqa: E402
from app.engine.types import Landmarks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def centroids(labels) -> dict[int, np.ndarray]:
    """Label -> centroid (LPS mm) of a LabelMap."""
    arr = labels.array
    out = {}
    idx = np.nonzero(arr)
    vals = arr[idx]
    pts = np.stack(idx[::-1], 1).astype(float)          # xyz index
    for lab in np.unique(vals):
        sel = vals == lab
        if sel.sum() >= 300:          # small labels give unstable centroids
            out[int(lab)] = labels.index_to_physical(pts[sel].mean(0)[None])[0]
    return out


def _cases(a):
    """Inter-subject pairs of the CSV, or synthetic known-field cases of held-back subjects."""
    if a.synthetic:
        from app.engine import datasets as D
        from bench.bench_error_map import make_case
        for si, name in enumerate(D.load_split()["test"][:a.pairs]):
            fixed, moving, fl, truth = make_case(name, 3000 + si)
            from app.engine.datasets import ixi_paths
            ml = io.read_labels(ixi_paths(name)[1], reference=moving)
            yield {"name": name[:6] + "-synthetic", "fixed": fixed, "moving": moving, "fixed_labels": fl,
                   "moving_labels": ml, "truth": truth}
        return
    for pair in io.read_pairs_csv(a.csv)[:a.pairs]:
        fixed, moving = io.read_volume(pair["fixed"]), io.read_volume(pair["moving"])
        yield {"name": Path(pair["fixed"]).name[:6] + "-" + Path(pair["moving"]).name[:6], "fixed": fixed,
               "moving": moving, "fixed_labels": io.read_labels(pair["fixed_labels"], reference=fixed),
               "moving_labels": io.read_labels(pair["moving_labels"], reference=moving), "truth": None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--method", default="weakly")
    ap.add_argument("--guides", type=int, default=6)
    ap.add_argument("--sigma", type=float, default=20.0)
    ap.add_argument("--csv", default=str(ROOT / "resources" / "splits" / "ixi_test20.csv"))
    ap.add_argument("--synthetic", action="store_true",
                    help="exact answers instead: a held-back subject warped by a known smooth field (as in "
                         "bench_error_map); landmarks = fixed label centroids, partners = their true positions")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guidance.json"))
    a = ap.parse_args()
    rows = []
    for pair in _cases(a):
        fixed, moving, fl, ml = pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"]
        cf = centroids(fl)
        if pair.get("truth") is not None:
            ids = sorted(cf)
            F = np.array([cf[i] for i in ids])
            Mv = pair["truth"].transform_points(F)
        else:
            cm = centroids(ml)
            ids = sorted(set(cf) & set(cm))
            F = np.array([cf[i] for i in ids])
            Mv = np.array([cm[i] for i in ids])
        res = register_pipeline(a.method, fixed, moving, {}, device="cpu")
        err = np.linalg.norm(res.transform.transform_points(F) - Mv, axis=1)
        # the user points at the largest errors they can see; a 25 mm "error" between two centroids is a
        # correspondence the labels do not define, not a registration error: not a guide
        order = [i for i in np.argsort(err)[::-1] if err[i] < 25.0]
        guides = np.array(order[:a.guides])
        checks = np.setdiff1d(np.arange(len(ids)), guides)
        t0 = time.perf_counter()
        corr, _, info = guided_correction(fixed, res.transform, Landmarks(F[guides]), Landmarks(Mv[guides]),
                                          sigma_mm=a.sigma, field=res.field)
        secs = time.perf_counter() - t0
        err2 = np.linalg.norm(corr.transform_points(F) - Mv, axis=1)
        near = checks[np.linalg.norm(F[checks][:, None] - F[guides][None], axis=-1).min(1) < 30.0]
        dice = lambda t: M.summarize_dice(M.dice_per_label(fl.array, resample(ml, fixed, t, "nearest").array))
        row = {"pair": pair["name"], "landmarks": len(ids),
               "guides": len(guides), "guide_tre_before": float(err[guides].mean()),
               "guide_tre_after": float(err2[guides].mean()), "check_tre_before": float(err[checks].mean()),
               "check_tre_after": float(err2[checks].mean()), "near_checks": int(len(near)),
               "near_check_tre_before": float(err[near].mean()) if len(near) else None,
               "near_check_tre_after": float(err2[near].mean()) if len(near) else None,
               "dice_before": dice(res.transform), "dice_after": dice(corr), "widths_mm": info["widths_mm"],
               "fold_after": info["fold_fraction"], "seconds_correction": round(secs, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    summary = {k: float(np.mean([r[k] for r in rows if r[k] is not None])) for k in keys}
    print("mean", json.dumps(summary))
    Path(a.out).write_text(json.dumps({"method": a.method, "guides": a.guides, "sigma_mm": a.sigma,
                                       "cases": "synthetic known fields" if a.synthetic else a.csv,
                                       "rows": rows, "mean": summary}, indent=1))


if __name__ == "__main__":
    main()
