"""instance after weakly on validation pairs of resources/splits/ixi_split.json (never the test pairs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune_instance_after_weakly.py START N "name:k=v;k=v" ...

Per validation pair START..START+N-1: the bundled ``weakly`` (or the checkpoint in ``$WEAKLY_CKPT``) once,
then :func:`app.engine.paradigms.instance.refine` with each configuration (``name:`` alone = the defaults).
Prints Dice (mean over the fixed map's labels), fold % and CPU seconds of the refinement (one thread) per pair,
then one SUMMARY line per configuration. Results: bench/results/instance_after_weakly_val.md.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from app.engine import datasets as D  # noqa: E402
from app.engine import io, paradigms  # noqa: E402
from app.engine.evaluation import transform_metrics  # noqa: E402
from app.engine.paradigms.instance import refine  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    return name, dict(kv.split("=", 1) for kv in spec.split(";") if kv)


def main() -> int:
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    start, n = int(sys.argv[1]), int(sys.argv[2])
    configs = [parse_config(c) for c in sys.argv[3:]] or [("defaults", {})]
    reg = paradigms.get("weakly")
    ckpt = os.environ.get("WEAKLY_CKPT") or None
    results: dict[str, list] = {name: [] for name, _ in configs}
    for f, m in D.load_split()["val_pairs"][start:start + n]:
        fi, fs = D.ixi_paths(f)
        mi, ms = D.ixi_paths(m)
        fixed, moving = io.read_volume(fi), io.read_volume(mi)
        flab, mlab = io.read_labels(fs, reference=fixed), io.read_labels(ms)
        learned = reg.register(fixed, moving, reg.Params(), checkpoint=ckpt, device="cpu")
        refine(fixed, moving, None, {"levels": "4", "iterations": "2"}, device="cpu")    # first-call costs
        for name, params in configs:
            c0 = time.process_time()
            res = refine(fixed, moving, learned, params or None, device="cpu")
            cpu = time.process_time() - c0
            mt = transform_metrics(fixed, moving, res.transform, fixed_labels=flab, moving_labels=mlab,
                                   with_hd95=False)
            results[name].append((mt["dice_mean"], mt["fold_fraction"], cpu))
            print(f, name, round(mt["dice_mean"], 4), round(100 * mt["fold_fraction"], 3), round(cpu, 1), flush=True)
    for name, rows in results.items():
        a = np.array(rows)
        print("SUMMARY", name, "dice", round(a[:, 0].mean(), 4), "fold%", round(100 * a[:, 1].mean(), 3),
              "cpu", round(a[:, 2].mean(), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
