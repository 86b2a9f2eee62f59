"""Is a stalled ``dsm`` result a local minimum? The loss along the straight path to the truth.

Registers far-band cases (``bench/dsm_coarse_level.py``'s cases) with the 8 mm level alone (150 Adam
steps of 3 mm), then evaluates dsm (the same 96 random patch centres at every pose, two seeds) and MI
through the optimiser's own pipeline (:func:`app.engine.optimise.similarity_profile`) at 11 poses
from the result to the truth (rotation by slerp about the fixed image's centre of mass, the image of
that centre moved linearly). A profile that rises before it falls is a barrier: no step size or step
count of a local optimiser crosses it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/dsm_stall_profile.py --cases 1:1,1:2

Results: ``bench/results/dsm_coarse_level.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_multimodal import case_images  # noqa: E402
from dsm_coarse_level import far_cases  # noqa: E402

from app.engine import paradigms  # noqa: E402
from app.engine.datasets import center_of_mass  # noqa: E402
from app.engine.optimise import similarity_profile  # noqa: E402
from app.engine.paradigms._learned import load_model  # noqa: E402
from app.engine.synthetic import mean_point_error, transform_to_matrix  # noqa: E402
from app.engine.training.dsm import to_isotropic  # noqa: E402


def path_matrices(start: np.ndarray, end: np.ndarray, centre, n: int = 11) -> list[np.ndarray]:
    """``n`` 4x4 maps from ``start`` to ``end``: rotation by slerp, the image of ``centre`` linearly."""
    c = np.asarray(centre, float)
    rots = Rotation.from_matrix(np.stack([start[:3, :3], end[:3, :3]]))
    p0, p1 = start[:3, :3] @ c + start[:3, 3], end[:3, :3] @ c + end[:3, 3]
    out = []
    for a in np.linspace(0.0, 1.0, n):
        r = Slerp([0, 1], rots)(a).as_matrix()
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = r, (1 - a) * p0 + a * p1 - r @ c
        out.append(m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="1:1,1:2", help="band:index pairs of the far cases")
    ap.add_argument("--checkpoint", default="")
    args = ap.parse_args(argv)
    want = {tuple(int(x) for x in s.split(":")) for s in args.cases.split(",")}
    ckpt = args.checkpoint or None
    net = load_model("dsm", ckpt, kinds=("dsm",))["model"]
    reg = paradigms.get("dsm")
    cache: dict = {}
    for case in [c for c in far_cases() if (c.band, c.index) in want]:
        fixed, moving, truth, pts = case_images(case, cache, 2.0)
        fw = to_isotropic(fixed, 2.0)
        p = paradigms.make_params(reg.Params, {"levels": "4", "iterations": "150", "learning_rate": "3",
                                               "similarity_map": "false"})
        res = reg.register(fixed, moving, p, checkpoint=ckpt, device="cpu")
        s, t = transform_to_matrix(res.transform), transform_to_matrix(truth)
        mats = path_matrices(s, t, center_of_mass(fixed))
        left = Rotation.from_matrix(s[:3, :3]).inv() * Rotation.from_matrix(t[:3, :3])
        out = {"band": case.band, "idx": case.index, "mod": case.subject.split(":")[2],
               "err": round(mean_point_error(res.transform, truth, pts), 1),
               "angle_left_deg": round(float(np.degrees(left.magnitude())), 1)}
        for seed in (0, 1):
            out[f"dsm_seed{seed}"] = [round(float(v), 3) for v in similarity_profile(
                fw, moving, mats, similarity="dsm", sim_options={"net": net, "patches": 96, "seed": seed}, level=4)]
        out["mi"] = [round(float(v), 3) for v in similarity_profile(fw, moving, mats, similarity="mi", level=4)]
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
