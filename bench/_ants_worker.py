#!/usr/bin/env python3
"""ANTsPy registration of one pair, for ``bench/bench_peers.py`` (runs in ``.venv-bench``: antspyx pins numpy<2.4).

    .venv-bench/bin/python bench/_ants_worker.py FIXED MOVING MOVING_LABELS OUT_DIR [--type SyN]

Registers MOVING onto FIXED with ``ants.registration`` (defaults of ``type_of_transform``), copies its forward
transforms (fixed points -> moving points: ``[warp, affine]``, the affine applied to points last) into
OUT_DIR, writes ANTs' own nearest-neighbour warp of MOVING_LABELS onto FIXED's grid (``ants_labels.nii.gz``,
for the caller's check of how it composed the transforms), and prints one JSON line:
``{"seconds", "cpu_seconds", "fwdtransforms", "warped_labels"}``. Only the ``ants.registration`` call is
timed (file reading excluded); threads follow ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` of the environment.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fixed")
    ap.add_argument("moving")
    ap.add_argument("moving_labels")
    ap.add_argument("out_dir")
    ap.add_argument("--type", default="SyN", help="ants.registration type_of_transform (default SyN)")
    a = ap.parse_args()
    import ants
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    f = ants.image_read(a.fixed)
    m = ants.image_read(a.moving)
    c0, t0 = time.process_time(), time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform=a.type)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    kept = []
    for i, p in enumerate(reg["fwdtransforms"]):
        name = f"fwd{i}_" + Path(p).name
        shutil.copy(p, out / name)
        kept.append(str(out / name))
    ml = ants.image_read(a.moving_labels)
    warped = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="nearestNeighbor")
    ants.image_write(warped, str(out / "ants_labels.nii.gz"))
    print(json.dumps({"seconds": secs, "cpu_seconds": cpu, "fwdtransforms": kept,
                      "warped_labels": str(out / "ants_labels.nii.gz")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
