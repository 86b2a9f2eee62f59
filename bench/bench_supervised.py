#!/usr/bin/env python3
"""Known-transform cases (``app.engine.synthetic``): point error and success rate by band of initial
misalignment, every method from the same starts, scored by the same code in one run.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_supervised.py \
        [--subjects test|val] [--per-band 5] [--target 20] [--methods iterative_rigid,iterative_affine,supervised]
        [--checkpoint FILE] [--out bench/results/supervised_known.json]
    ... bench/bench_supervised.py --real 10 --methods iterative_affine,unsupervised_affine,unsupervised,supervised_affine,supervised
        --out bench/results/supervised_real.json      (inter-subject test pairs: Dice)
    ... bench/bench_supervised.py --timing             (CPU / wall seconds per pair on the demo pair)

Cases: real IXI subjects (full resolution, 2 mm, oblique) are the moving images; the fixed image is
the moving one resampled through a known transform drawn about its centre of mass
(``synthetic.make_pair``): rigid cases in bands of rotation angle / translation length
(``synthetic.BANDS``: up to 10/10, 20/20, 30/30, 45 deg/40 mm) and the issue's affine target cases
(+-15 degrees per axis, +-20 mm, scale +-10 %, shear 0.05). Error = mean distance (mm) between
where the estimated and the true transforms send 4000 brain points (fixed labels > 0); success =
error < 2 mm. Seconds = the registration call alone (reading excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.engine import paradigms, synthetic as S  # noqa: E402
from app.engine.datasets import load_split  # noqa: E402

METHODS = {
    "identity": None,
    "iterative_rigid": ("iterative", {"stages": "rigid"}),
    "iterative_affine": ("iterative", {"stages": "rigid+affine"}),
    "supervised": ("supervised", {"stages": "affine"}),
    "supervised_rigid": ("supervised", {"stages": "rigid"}),
    "supervised_1pass": ("supervised", {"stages": "affine", "iterations": "1"}),
    "supervised_3pass": ("supervised", {"stages": "affine", "iterations": "3"}),
}


def run_method(name: str, pair: S.KnownPair, checkpoint=None) -> tuple:
    if METHODS[name] is None:
        return S.matrix_to_transform(np.eye(4)), 0.0
    key, params = METHODS[name]
    reg = paradigms.get(key)
    p = paradigms.make_params(reg.Params, params)
    t0 = time.perf_counter()
    res = reg.register(pair.fixed, pair.moving, p, checkpoint=checkpoint if key == "supervised" else None,
                       device="cpu")
    return res.transform, time.perf_counter() - t0


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| cases | method | n | median mm | mean mm | success < 2 mm | s/pair |", "|---|---|---|---|---|---|---|"]
    groups = sorted({(r["set"], r["band"], r["band_label"]) for r in rows}, key=lambda g: (g[0], g[1]))
    for s, b, lab in groups:
        for m in methods:
            rr = [r for r in rows if r["set"] == s and r["band"] == b and r["method"] == m]
            if not rr:
                continue
            e = np.array([r["error_mm"] for r in rr])
            t = np.array([r["seconds"] for r in rr])
            lines.append(f"| {s} {lab} | {m} | {len(e)} | {np.median(e):.2f} | {e.mean():.2f} | "
                         f"{100 * np.mean(e < S.SUCCESS_MM):.0f} % | {t.mean():.2f} |")
    return "\n".join(lines)


REAL_METHODS = {
    "iterative_affine": ("iterative", {"stages": "rigid+affine"}),
    "iterative": ("iterative", {}),
    "unsupervised_affine": ("unsupervised", {"stages": "affine"}),
    "unsupervised": ("unsupervised", {}),
    "supervised_affine": ("supervised", {"stages": "affine"}),
    "supervised_affine_1pass": ("supervised", {"stages": "affine", "iterations": "1"}),
    "supervised_affine_3pass": ("supervised", {"stages": "affine", "iterations": "3"}),
    "supervised": ("supervised", {"stages": "affine+deformable"}),
    "instance": ("instance", {}),                                   # after the iterative affine
    "unsupervised+instance": ("unsupervised+instance", {}),
    "supervised_affine+instance": ("supervised+instance", {"supervised.stages": "affine"}),
}


def add_to_card(section: str, value: dict, checkpoint=None) -> None:
    """Merge ``value`` into the card of the (bundled) supervised checkpoint under ``section``."""
    from app.engine import checkpoints
    path = Path(checkpoint) if checkpoint else checkpoints.default_checkpoint("supervised")
    jpath, _ = checkpoints.card_paths(path)
    card = json.loads(jpath.read_text()) if jpath.is_file() else {}
    card[section] = value
    checkpoints.write_card(path, card)
    print(f"card of {path.name}: section '{section}' written")


def summarise(rows: list[dict], keys: tuple, value: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(" ".join(str(r[k]) for k in keys), []).append(r)
    return {g: {"n": len(rr), "median_mm": round(float(np.median([r[value] for r in rr])), 3),
                "mean_mm": round(float(np.mean([r[value] for r in rr])), 3),
                "success_2mm": round(float(np.mean([r[value] < S.SUCCESS_MM for r in rr])), 3),
                "seconds": round(float(np.mean([r["seconds"] for r in rr])), 3)} for g, rr in out.items()}


def real_pairs(n: int, methods: list[str], checkpoint, out: Path, card: bool = False, merge: str = "") -> int:
    """Inter-subject IXI test pairs (Dice over the fixed labels, mean over labels), every method scored by
    ``evaluation.register_and_measure`` in this one run."""
    from app.engine import io
    from app.engine.datasets import ixi_paths
    from app.engine.evaluation import register_and_measure
    rows = []
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    for fs, ms in [tuple(p) for p in load_split()["test_pairs"][:n]]:
        fp, flp = ixi_paths(fs)
        mp, mlp = ixi_paths(ms)
        fixed, moving = io.read_volume(fp), io.read_volume(mp)
        fl, ml = io.read_labels(flp, reference=fixed), io.read_labels(mlp)
        for m in methods:
            key, params = REAL_METHODS[m]
            res, met = register_and_measure(key, fixed, moving, params, fixed_labels=fl, moving_labels=ml,
                                            checkpoint=checkpoint if key == "supervised" else None, device="cpu",
                                            with_hd95=False)
            row = {"fixed": fs, "moving": ms, "method": m, "dice": met["dice_mean"], "before": met["before"]["dice_mean"],
                   "fold": met["fold_fraction"], "seconds": met["runtime_s"], "warnings": getattr(res, "warnings", [])}
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    if merge:
        seen = {(r["fixed"], r["moving"]) for r in rows}
        extra = [json.loads(line) for line in Path(merge).read_text().splitlines() if line.strip()]
        extra = [r for r in extra if (r["fixed"], r["moving"]) in seen and r["method"] not in methods]
        methods = list(dict.fromkeys([*[r["method"] for r in extra], *methods]))
        rows = rows + extra
    lines = ["| method | pairs | Dice | fold % | s/pair | warned |", "|---|---|---|---|---|---|"]
    before = np.array([r["before"] for r in rows if r["method"] == methods[0]])
    lines.append(f"| before (identity) | {len(before)} | {before.mean():.3f} ± {before.std():.3f} | - | - | - |")
    for m in methods:
        rr = [r for r in rows if r["method"] == m]
        d = np.array([r["dice"] for r in rr])
        lines.append(f"| {m} | {len(rr)} | {d.mean():.3f} ± {d.std():.3f} | {100 * np.mean([r['fold'] for r in rr]):.4f} | "
                     f"{np.mean([r['seconds'] for r in rr]):.2f} | {sum(bool(r['warnings']) for r in rr)} |")
    md = "\n".join(lines)
    print(md)
    out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv), "threads": os.environ.get("OMP_NUM_THREADS"),
                               "table": md}, indent=1))
    out.with_suffix(".md").write_text(f"# Real inter-subject IXI test pairs\n\n`{' '.join(sys.argv)}`\n\n{md}\n")
    if card:
        summ = {m: {"pairs": len([r for r in rows if r["method"] == m]),
                    "dice_mean": round(float(np.mean([r["dice"] for r in rows if r["method"] == m])), 4),
                    "fold_fraction": round(float(np.mean([r["fold"] for r in rows if r["method"] == m])), 6),
                    "seconds": round(float(np.mean([r["seconds"] for r in rows if r["method"] == m])), 3)}
                for m in methods}
        summ["before"] = round(float(before.mean()), 4)
        add_to_card("inter_subject_test_pairs", {"command": " ".join(sys.argv), "by_method": summ}, checkpoint)
    return 0


def timing(repeats: int = 3) -> int:
    """Seconds per registration on the demo pair (120 x 120 x 90): CPU time of this process (what one
    free core would take; robust to a loaded machine) and wall time, after one warm-up call."""
    import torch
    from app.engine import io
    torch.set_num_threads(1)
    demo = ROOT / "resources" / "demo"
    fixed = io.read_volume(demo / "fixed_IXI174_T1.nii.gz")
    moving = io.read_volume(demo / "moving_IXI136_T1.nii.gz")
    for key, stages in (("supervised", "affine"), ("unsupervised", "affine"), ("unsupervised", "affine+deformable")):
        reg = paradigms.get(key)
        p = paradigms.make_params(reg.Params, {"stages": stages})
        reg.register(fixed, moving, p, device="cpu")
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(repeats):
            res = reg.register(fixed, moving, p, device="cpu")
        print(f"{key} {stages}: cpu {(time.process_time() - c0) / repeats:.3f} s, wall "
              f"{(time.perf_counter() - w0) / repeats:.3f} s per pair; last timings {res.timings}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="test", choices=("test", "val"))
    ap.add_argument("--per-band", type=int, default=5)
    ap.add_argument("--target", type=int, default=20, help="affine target cases (0: none)")
    ap.add_argument("--methods", default="identity,iterative_rigid,iterative_affine")
    ap.add_argument("--checkpoint", default=None, help="supervised checkpoint (default: the bundled one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "supervised_known.json"))
    ap.add_argument("--card", action="store_true", help="write the summary into the supervised checkpoint's card")
    ap.add_argument("--merge", default="", help="also table the rows of this earlier .jsonl (same cases or pairs, "
                    "other methods, same scoring code)")
    ap.add_argument("--real", type=int, default=0, help="instead: this many real inter-subject test pairs (Dice), "
                    "methods from " + ", ".join(REAL_METHODS))
    ap.add_argument("--timing", action="store_true", help="instead: CPU and wall seconds per pair on the demo pair")
    a = ap.parse_args()
    if a.timing:
        return timing()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.real:
        for m in methods:
            if m not in REAL_METHODS:
                raise SystemExit(f"unknown method {m!r} for --real; known: {', '.join(REAL_METHODS)}")
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        return real_pairs(a.real, methods, a.checkpoint, out, a.card, a.merge)
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    subjects = list(load_split()[a.subjects])
    cases = [("rigid", c) for c in S.make_cases(subjects, a.per_band, seed=a.seed)]
    if a.target:
        cases += [("affine", c) for c in S.target_cases(subjects[::-1], a.target, seed=a.seed + 1)]
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    for set_name, case in cases:
        pair = S.case_pair(case)
        truth = case.matrix(pair.centre)
        pts = S.brain_points(pair.fixed_labels, 4000)
        for m in methods:
            tx, secs = run_method(m, pair, a.checkpoint)
            err = S.mean_point_error(tx, truth, pts)
            row = {"set": set_name, "subject": case.subject, "band": case.band,
                   "band_label": "target +-15deg/+-20mm/10%/0.05" if case.band < 0 else case.label,
                   "index": case.index, "method": m, "error_mm": round(err, 4), "seconds": round(secs, 3),
                   "initial_mm": round(S.mean_point_error(np.eye(4), truth, pts), 3)}
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    if a.merge:
        seen = {(r["set"], r["subject"], r["band"], r["index"]) for r in rows}
        extra = [json.loads(line) for line in Path(a.merge).read_text().splitlines() if line.strip()]
        extra = [r for r in extra if (r["set"], r["subject"], r["band"], r["index"]) in seen and r["method"] not in methods]
        methods = list(dict.fromkeys([*methods, *[r["method"] for r in extra]]))
        rows = rows + extra
    md = table(rows, methods)
    print(md)
    if a.card:
        add_to_card("known_transform_cases", {
            "command": " ".join(sys.argv), "subjects": a.subjects,
            "cases": "rigid cases in bands of rotation angle / translation length about the centre of mass; affine "
                     "target cases +-15 deg per axis, +-20 mm, scale +-10 %, shear 0.05",
            "error": "mean distance (mm) between estimated and true transforms over 4000 brain points; success < 2 mm",
            "by_band": summarise(rows, ("set", "band_label", "method"), "error_mm")}, a.checkpoint)
    out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv), "threads": os.environ.get("OMP_NUM_THREADS"),
                               "table": md}, indent=1))
    out.with_suffix(".md").write_text(f"# Known-transform cases ({a.subjects} subjects)\n\n`{' '.join(sys.argv)}`\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
