"""Hard poses for the ``dsm`` trainer: where the coarse rigid search of the current network stops short.

Random poses on a straight path to the truth are ranked right by the bundled network (its validation
``pose_rank`` is ~0.96); the optimiser fails elsewhere: at poses it *reaches*, where the learned
landscape has a local minimum (``bench/results/dsm_coarse_level.md``: a 87-degree T1POST case stops 37
mm away behind a barrier). This module finds such poses on the *training* subjects: a known random
rigid transform (``bands``: degrees and mm, about the centre of mass) makes the fixed image from one
modality (:func:`app.engine.synthetic.make_pair`), another modality is the moving image, and the
coarse level of the ``dsm`` paradigm runs as the registrar runs it (8 mm = shrink 4 of the 2 mm
working grid, ``iterations`` Adam steps of ``lr`` mm, ``patches`` random patches per step, centre of
mass start). Where it ends more than ``threshold_mm`` (mean point error over the brain) from the
truth, the case is written as a record the trainer's ``pose_hard`` reads (physical 4x4 matrices,
fixed -> moving points):

    {"set": subject folder or IXI name, "fixed": image key, "moving": image key, "lut_seed": int or
     null (IXI: the moving image is random_lut(seed) of the skull-stripped T1), "frame": truth,
     "pose": where the search stopped, "err_mm", "deg"}

The trainer then ranks, on the same fixed patches, poses nearer the truth on the path from the
stopping pose above it (:class:`app.engine.training.dsm.DsmTrainer`, ``pose_hard_fraction``).

    OMP_NUM_THREADS=1 .venv/bin/python -m app.engine.training.dsm_poses --out /tmp/hard.json \\
        --starts 6 --ixi 8 --seed 0 [--checkpoint resources/checkpoints/dsm.pt] [--shard K/N]

Subjects are training subjects only (the held-out ``ms_cross_sectional_patient19`` is refused).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MULTIMODAL = (("ms_cross_sectional_patient07", "T1", ("T2", "FLAIR", "T1POST")),
              ("brats_tcga_du_7294", "t1", ("t2", "flair", "t1c")))
HELD_OUT = "ms_cross_sectional_patient19"


def _volumes(spec: dict, root: Path, ixi_root: Path, spacing: float, cache: dict):
    """(fixed-modality volume, moving volume) at ``spacing`` mm for a record's ``set`` / ``fixed`` /
    ``moving`` / ``lut_seed``; intensities in [0, 1] (clipped at the 99th percentile)."""
    from .. import io
    from ..datasets import normalize_intensity
    from .dsm import random_lut, skull_stripped, to_isotropic
    key = (spec["set"], spec["fixed"], spec["moving"])
    if spec["lut_seed"] is None:
        def load(m):
            if (spec["set"], m) not in cache:
                v = to_isotropic(io.read_volume(root / spec["set"] / f"{m}.nii.gz"), spacing)
                cache[(spec["set"], m)] = v.with_array(normalize_intensity(v.array, 99.0), v.name)
            return cache[(spec["set"], m)]
        return load(spec["fixed"]), load(spec["moving"])
    if key not in cache:
        v = io.read_volume(ixi_root / "t1" / f"{spec['set']}_T1.nii.gz")
        lab = io.read_labels(ixi_root / "seg" / f"{spec['set']}_T1_DLMUSE.nii.gz")
        s = to_isotropic(skull_stripped(v, lab), spacing)
        cache[key] = s.with_array(normalize_intensity(s.array, 99.0), f"{spec['set']} T1 stripped")
    a = cache[key]
    b = a.with_array(random_lut(np.random.default_rng(int(spec["lut_seed"])))(a.array), f"{a.name} remapped")
    return a, b


def mine(specs: list[dict], checkpoint=None, seed: int = 0, bands=((45.0, 130.0), (20.0, 60.0)),
         iterations: int = 150, lr: float = 3.0, patches: int = 32, threshold_mm: float = 6.0,
         root: str = "/work/shared/data/multimodal", ixi_root: str = "", log=print) -> list[dict]:
    """Run the coarse dsm search on each spec (one start each, drawn from ``seed``) and return a record
    for every run (``err_mm``: where it stopped; ``kept``: more than ``threshold_mm`` from the truth,
    the hard poses the trainer reads)."""
    import SimpleITK as sitk

    from ..datasets import DEFAULT_IXI_ROOT, center_of_mass
    from ..nn import dsm_net  # noqa: F401  (registers the "dsm" similarity)
    from ..optimise import optimise
    from ..paradigms._learned import load_model
    from ..synthetic import band_transform, brain_points, make_pair, mean_point_error, transform_to_matrix
    from ..types import LabelMap, Transform

    if any(s["set"] == HELD_OUT for s in specs):
        raise ValueError(f"{HELD_OUT} is the held-out subject: hard poses are mined on training subjects only")
    ckpt = load_model("dsm", checkpoint, kinds=("dsm",))
    spacing = float(min(ckpt["preprocessing"].get("spacing_mm", [2.0])))
    rng = np.random.default_rng(seed)
    cache: dict = {}
    out = []
    for i, spec in enumerate(specs):
        a, b = _volumes(spec, Path(root), Path(ixi_root or DEFAULT_IXI_ROOT), spacing, cache)
        brain = LabelMap(a.array > 0.05, a.spacing, a.origin, a.direction, "brain")
        m = band_transform(rng, np.asarray(center_of_mass(a)), bands[0], bands[1])
        deg = float(np.degrees(np.arccos(np.clip((np.trace(m[:3, :3]) - 1) / 2, -1, 1))))
        pair = make_pair(a, brain, m)
        pts = brain_points(pair.fixed_labels, 3000, seed=i)
        shift = np.asarray(center_of_mass(b)) - np.asarray(center_of_mass(pair.fixed))
        start = Transform(sitk.TranslationTransform(3, tuple(float(s) for s in shift)), "rigid")
        c0 = time.process_time()
        r = optimise(pair.fixed, b, "rigid", initial=start, similarity="dsm",
                     sim_options={"net": ckpt["model"], "patches": patches, "seed": seed + i, "sampling": "random"},
                     levels=(4,), iterations=(iterations,), optimizer="adam", lr=lr, percentile=99.0, device="cpu")
        err = mean_point_error(r.transform, pair.transform, pts)
        rec = {**spec, "frame": np.asarray(transform_to_matrix(pair.transform)).tolist(),
               "pose": np.asarray(transform_to_matrix(r.transform)).tolist(), "err_mm": round(err, 2),
               "deg": round(deg, 1), "kept": bool(err > threshold_mm)}
        out.append(rec)
        log(json.dumps({k: rec[k] for k in ("set", "fixed", "moving", "lut_seed", "deg", "err_mm", "kept")}
                       | {"cpu_s": round(time.process_time() - c0, 1)}))
    return out


def default_specs(starts: int, ixi: int, seed: int, split: str = "") -> list[dict]:
    """``starts`` specs per (multimodal training subject, moving modality), both directions (T1 fixed,
    or T1 moving), and ``ixi`` skull-stripped IXI training T1 against a random remapping of itself."""
    from ..datasets import load_split
    rng = np.random.default_rng(seed + 1)
    specs = []
    for subject, t1, movs in MULTIMODAL:
        for mov in movs:
            for k in range(starts):
                fixed, moving = (t1, mov) if k % 2 == 0 else (mov, t1)
                specs.append({"set": subject, "fixed": fixed, "moving": moving, "lut_seed": None})
    names = (load_split(split) if split else load_split())["train"][:ixi] if ixi else []
    for name in names:
        specs.append({"set": name, "fixed": "T1_stripped", "moving": "T1_stripped",
                      "lut_seed": int(rng.integers(2**31))})
    return specs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file of the records (all runs; 'kept' marks the hard ones)")
    ap.add_argument("--checkpoint", default="", help="dsm checkpoint (default: the bundled one)")
    ap.add_argument("--starts", type=int, default=4, help="starts per (multimodal subject, moving modality)")
    ap.add_argument("--ixi", type=int, default=8, help="skull-stripped IXI training subjects (one start each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard", default="0/1", help="K/N: run every N-th spec from the K-th (processes side by side)")
    ap.add_argument("--threshold", type=float, default=6.0, help="mean point error (mm) above which a stop is hard "
                    "(the finer levels recover a few mm; stop 20 used 6)")
    args = ap.parse_args(argv)
    k, n = (int(v) for v in args.shard.split("/"))
    specs = default_specs(args.starts, args.ixi, args.seed)
    rng_specs = [(i, s) for i, s in enumerate(specs) if i % n == k]
    recs = []
    for i, s in rng_specs:      # one start per spec, drawn from the spec's own seed (shards give the same cases)
        recs += mine([s], args.checkpoint or None, seed=args.seed * 1000 + i, threshold_mm=args.threshold)
    Path(args.out).write_text(json.dumps(recs, indent=1))
    kept = sum(r["kept"] for r in recs)
    print(f"{kept}/{len(recs)} searches stopped more than {args.threshold:g} mm from the truth -> {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
