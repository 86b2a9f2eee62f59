"""CPU seconds per stage (and per rigid start) of the ``iterative`` defaults on cases of
``bench_multimodal.py`` (same case list: ``--per-band 4 --bands 10:10,20:20 --seed 11``).

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 PYTHONPATH=. .venv/bin/python \
        bench/profile_multimodal_stages.py --match FLAIR

Every ``ImageRegistrationMethod.Execute`` / ``MetricEvaluate`` call is timed with ``time.process_time``
(one thread) and attributed to the engine function that made it.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_multimodal as bm  # noqa: E402
from app.engine import paradigms  # noqa: E402
from app.engine.synthetic import make_cases, mean_point_error  # noqa: E402

CALLS: list[tuple[str, str, float, int]] = []


def _caller() -> str:
    # the paradigm's modules: iterative.py and its rooms iterative_*.py
    names = [fr.name for fr in traceback.extract_stack()[:-2]
             if Path(fr.filename).parent.name == "paradigms" and Path(fr.filename).name.startswith("iterative")]
    return "/".join(n for n in names if n not in ("register", "_execute")) or "?"


def _wrap(name):
    orig = getattr(sitk.ImageRegistrationMethod, name)

    def timed(self, *a, **k):
        c0 = time.process_time()
        try:
            return orig(self, *a, **k)
        finally:
            its = self.GetOptimizerIteration() if name == "Execute" else 0
            CALLS.append((_caller(), name, time.process_time() - c0, its))
    setattr(sitk.ImageRegistrationMethod, name, timed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--match", default="FLAIR")
    ap.add_argument("--params", default="", help="key=value,... overrides of the iterative defaults")
    args = ap.parse_args(argv)
    _wrap("Execute")
    _wrap("MetricEvaluate")
    cases = make_cases(bm.subject_list(), per_band=4, bands=((10.0, 10.0), (20.0, 20.0)), seed=11)
    cache: dict = {}
    reg = paradigms.get("iterative")
    over = dict(kv.split("=") for kv in args.params.split(",") if kv)
    for case in cases:
        if args.match.lower() not in case.subject.lower():
            continue
        fixed, moving, truth, points = bm.case_images(case, cache, 2.0)
        CALLS.clear()
        p = paradigms.make_params(reg.Params, dict(over))
        c0 = time.process_time()
        res = reg.register(fixed, moving, p)
        total = time.process_time() - c0
        err = mean_point_error(res.transform, truth, points)
        ch = res.params["chosen"]
        print(f"== {case.label} {case.subject}: {err:.2f} mm, {total:.1f} CPU s, fixed {fixed.shape} moving "
              f"{moving.shape}; guards {[(g['stage'], g['kept'], round(g.get('gain', 0), 4)) for g in ch['guards']]}")
        agg = defaultdict(lambda: [0, 0.0, 0])
        for fn, kind, sec, its in CALLS:
            a = agg[(fn, kind)]
            a[0] += 1
            a[1] += sec
            a[2] += its
        for (fn, kind), (n, sec, its) in agg.items():
            print(f"   {fn:<32} {kind:<15} calls {n:3d}  CPU {sec:6.2f} s  last-level iterations {its}")
        starts = [round(sec, 2) for fn, kind, sec, _ in CALLS if fn.endswith("_rigid_search")]
        its = defaultdict(int)
        for h in res.history:
            its[(h["stage"], h["level"])] += 1
        print(f"   iterations per (stage, level): {dict(its)}")
        print(f"   per start: {starts}")
        print(f"   rest (python, resample, detect): {total - sum(c[2] for c in CALLS):.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
