#!/usr/bin/env python3
"""`instance` (one-shot instance optimisation) on the first IXI test pairs.

    .venv/bin/python bench/bench_instance.py --pairs 10 [--config "smoothness=2;levels=4,2" ...]
        [--baseline] [--threads 1] [--out bench/results/instance.json]

Per pair: Dice (mean over the non-zero labels present in the fixed map; an absent label scores 0)
before (identity in physical space), after the rigid+affine prealignment (iterative paradigm), and
after instance optimisation on top of it (``refine``); fold fraction (Jacobian determinant <= 0 of
the full transform on the fixed grid); seconds for prealignment and for the refinement. The
prealignment is computed once per pair and shared by every ``--config`` (each config = overrides
of InstanceParams). ``--baseline`` also runs the iterative paradigm with its defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from app.engine import io, paradigms  # noqa: E402
from app.engine.paradigms import make_params  # noqa: E402
from app.engine.paradigms.instance import InstanceParams, refine  # noqa: E402
from app.engine.spatial import resample, transform_to_field  # noqa: E402
from app.engine.types import Transform  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ixi"


def test_pairs(n: int) -> list[tuple[str, str]]:
    """The first ``n`` test pairs of the project's split (``resources/splits/ixi_split.json``)."""
    from app.engine.datasets import load_split
    return [tuple(p) for p in load_split()["test_pairs"][:n]]


def dice_mean(fixed_lab: np.ndarray, warped_lab: np.ndarray) -> float:
    labels = np.unique(fixed_lab)
    labels = labels[labels != 0]
    out = []
    for k in labels:
        a, b = fixed_lab == k, warped_lab == k
        out.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(out))


def fold_fraction(field) -> float:
    """Fraction of voxels with det(I + dU/dX) <= 0 (central differences, physical units)."""
    try:
        from app.engine import metrics as M
        det = M.jacobian_determinant(field.array, field.spacing, field.direction)
    except ImportError:
        u = field.array.astype(np.float64)                                  # (z, y, x, 3 xyz)
        g = np.stack(np.gradient(u, axis=(2, 1, 0)), -1)                    # d u_c / d index (x, y, z)
        m_inv = np.linalg.inv(field.direction @ np.diag(field.spacing))     # world -> index
        jac = np.eye(3) + g @ m_inv
        det = np.linalg.det(jac)
    return float(np.mean(det <= 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--config", action="append", default=None, help="k=v;k=v overrides of InstanceParams")
    ap.add_argument("--baseline", action="store_true", help="also run the iterative paradigm (defaults)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default). On a CPU shared with other busy "
                         "processes, 1 thread avoids OpenMP oversubscription (measured 10x faster steps)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.threads > 0:
        import torch
        torch.set_num_threads(a.threads)
    configs = a.config or [""]
    rows = []
    for fi, mi in test_pairs(a.pairs):
        fixed = io.read_volume(DATA / "t1" / f"{fi}_T1.nii.gz")
        moving = io.read_volume(DATA / "t1" / f"{mi}_T1.nii.gz")
        fl = io.read_labels(DATA / "seg" / f"{fi}_T1_DLMUSE.nii.gz", fixed)
        ml = io.read_labels(DATA / "seg" / f"{mi}_T1_DLMUSE.nii.gz", moving)
        row = {"fixed": fi, "moving": mi,
               "dice_before": dice_mean(fl.array, resample(ml, fixed, Transform.identity()).array)}
        it = paradigms.get("iterative")
        t0 = time.perf_counter()
        aff = it.register(fixed, moving, make_params(it.Params, {"stages": "rigid+affine"}))
        row["affine_s"] = time.perf_counter() - t0
        row["dice_affine"] = dice_mean(fl.array, resample(ml, fixed, aff.transform).array)
        for cfg in configs:
            over = dict(kv.split("=", 1) for kv in cfg.split(";") if kv)
            p = make_params(InstanceParams, over)
            t0, c0 = time.perf_counter(), time.process_time()
            r = refine(fixed, moving, aff, p, moving_labels=ml, device=a.device)
            sec, cpu = time.perf_counter() - t0, time.process_time() - c0
            row[cfg or "default"] = {"dice": dice_mean(fl.array, r.warped_labels.array),
                                     "fold": fold_fraction(r.field), "refine_s": sec, "refine_cpu_s": cpu,
                                     "pair_s": sec + row["affine_s"], "device": r.device}
        if a.baseline:
            t0 = time.perf_counter()
            b = it.register(fixed, moving, make_params(it.Params, {}))
            sec = time.perf_counter() - t0
            fld = b.field if b.field is not None else transform_to_field(b.transform, fixed)
            row["iterative"] = {"dice": dice_mean(fl.array, resample(ml, fixed, b.transform).array),
                                "fold": fold_fraction(fld), "pair_s": sec}
        rows.append(row)
        print(json.dumps(row), flush=True)

    def mean(key, sub=None):
        v = [r[key][sub] if sub else r[key] for r in rows]
        return float(np.mean(v)), float(np.std(v))

    print(f"\n{len(rows)} pairs")
    print("before  dice %.4f +- %.4f" % mean("dice_before"))
    print("affine  dice %.4f +- %.4f   %.1f s" % (*mean("dice_affine"), mean("affine_s")[0]))
    for cfg in configs + (["iterative"] if a.baseline else []):
        k = cfg or "default"
        print("%-40s dice %.4f +- %.4f  fold %.5f %%  %.1f s/pair" % (
            k, *mean(k, "dice"), 100 * mean(k, "fold")[0], mean(k, "pair_s")[0]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
