"""Calibrate the stage check of learned results (:mod:`app.engine.stagecheck`) on IXI test pairs.

For every pair of ``resources/splits/ixi_test20.csv`` and each learned paradigm (bundled
checkpoints), the similarity the check measures at every stage (start, prealigned, affine,
deformable) next to the label Dice of the same stage's transform (148 DLMUSE labels), and how
much a 1 mm / 2 mm translation of the final result costs in the same similarity. The margin must
be far below the stage gains on these pairs (where the models help: no false alarm) and of the
order of a 1 mm error. Also the cost of the whole check (wall and CPU seconds).

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 \\
        .venv/bin/python bench/bench_stagecheck.py --out bench/results/stagecheck_ixi.json

``--nmi``: the multimodal metric's scale instead: normalised MI of aligned multimodal pairs
(``/work/shared/data/multimodal``: T1 with T2 / FLAIR of the same subject, aligned voxel for voxel,
so identity is the answer) and what a 1 mm / 2 mm shift costs it::

    .venv/bin/python bench/bench_stagecheck.py --nmi --out bench/results/stagecheck_nmi.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine import io, stagecheck  # noqa: E402
from app.engine.metrics import dice_per_label, summarize_dice  # noqa: E402
from app.engine.paradigms import get  # noqa: E402
from app.engine.spatial import resample  # noqa: E402
from app.engine.types import Transform  # noqa: E402


def shifted(t: Transform, mm: float, axis: int) -> Transform:
    off = [0.0, 0.0, 0.0]
    off[axis] = mm
    return Transform(sitk.TranslationTransform(3, off), "rigid").then(t)


def nmi_scale(out_path: str) -> int:
    data = Path("/work/shared/data/multimodal")
    cases = [(data / s / "T1.nii.gz", data / s / m) for s in ("ms_cross_sectional_patient07", "ms_cross_sectional_patient19")
             for m in ("T2.nii.gz", "FLAIR.nii.gz")]
    cases += [(data / "brats_tcga_du_7294" / "t1.nii.gz", data / "brats_tcga_du_7294" / m) for m in ("t2.nii.gz", "flair.nii.gz")]
    out = []
    for f, m in cases:
        fixed, moving = io.read_volume(f), io.read_volume(m)
        rec = {"fixed": str(f), "moving": str(m)}
        for mm in (1.0, 2.0):
            cand = [("aligned", None)] + [(f"shift{ax}", shifted(Transform.identity(), mm, ax)) for ax in range(3)]
            c = stagecheck.check_stages(fixed, moving, cand, multimodal=True)
            rec["nmi_aligned"] = c.values["aligned"]
            rec[f"cost_{mm:g}mm"] = float(np.mean([c.values["aligned"] - c.values[f"shift{ax}"] for ax in range(3)]))
            rec[f"overlap_cost_{mm:g}mm"] = float(np.mean([c.overlap["aligned"] - c.overlap[f"shift{ax}"]
                                                          for ax in range(3)]))
        out.append(rec)
        print(json.dumps(rec), flush=True)
    Path(out_path).write_text(json.dumps(out, indent=1))
    for mm in ("1mm", "2mm"):
        c = [r[f"cost_{mm}"] for r in out]
        o = [r[f"overlap_cost_{mm}"] for r in out]
        print(f"a {mm} shift of an aligned multimodal pair costs NMI {np.median(c):.4f} (min {min(c):.4f}, max {max(c):.4f}), "
              f"brain overlap {np.median(o):.4f} (min {min(o):.4f}, max {max(o):.4f})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nmi", action="store_true", help="measure the multimodal metric's scale instead")
    ap.add_argument("--pairs", default=str(ROOT / "resources/splits/ixi_test20.csv"))
    ap.add_argument("--paradigms", default="weakly,unsupervised")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench/results/stagecheck_ixi.json"))
    a = ap.parse_args()
    if a.nmi:
        return nmi_scale(a.out)
    base = Path(a.pairs).parent
    rows = list(csv.DictReader(open(a.pairs)))[: a.limit]
    seen = {}
    orig = stagecheck.guard_learned

    def spy(fixed, moving, stages, *args, **kw):
        seen["stages"] = list(stages)
        t0, c0 = time.perf_counter(), time.process_time()
        out = orig(fixed, moving, stages, *args, **kw)
        seen["wall"], seen["cpu"] = time.perf_counter() - t0, time.process_time() - c0
        return out
    stagecheck.guard_learned = spy
    out = []
    for i, row in enumerate(rows):
        fixed = io.read_volume(base / row["fixed"])
        moving = io.read_volume(base / row["moving"])
        fl = io.read_labels(base / row["fixed_labels"], reference=fixed)
        ml = io.read_labels(base / row["moving_labels"])
        for key in a.paradigms.split(","):
            res = get(key).register(fixed, moving, device="cpu")
            sc = res.checks["stage_check"]
            dice = {}
            for name, t in seen["stages"]:
                wl = resample(ml, fixed, t, "nearest")
                dice[name] = float(summarize_dice(dice_per_label(fl.array, wl.array)))
            final = seen["stages"][-1][1]
            shifts = {}
            for mm in (1.0, 2.0):
                cand = [("final", final)] + [(f"shift{ax}", shifted(final, mm, ax)) for ax in range(3)]
                c = stagecheck.check_stages(fixed, moving, cand, multimodal=False)
                shifts[f"{mm:g}mm"] = float(np.mean([c.values["final"] - c.values[f"shift{ax}"] for ax in range(3)]))
                shifts[f"overlap_{mm:g}mm"] = float(np.mean([c.overlap["final"] - c.overlap[f"shift{ax}"]
                                                             for ax in range(3)]))
            rec = {"pair": i, "paradigm": key, "values": sc["values"], "overlap": sc["overlap"], "kept": sc["kept"],
                   "worse": sc["worse"],
                   "dice": dice, "shift_cost": shifts, "warnings": res.warnings,
                   "check_wall_s": seen["wall"], "check_cpu_s": seen["cpu"]}
            out.append(rec)
            print(json.dumps(rec), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    # summary
    for key in a.paradigms.split(","):
        rs = [r for r in out if r["paradigm"] == key]
        names = list(rs[0]["values"])
        print(f"\n{key}: {len(rs)} pairs; kept {sorted({r['kept'] for r in rs})}; warnings in {sum(bool(r['warnings']) for r in rs)}")
        for j in range(1, len(names)):
            dv = [r["values"][names[j]] - max(r["values"][n] for n in names[:j]) for r in rs]
            do = [r["overlap"][names[j]] - max(r["overlap"][n] for n in names[:j]) for r in rs]
            dd = [r["dice"][names[j]] - r["dice"][names[j - 1]] for r in rs]
            print(f"  {names[j]:>11s} vs best before: d-sim min {min(dv):+.4f} median {np.median(dv):+.4f}; "
                  f"d-overlap min {min(do):+.4f} median {np.median(do):+.4f}; "
                  f"d-Dice vs previous min {min(dd):+.4f} median {np.median(dd):+.4f}")
        for mm in ("1mm", "2mm"):
            c = [r["shift_cost"][mm] for r in rs]
            o = [r["shift_cost"][f"overlap_{mm}"] for r in rs]
            print(f"  a {mm} shift of the result costs {np.median(c):.4f} (min {min(c):.4f}, max {max(c):.4f}) similarity, "
                  f"{np.median(o):.4f} (min {min(o):.4f}, max {max(o):.4f}) overlap")
        w = [r["check_wall_s"] for r in rs]
        cpu = [r["check_cpu_s"] for r in rs]
        print(f"  check: wall median {np.median(w):.3f} s (max {max(w):.3f}), CPU median {np.median(cpu):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
