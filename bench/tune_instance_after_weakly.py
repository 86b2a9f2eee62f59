"""instance after weakly on validation pairs of resources/splits/ixi_split.json (never the test pairs).

    OMP_NUM_THREADS=1 .venv/bin/python bench/tune_instance_after_weakly.py START N "name:k=v;k=v" ...

Per validation pair START..START+N-1: the bundled weakly (or $WEAKLY_CKPT) once, then instance.refine with each
configuration (empty = defaults); Dice over the fixed labels, fold % and CPU seconds of the refinement (1 thread).
"""
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np, torch
from app.engine import datasets as D, io, paradigms
from app.engine.evaluation import transform_metrics
from app.engine.paradigms.instance import refine
torch.set_num_threads(1)
import SimpleITK as sitk; sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
start, n = int(sys.argv[1]), int(sys.argv[2])
configs = [(c.split(":", 1)[0], dict(kv.split("=", 1) for kv in c.split(":", 1)[1].split(";") if kv)) for c in sys.argv[3:]]
ckpt = None
import os
if os.environ.get("WEAKLY_CKPT"): ckpt = os.environ["WEAKLY_CKPT"]
reg = paradigms.get("weakly")
pairs = D.load_split()["val_pairs"][start:start + n]
res = {c[0]: [] for c in configs}
for f, m in pairs:
    fi, fs = D.ixi_paths(f); mi, ms = D.ixi_paths(m)
    fixed, moving = io.read_volume(fi), io.read_volume(mi)
    flab, mlab = io.read_labels(fs, reference=fixed), io.read_labels(ms)
    w = reg.register(fixed, moving, reg.Params(), checkpoint=ckpt, device="cpu")
    refine(fixed, moving, None, {"levels": "4", "iterations": "2"}, device="cpu")
    for name, p in configs:
        c0 = time.process_time()
        r = refine(fixed, moving, w, p or None, device="cpu")
        cpu = time.process_time() - c0
        mt = transform_metrics(fixed, moving, r.transform, fixed_labels=flab, moving_labels=mlab, with_hd95=False)
        res[name].append((mt["dice_mean"], mt["fold_fraction"], cpu))
        print(f, name, round(mt["dice_mean"], 4), round(100 * mt["fold_fraction"], 3), round(cpu, 1), flush=True)
for name, v in res.items():
    a = np.array(v)
    print("SUMMARY", name, "dice", a[:, 0].mean().round(4), "fold%", (100 * a[:, 1].mean()).round(3), "cpu", a[:, 2].mean().round(1))
