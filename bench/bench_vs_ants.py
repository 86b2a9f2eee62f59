#!/usr/bin/env python3
"""RegStation's paradigms (iterative, learned) against ANTsPy SyN on the same IXI test pairs, in one run.

ANTsPy pins numpy<2.4, so it lives in its own venv, never in the app's requirements:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install antspyx SimpleITK scipy nibabel tqdm torch==2.13.0
    .venv-bench/bin/python bench/bench_vs_ants.py --pairs 10 [--learned] [--threads 1]
        [--out bench/results/vs_ants.json]

``--learned`` adds the bundled learned models (``unsupervised``, its diffeomorphic variant,
``weakly``) and ``instance`` to the same run. ``--threads N`` caps ITK and torch threads for every
method alike (use it when another job shares the CPU).

Both methods are measured with the same engine code (`evaluation.transform_metrics`): Dice mean
over labels present in the fixed map, fold fraction of the full transform's Jacobian, seconds for
the registration call alone (file reading excluded). ANTs' forward transforms (affine .mat +
warp field) map fixed points to moving points, like ours; they are read with SimpleITK and composed
(affine first stage, warp second), and the warp of the moving labels is checked against
`ants.apply_transforms` so that the composition order is verified, not assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--threads" in sys.argv:
    _n = sys.argv[sys.argv.index("--threads") + 1]
    for _v in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _n
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(os.cpu_count() or 2))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from app.engine import io  # noqa: E402
from app.engine.evaluation import register_and_measure, transform_metrics  # noqa: E402
from app.engine.spatial import compose, field_to_transform, resample  # noqa: E402
from app.engine.types import Transform, Volume  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "ixi"
# name -> (paradigm key, parameters); the learned ones use their bundled checkpoints
LEARNED = {
    "unsupervised": ("unsupervised", {}),
    "unsupervised_diffeo": ("unsupervised", {"diffeomorphic": "true"}),
    "weakly": ("weakly", {}),
    "instance": ("instance", {}),
}


def test_pairs(n: int) -> list[tuple[str, str]]:
    """The first ``n`` test pairs of the project's split (``resources/splits/ixi_split.json``)."""
    from app.engine.datasets import load_split
    return [tuple(p) for p in load_split()["test_pairs"][:n]]


def paths(subj: str) -> tuple[Path, Path]:
    from app.engine.datasets import ixi_paths
    return ixi_paths(subj, DATA)


def run_ants(fixed_path, moving_path, fixed: Volume, moving_labels, type_of_transform="SyN"):
    import ants
    f = ants.image_read(str(fixed_path))
    m = ants.image_read(str(moving_path))
    t0 = time.perf_counter()
    reg = ants.registration(fixed=f, moving=m, type_of_transform=type_of_transform)
    secs = time.perf_counter() - t0
    stages = []
    for p in reversed(reg["fwdtransforms"]):  # [warp, affine]: affine is the first stage
        if p.endswith(".mat"):
            stages.append(Transform(sitk.ReadTransform(p)))
        else:
            stages.append(field_to_transform(Volume.from_sitk(sitk.ReadImage(p, sitk.sitkVectorFloat64))))
    tx = compose(*stages)
    # verify the composition against ANTs' own resampling of the labels
    ml = ants.image_read(str(moving_path).replace("/t1/", "/seg/").replace("_T1.nii.gz", "_T1_DLMUSE.nii.gz"))
    ants_warped = ants.apply_transforms(f, ml, reg["fwdtransforms"], interpolator="nearestNeighbor").numpy()
    ours = resample(moving_labels, fixed, tx, "nearest").array
    agree = float(np.mean(np.transpose(ants_warped, (2, 1, 0)) == ours))
    return tx, secs, agree


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--param", action="append", default=[], help="iterative parameter NAME=VALUE")
    ap.add_argument("--learned", action="store_true", help="also the bundled learned models and instance")
    ap.add_argument("--threads", type=int, default=0, help="ITK and torch threads for every method (0: default)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_ants.json"))
    a = ap.parse_args()
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    learned = LEARNED if a.learned else {}
    from app.engine.paradigms import parse_param_args
    params = parse_param_args(a.param)
    rows = []
    for fs, ms in test_pairs(a.pairs):
        fp, flp = paths(fs)
        mp, mlp = paths(ms)
        fixed, moving = io.read_volume(fp), io.read_volume(mp)
        fl, ml = io.read_labels(flp, reference=fixed), io.read_labels(mlp)
        row = {"fixed": fs, "moving": ms}
        _, m_aff = register_and_measure("iterative", fixed, moving, {**params, "stages": "rigid+affine"},
                                        fixed_labels=fl, moving_labels=ml, with_hd95=False)
        _, m_it = register_and_measure("iterative", fixed, moving, params, fixed_labels=fl, moving_labels=ml,
                                       with_hd95=False)
        row.update(before_dice=m_it["before"]["dice_mean"], affine_dice=m_aff["dice_mean"], affine_s=m_aff["runtime_s"],
                   iterative_dice=m_it["dice_mean"], iterative_fold=m_it["fold_fraction"], iterative_s=m_it["runtime_s"])
        for name, (key, lp) in learned.items():
            _, m_l = register_and_measure(key, fixed, moving, lp, fixed_labels=fl, moving_labels=ml, with_hd95=False)
            row.update({f"{name}_dice": m_l["dice_mean"], f"{name}_fold": m_l["fold_fraction"],
                        f"{name}_s": m_l["runtime_s"]})
        try:
            tx, secs, agree = run_ants(fp, mp, fixed, ml)
            m_a = transform_metrics(fixed, moving, tx, fixed_labels=fl, moving_labels=ml, with_hd95=False)
            row.update(ants_dice=m_a["dice_mean"], ants_fold=m_a["fold_fraction"], ants_s=secs, ants_label_agreement=agree)
        except ImportError:
            row.update(ants_dice=None, ants_fold=None, ants_s=None)
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    def mean(k):
        v = [r[k] for r in rows if r.get(k) is not None]
        return float(np.mean(v)) if v else float("nan")
    summary = {k: mean(k) for k in rows[0] if k not in ("fixed", "moving")}
    summary["dice_ratio_iterative_over_ants"] = summary["iterative_dice"] / summary["ants_dice"]
    summary["time_ratio_iterative_over_ants"] = summary["iterative_s"] / summary["ants_s"]
    summary["pairs"] = len(rows)
    print("\nmean over", len(rows), "pairs")
    print(f"{'method':<22}{'Dice':>8}{'fold %':>9}{'seconds':>9}")
    print(f"{'before (identity)':<22}{summary['before_dice']:>8.4f}{'':>9}{'':>9}")
    print(f"{'iterative affine':<22}{summary['affine_dice']:>8.4f}{0.0:>9.3f}{summary['affine_s']:>9.1f}")
    print(f"{'iterative (default)':<22}{summary['iterative_dice']:>8.4f}{100 * summary['iterative_fold']:>9.3f}{summary['iterative_s']:>9.1f}")
    print(f"{'ANTsPy SyN':<22}{summary['ants_dice']:>8.4f}{100 * summary['ants_fold']:>9.3f}{summary['ants_s']:>9.1f}")
    for name in learned:
        summary[f"dice_ratio_{name}_over_ants"] = summary[f"{name}_dice"] / summary["ants_dice"]
        summary[f"time_ratio_{name}_over_ants"] = summary[f"{name}_s"] / summary["ants_s"]
        print(f"{name:<22}{summary[name + '_dice']:>8.4f}{100 * summary[name + '_fold']:>9.3f}{summary[name + '_s']:>9.1f}")
    print(f"ratios iterative/ANTs: Dice {summary['dice_ratio_iterative_over_ants']:.3f}, "
          f"time {summary['time_ratio_iterative_over_ants']:.2f}")
    for name in learned:
        print(f"ratios {name}/ANTs: Dice {summary[f'dice_ratio_{name}_over_ants']:.3f}, "
              f"time {summary[f'time_ratio_{name}_over_ants']:.3f}")
    summary["threads"] = a.threads or "default"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
