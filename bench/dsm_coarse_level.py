"""Where the capture range is lost: one pyramid level of the ``dsm`` paradigm alone, dsm vs MI.

Issue 11's far bands (seed 12, held-out patient19, 75-120 deg, ``bench/results/multimodal_capture_far.md``):
each case is registered by the ``dsm`` paradigm with a single level (``--level``: 4 = 8 mm, 2 = 4 mm of
the 2 mm working grid) for ``--iterations`` Adam steps of ``--lr`` mm, with the learned similarity
and with MI (``similarity=mi``, the same optimiser), and the mean point error after that level is
printed (JSON lines). A level whose error stays large however many steps it gets is stuck in a local
minimum of its similarity (``bench/dsm_stall_profile.py`` shows the barrier); one whose error falls
with more steps was short of steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dsm_coarse_level.py --bands 1 --iterations 60,150,300
    OMP_NUM_THREADS=1 .venv/bin/python bench/dsm_coarse_level.py --bands 1 --iterations 150 --level 2
    OMP_NUM_THREADS=1 .venv/bin/python bench/dsm_coarse_level.py --bands 1 --iterations 150 --sims dsm \\
        --checkpoint /path/to/retrained_dsm.pt

Results: ``bench/results/dsm_coarse_level.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_multimodal import case_images, subject_list  # noqa: E402

from app.engine import paradigms  # noqa: E402
from app.engine.synthetic import make_cases, mean_point_error  # noqa: E402

FAR_BANDS = ((75.0, 60.0), (90.0, 70.0), (105.0, 80.0), (120.0, 90.0))


def far_cases(seed: int = 12, per_band: int = 4):
    """The far-band cases of ``multimodal_capture_far.md`` (held-out patient19)."""
    subjects = [s for s in subject_list() if "patient19" in s]
    return make_cases(subjects, per_band=per_band, bands=FAR_BANDS, seed=seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bands", default="1", help="band indices of FAR_BANDS (0: to 75 deg, 1: 75-90, 2: 90-105, 3: 105-120)")
    ap.add_argument("--iterations", default="150", help="Adam steps of the level, several to compare")
    ap.add_argument("--level", type=int, default=4, help="shrink factor of the 2 mm working grid (4: 8 mm)")
    ap.add_argument("--lr", type=float, default=3.0, help="Adam step (mm), the paradigm's coarse_learning_rate")
    ap.add_argument("--sims", default="dsm,mi")
    ap.add_argument("--checkpoint", default="", help="dsm checkpoint (default: the bundled one)")
    ap.add_argument("--params", default="", help="extra dsm parameters, 'name=value;name=value' (e.g. a full pyramid)")
    args = ap.parse_args(argv)
    bands = [int(b) for b in args.bands.split(",")]
    extra = dict(kv.split("=", 1) for kv in args.params.split(";") if kv.strip())
    reg = paradigms.get("dsm")
    cache: dict = {}
    for case in [c for c in far_cases() if c.band in bands]:
        fixed, moving, truth, pts = case_images(case, cache, 2.0)
        for sim in args.sims.split(","):
            for n in (int(i) for i in args.iterations.split(",")):
                p = paradigms.make_params(reg.Params, {"similarity": sim, "levels": str(args.level),
                                                       "iterations": str(n), "learning_rate": str(args.lr),
                                                       "similarity_map": "false", **extra})
                c0 = time.process_time()
                res = reg.register(fixed, moving, p, checkpoint=(args.checkpoint or None) if sim == "dsm" else None,
                                   device="cpu")
                print(json.dumps({"band": case.band, "idx": case.index, "mod": case.subject.split(":")[2],
                                  "sim": sim, "iters": n, "err": round(mean_point_error(res.transform, truth, pts), 2),
                                  "cpu": round(time.process_time() - c0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
