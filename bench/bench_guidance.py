"""Landmark-guided correction on inter-subject IXI pairs (issue 13: trust what you see).

Protocol (fixed; the same for every method and pair):

* landmarks: centroids (LPS mm) of the DLMUSE labels present in both subjects with >= 300 voxels;
* the pair is registered by ``--paradigm`` (default ``weakly``, its bundled checkpoint);
* guides: the ``--guides`` (6) landmarks with the largest TRE after the registration, among those
  under 25 mm (the user points at the largest errors they can see; a 25 mm "error" between two
  centroids is a correspondence the labels do not define: see ``bad_labels`` below), every other
  landmark is a held-back check; "near" checks lie within 30 mm of a guide;
* each method corrects the same result with the same guides and is scored by the same code: mean
  guide TRE, mean held-back TRE, mean Dice over the labels (nearest-neighbour warp), seconds.

``bad_labels`` counts the landmarks whose TRE exceeds 25 mm after the registration: pairs where it is
not 0 hold a subject whose label map disagrees with the other's (IXI638's DLMUSE map puts right-hemisphere
labels across the midline), so their Dice and centroid TREs do not measure the registration.

Pairs: ``--split test`` = ``resources/splits/ixi_test20.csv`` (held-back subjects); ``--split train`` =
consecutive training subjects of ``resources/splits/ixi_split.json`` (used to choose the settings).
``--synthetic``: exact answers instead (a held-back subject warped by a known smooth field).

    OMP_NUM_THREADS=1 python bench/bench_guidance.py --split test --pairs 8 --methods rbf,optimise \
        --out bench/results/guidance.json --md bench/results/guidance.md
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
from app.engine.guidance import GUIDE_METHODS, guided_correction  # noqa: E402
from app.engine.pipeline import register_pipeline  # noqa: E402
from app.engine.spatial import resample  # noqa: E402
from app.engine.types import Landmarks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOT_A_CORRESPONDENCE_MM = 25.0


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
    """Inter-subject pairs (test CSV or training subjects), or synthetic known-field cases."""
    from app.engine import datasets as D
    if a.synthetic:
        from bench.bench_error_map import make_case
        for si, name in enumerate(D.load_split()["test"][:a.pairs]):
            fixed, moving, fl, truth = make_case(name, 3000 + si)
            ml = io.read_labels(D.ixi_paths(name)[1], reference=moving)
            yield {"name": name[:6] + "-synthetic", "fixed": fixed, "moving": moving, "fixed_labels": fl,
                   "moving_labels": ml, "truth": truth}
        return
    if a.split == "train":
        tr = D.load_split()["train"]
        rows = []
        for i in range(a.skip + a.pairs):
            (f, fl), (m, ml) = D.ixi_paths(tr[2 * i]), D.ixi_paths(tr[2 * i + 1])
            rows.append({"fixed": f, "moving": m, "fixed_labels": fl, "moving_labels": ml})
        rows = rows[a.skip:]
    else:
        rows = io.read_pairs_csv(a.csv)[a.skip:a.skip + a.pairs]
    for pair in rows:
        fixed, moving = io.read_volume(pair["fixed"]), io.read_volume(pair["moving"])
        yield {"name": Path(pair["fixed"]).name[:6] + "-" + Path(pair["moving"]).name[:6], "fixed": fixed,
               "moving": moving, "fixed_labels": io.read_labels(pair["fixed_labels"], reference=fixed),
               "moving_labels": io.read_labels(pair["moving_labels"], reference=moving), "truth": None}


def split_guides(err: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(guide indices, check indices): the ``k`` largest TREs under 25 mm; the rest are checks."""
    order = [i for i in np.argsort(err)[::-1] if err[i] < NOT_A_CORRESPONDENCE_MM]
    guides = np.array(order[:k], int)
    return guides, np.setdiff1d(np.arange(len(err)), guides)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--skip", type=int, default=0, help="start after this many pairs of the list")
    ap.add_argument("--split", choices=("test", "train"), default="test")
    ap.add_argument("--paradigm", default="weakly")
    ap.add_argument("--methods", default="rbf,optimise", help=f"comma-separated, of {', '.join(GUIDE_METHODS)}")
    ap.add_argument("--guides", type=int, default=6)
    ap.add_argument("--sigma", type=float, default=20.0)
    ap.add_argument("--csv", default=str(ROOT / "resources" / "splits" / "ixi_test20.csv"))
    ap.add_argument("--synthetic", action="store_true",
                    help="exact answers instead: a held-back subject warped by a known smooth field (as in "
                         "bench_error_map); landmarks = fixed label centroids, partners = their true positions")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guidance.json"))
    ap.add_argument("--md", default=None, help="also write a Markdown table here")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
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
        t0 = time.perf_counter()
        res = register_pipeline(a.paradigm, fixed, moving, {}, device="cpu")
        secs_reg = time.perf_counter() - t0
        err = np.linalg.norm(res.transform.transform_points(F) - Mv, axis=1)
        guides, checks = split_guides(err, a.guides)
        near = checks[np.linalg.norm(F[checks][:, None] - F[guides][None], axis=-1).min(1) < 30.0]

        def dice(t):
            return M.summarize_dice(M.dice_per_label(fl.array, resample(ml, fixed, t, "nearest").array))

        row = {"pair": pair["name"], "landmarks": len(ids), "bad_labels": int(np.sum(err >= NOT_A_CORRESPONDENCE_MM)),
               "guide_labels": [int(ids[i]) for i in guides], "guides": len(guides), "near_checks": int(len(near)),
               "seconds_registration": round(secs_reg, 1), "dice_before": dice(res.transform),
               "guide_tre_before": float(err[guides].mean()), "check_tre_before": float(err[checks].mean()),
               "near_check_tre_before": float(err[near].mean()) if len(near) else None}
        for method in methods:
            t0 = time.perf_counter()
            corr, _, info = guided_correction(fixed, res.transform, Landmarks(F[guides]), Landmarks(Mv[guides]),
                                              sigma_mm=a.sigma, field=res.field, method=method, moving=moving,
                                              device="cpu")
            secs = time.perf_counter() - t0
            err2 = np.linalg.norm(corr.transform_points(F) - Mv, axis=1)
            row[method] = {"dice_after": dice(corr), "guide_tre_after": float(err2[guides].mean()),
                           "check_tre_after": float(err2[checks].mean()),
                           "near_check_tre_after": float(err2[near].mean()) if len(near) else None,
                           "widths_mm": info["widths_mm"], "fold_after": info["fold_fraction"],
                           "seconds_correction": round(secs, 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def mean(sel, get):
        vals = [get(r) for r in sel if get(r) is not None]
        return float(np.mean(vals)) if vals else None

    groups = {"all pairs": rows, "pairs with consistent labels (bad_labels = 0)": [r for r in rows if not r["bad_labels"]]}
    summary = {}
    for gname, sel in groups.items():
        s = {k: mean(sel, lambda r, k=k: r[k]) for k in ("dice_before", "guide_tre_before", "check_tre_before",
                                                            "near_check_tre_before")}
        s["pairs"] = len(sel)
        for method in methods:
            s[method] = {k: mean(sel, lambda r, k=k: r[method][k]) for k in
                         ("dice_after", "guide_tre_after", "check_tre_after", "near_check_tre_after",
                          "seconds_correction")}
        summary[gname] = s
        print("mean", gname, json.dumps(s), flush=True)
    Path(a.out).write_text(json.dumps({"paradigm": a.paradigm, "guides": a.guides, "sigma_mm": a.sigma,
                                       "methods": methods, "split": "synthetic" if a.synthetic else a.split,
                                       "cases": "synthetic known fields" if a.synthetic else
                                       (a.csv if a.split == "test" else "training subjects 2i, 2i+1"),
                                       "rows": rows, "mean": summary}, indent=1))
    if a.md:
        Path(a.md).write_text(markdown(rows, summary, methods, " ".join(sys.argv[1:])))


def markdown(rows: list[dict], summary: dict, methods: list[str], args: str) -> str:
    """One table: per pair and mean, Dice before/after, guide TRE, held-back TRE, seconds, per method."""
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    head = ["pair", "bad labels", "Dice before"] + [f"Dice {m}" for m in methods] + ["guide TRE before"] + \
        [f"guide TRE {m}" for m in methods] + ["held-back TRE before"] + [f"held-back TRE {m}" for m in methods] + \
        [f"s {m}" for m in methods]
    lines = [f"`python bench/bench_guidance.py {args}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name, bad, src, get):
        cells = [name, bad, f(src["dice_before"], 4)] + [f(get(src, m, "dice_after"), 4) for m in methods] + \
            [f(src["guide_tre_before"], 2)] + [f(get(src, m, "guide_tre_after"), 2) for m in methods] + \
            [f(src["check_tre_before"], 2)] + [f(get(src, m, "check_tre_after"), 2) for m in methods] + \
            [f(get(src, m, "seconds_correction"), 1) for m in methods]
        return "| " + " | ".join(cells) + " |"

    get = lambda src, m, k: src[m][k]  # noqa: E731
    for r in rows:
        lines.append(line(r["pair"], str(r["bad_labels"]), r, get))
    for gname, s in summary.items():
        lines.append(line(f"**mean, {gname}** ({s['pairs']})", "", s, get))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
