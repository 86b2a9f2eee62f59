#!/usr/bin/env python3
"""The ``agent`` paradigm against ``iterative`` rigid from the same starts: success rate and final
point error by band of initial misalignment, seconds per registration; the agent as the first stage
of a pipeline (``agent+instance``, ``agent+unsupervised``).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_agent.py \
        [--subjects test|val] [--per-band 5] [--methods identity,iterative_rigid,agent,agent+unsupervised,agent+instance]
        [--pipeline-bands 1] [--checkpoint FILE] [--out bench/results/agent_known.json]

Cases (``app.engine.synthetic``): held-out IXI subjects (full resolution) are the moving images;
the fixed image is the moving one resampled through a known rigid transform drawn about its centre
of mass, in bands of rotation angle (random axis) / translation length (random direction): up to
10 deg / 10 mm, 20 / 20, 30 / 30, 45 / 40 (``synthetic.BANDS``). Every method starts from the same
pair (``iterative`` with its default centre-of-mass initialiser, the agent with its centre-of-mass
start). Error = mean distance (mm) between where the estimated and the true transforms send 4000
brain points (fixed labels > 0); success = error < 2 mm. Seconds = the registration call alone
(reading excluded). For the agent, ``converged`` says whether it ended at the finest step (not the
step cap, and the image similarity rose): a case that did not converge is never counted a success
*of convergence*, but its error is reported as it is.
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
from app.engine.paradigms.agent import agent_converged  # noqa: E402
from app.engine.pipeline import register_pipeline  # noqa: E402

METHODS = {
    "identity": None,
    "iterative_rigid": ("iterative", {"stages": "rigid"}),
    "agent": ("agent", {}),
    "agent+instance": ("agent+instance", {}),
    "agent+unsupervised": ("agent+unsupervised", {}),
    "agent+iterative_rigid": ("agent+iterative", {"2.stages": "rigid"}),
    "iterative_rigid+instance": ("iterative+instance", {"1.stages": "rigid"}),
}


def run_method(name: str, pair: S.KnownPair, checkpoint=None) -> tuple:
    """(transform, seconds, converged or None, actions or None, final working-grid NCC or None)."""
    if METHODS[name] is None:
        return S.matrix_to_transform(np.eye(4)), 0.0, None, None, None
    spec, params = METHODS[name]
    ckpt = {"agent": checkpoint} if checkpoint and "agent" in spec else None
    t0 = time.perf_counter()
    res = register_pipeline(spec, pair.fixed, pair.moving, dict(params), checkpoint=ckpt, device="cpu")
    secs = time.perf_counter() - t0
    steps = [h for h in res.history if h.get("stage") == "agent"]
    ends = [h for h in res.history if h.get("stage") == "agent_end"]
    return (res.transform, secs, agent_converged(res), (len(steps) if "agent" in spec else None),
            (round(float(ends[-1]["ncc_end"]), 4) if ends else None))


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| band | method | n | median mm | mean mm | success < 2 mm | converged | s/pair |",
             "|---|---|---|---|---|---|---|---|"]
    for b, lab in sorted({(r["band"], r["band_label"]) for r in rows}):
        for m in methods:
            rr = [r for r in rows if r["band"] == b and r["method"] == m]
            if not rr:
                continue
            e = np.array([r["error_mm"] for r in rr])
            t = np.array([r["seconds"] for r in rr])
            conv = [r["converged"] for r in rr if r["converged"] is not None]
            c = f"{100 * np.mean(conv):.0f} %" if conv else "-"
            lines.append(f"| {lab} | {m} | {len(e)} | {np.median(e):.2f} | {e.mean():.2f} | "
                         f"{100 * np.mean(e < S.SUCCESS_MM):.0f} % | {c} | {t.mean():.2f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default="test", choices=("test", "val"))
    ap.add_argument("--per-band", type=int, default=5)
    ap.add_argument("--methods", default="identity,iterative_rigid,agent,agent+instance")
    ap.add_argument("--pipeline-bands", type=int, default=2,
                    help="run the pipelines (methods with '+') on the first N bands only (they are slow)")
    ap.add_argument("--checkpoint", default=None, help="agent checkpoint (default: the bundled one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "agent_known.json"))
    a = ap.parse_args()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(METHODS)}")
    subjects = list(load_split()[a.subjects])
    cases = S.make_cases(subjects, a.per_band, seed=a.seed)
    rows = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    jsonl.write_text("")
    warm = any("agent" in m for m in methods)
    for case in cases:
        pair = S.case_pair(case)
        if warm:     # load the model (and torch) once, untimed: seconds are per registration
            run_method("agent", pair, a.checkpoint)
            warm = False
        truth = case.matrix(pair.centre)
        pts = S.brain_points(pair.fixed_labels, 4000)
        initial = S.mean_point_error(np.eye(4), truth, pts)
        for m in methods:
            if "+" in m and case.band >= a.pipeline_bands:
                continue
            try:
                tx, secs, conv, n_act, ncc_end = run_method(m, pair, a.checkpoint)
            except (TypeError, ValueError) as e:      # e.g. a stage that does not take initial= yet
                print(f"{m}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                continue
            err = S.mean_point_error(tx, truth, pts)
            row = {"subject": case.subject, "band": case.band, "band_label": case.label, "index": case.index,
                   "method": m, "error_mm": round(err, 4), "seconds": round(secs, 3), "converged": conv,
                   "actions": n_act, "ncc_end": ncc_end, "initial_mm": round(initial, 3)}
            rows.append(row)
            with jsonl.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    md = table(rows, methods)
    print(md)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out.write_text(json.dumps({"rows": rows, "command": " ".join(sys.argv), "threads": os.environ.get("OMP_NUM_THREADS"),
                               "load_average_at_end": load, "table": md}, indent=1))
    out.with_suffix(".md").write_text(f"# Agent vs iterative rigid, known transforms ({a.subjects} subjects)\n\n"
                                      f"`{' '.join(sys.argv)}` (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
                                      f"load average {load})\n\n{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
