#!/usr/bin/env python3
"""Known-transform cases (``app.engine.synthetic``): point error and success rate by band of initial
misalignment, every method from the same starts, scored by the same code in one run.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_supervised.py \
        [--subjects test|val] [--per-band 5] [--target 20] [--methods iterative_rigid,iterative_affine,supervised]
        [--checkpoint FILE] [--out bench/results/supervised_known.json]

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="test", choices=("test", "val"))
    ap.add_argument("--per-band", type=int, default=5)
    ap.add_argument("--target", type=int, default=20, help="affine target cases (0: none)")
    ap.add_argument("--methods", default="identity,iterative_rigid,iterative_affine")
    ap.add_argument("--checkpoint", default=None, help="supervised checkpoint (default: the bundled one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "supervised_known.json"))
    a = ap.parse_args()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
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
    md = table(rows, methods)
    print(md)
    out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv), "threads": os.environ.get("OMP_NUM_THREADS"),
                               "table": md}, indent=1))
    out.with_suffix(".md").write_text(f"# Known-transform cases ({a.subjects} subjects)\n\n`{' '.join(sys.argv)}`\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
