"""Size of a 7-run session: ITK .h5 per run (before) vs the compact .npz (after), on real runs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/session_size.py

Runs the bundled unsupervised model and an iterative (rigid+affine+demons) registration on the
demo pair, writes 7 runs (alternating) both ways to /tmp and prints the sizes and the largest point
error of the compact files (mm).
"""
import os, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from app.gui import demo_pair
from app.engine import io
from app.engine.evaluation import register_and_measure
from app.viewer.transform_store import write_transform_compact, read_transform_compact
import numpy as np
d = demo_pair()
f, m = io.read_volume(d["fixed"]), io.read_volume(d["moving"])
runs = []
for key, params in (("unsupervised", None), ("iterative", {"stages": "rigid+affine+deformable", "deformable": "diffeomorphic_demons", "deformable_levels": "4,2", "deformable_iterations": 20, "levels": "4,2", "linear_iterations": 40})):
    t0 = time.time()
    res, _ = register_and_measure(key, f, m, params)
    print(key, res.transform.kind, f"{time.time()-t0:.1f}s", flush=True)
    runs.append(res)
tot_h5 = tot_npz = 0
for i in range(7):
    r = runs[i % len(runs)]
    io.write_transform(r.transform, f"/tmp/ss_run{i}.h5")
    write_transform_compact(r.transform, f"/tmp/ss_run{i}.npz")
    tot_h5 += os.path.getsize(f"/tmp/ss_run{i}.h5"); tot_npz += os.path.getsize(f"/tmp/ss_run{i}.npz")
    back = read_transform_compact(f"/tmp/ss_run{i}.npz")
    pts = f.index_to_physical(np.random.default_rng(i).integers(0, 80, (500, 3)))
    print(i, r.paradigm, os.path.getsize(f"/tmp/ss_run{i}.h5")/1e6, os.path.getsize(f"/tmp/ss_run{i}.npz")/1e6,
          "max err mm", np.abs(back.transform_points(pts) - r.transform.transform_points(pts)).max(), flush=True)
print(f"7 runs: h5 {tot_h5/1e6:.1f} MB, npz {tot_npz/1e6:.1f} MB")
