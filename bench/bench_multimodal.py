"""Multimodal pairs with exact answers: ``iterative`` defaults before vs after the multimodal handling.

Cases: an aligned multimodal pair (``/work/shared/data/multimodal``: T1 with T2 / FLAIR / T1POST of two
MS patients, t1 with t2 / flair / t1c of one glioma patient) resampled to 2 mm; the **fixed** image is
T1 resampled through a known random rigid transform ``T`` (bands of initial misalignment: rotation
angle about a random axis, translation length), the **moving** image is the other modality,
untouched. ``T`` maps fixed points to moving points exactly (``fixed(x) = T1(T(x))`` and T1, T2 are
aligned voxel for voxel), so the error of an estimate ``E`` is ``mean |E(x) - T(x)|`` over the
fixed image's brain points (T1 > 0, skull-stripped data). Success: error < 2 mm.

Runs of record (issue 11, ``bench/results/multimodal.md`` and ``multimodal_wide.md``)::

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 .venv/bin/python bench/bench_multimodal.py \
        --per-band 4 --spacing 2 --bands 10:10,20:20 --methods after --out bench/results/multimodal.md
    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 .venv/bin/python bench/bench_multimodal.py \
        --per-band 3 --spacing 2 --subjects patient19 --bands 30:30,45:40 --methods dsm,mi_adam,after \
        --out bench/results/multimodal_wide.md

Every method sees the same cases (``make_cases`` with a fixed seed) in one run::

    OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 \\
        .venv/bin/python bench/bench_multimodal.py --per-band 6 --out bench/results/multimodal.md

Methods (``--methods``): ``before`` = the ``iterative`` defaults of commit beb4f31 (histogram
matching, Otsu fixed mask, diffeomorphic demons; reproduced with explicit parameters:
``modality=same``, ``linear_guard=false``, ``deformable=diffeomorphic_demons``), ``after`` = the
current defaults (``modality=auto``); ``iterative_rigid`` = the current defaults, rigid stage only;
``dsm`` = the learned similarity (bundled checkpoint or ``--checkpoint``) maximised by the torch
optimiser (Adam, rigid, the paradigm's pyramid: levels 4,2,1 of a 2 mm grid since issue 11's capture-range
work, 2,1 before); ``mi_adam`` = the same optimiser, grid and
stages with mutual information instead (``dsm --param similarity=mi``). ``dsm_bundled`` = ``dsm`` with the
bundled checkpoint whatever ``--checkpoint`` names (old and new checkpoints in one run);
``dsm_lattice`` = ``dsm`` with its patch centres on a fixed lattice (``patch_sampling=lattice``).
``--dsm-params`` gives the dsm-paradigm methods the same extra parameters (e.g. a coarser pyramid).
``dsm`` was trained on patient07 and the glioma subject: compare it on ``--subjects patient19`` only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import io  # noqa: E402
from app.engine.datasets import center_of_mass  # noqa: E402
from app.engine.types import Volume  # noqa: E402

DATA = Path("/work/shared/data/multimodal")
# (subject, fixed modality, moving modalities)
SUBJECTS = (("ms_cross_sectional_patient07", "T1", ("T2", "FLAIR", "T1POST")),
            ("ms_cross_sectional_patient19", "T1", ("T2", "FLAIR", "T1POST")),
            ("brats_tcga_du_7294", "t1", ("t2", "flair", "t1c")))
BANDS3 = ((10.0, 10.0), (20.0, 20.0), (30.0, 30.0))

from app.engine.synthetic import brain_points, make_cases, make_pair, mean_point_error  # noqa: E402


def load_resampled(path: Path, spacing_mm: float) -> Volume:
    """Read an image and resample it to an isotropic grid (same origin and direction), linear."""
    v = io.read_volume(path)
    if spacing_mm <= 0:
        return v
    img = v.to_sitk(sitk.sitkFloat32)
    size = [max(4, int(round(s * p / spacing_mm))) for s, p in zip(img.GetSize(), img.GetSpacing())]
    sm = sitk.SmoothingRecursiveGaussian(img, [0.5 * spacing_mm] * 3)
    out = sitk.Resample(sm, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), [spacing_mm] * 3,
                        img.GetDirection(), 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, v.name)


def subject_list() -> list[str]:
    return [f"{s}:{fix}:{mov}" for s, fix, movs in SUBJECTS for mov in movs]


def case_images(case, cache: dict, spacing_mm: float):
    """(fixed, moving, truth transform, brain points) of one case."""
    subj, fix_mod, mov_mod = case.subject.split(":")
    key = (subj, fix_mod)
    if key not in cache:
        cache[key] = load_resampled(DATA / subj / f"{fix_mod}.nii.gz", spacing_mm)
    t1 = cache[key]
    mkey = (subj, mov_mod)
    if mkey not in cache:
        cache[mkey] = load_resampled(DATA / subj / f"{mov_mod}.nii.gz", spacing_mm)
    moving = cache[mkey]
    from app.engine.types import LabelMap
    brain = LabelMap(t1.array > 0.05 * float(t1.array.max()), t1.spacing, t1.origin, t1.direction, "brain")
    pair = make_pair(t1, brain, case.matrix(center_of_mass(t1)))
    points = brain_points(pair.fixed_labels, 4000, seed=case.index)
    return pair.fixed, moving, pair.transform, points


METHODS = {
    "before": ("iterative", {"modality": "same", "linear_guard": False, "deformable": "diffeomorphic_demons"}),
    "after": ("iterative", {}),
    "iterative_rigid": ("iterative", {"stages": "rigid"}),
    "dsm": ("dsm", {"similarity_map": False}),   # the registration alone (the map is timed apart)
    "mi_adam": ("dsm", {"similarity": "mi"}),
    "dsm_bundled": ("dsm", {"similarity_map": False}),   # the bundled checkpoint whatever --checkpoint says
    "dsm_lattice": ("dsm", {"similarity_map": False, "patch_sampling": "lattice"}),
    # a longer coarse level (150 Adam steps at 8 mm, fewer patches there) and 60 at 4 mm, for both similarities
    "dsm_long": ("dsm", {"similarity_map": False, "iterations": "150,60,30", "coarse_patches": 32}),
    "mi_long": ("dsm", {"similarity": "mi", "iterations": "150,60,30"}),
}


def run_method(name: str, fixed: Volume, moving: Volume, checkpoint=None, dsm_params: dict | None = None):
    from app.engine import paradigms
    key, overrides = METHODS[name]
    reg = paradigms.get(key)
    p = paradigms.make_params(reg.Params, {**dict(overrides), **(dsm_params or {} if key == "dsm" else {})})
    kw = {"checkpoint": checkpoint} if key == "dsm" and checkpoint and name != "dsm_bundled" else {}
    if key == "dsm":
        kw["device"] = "cpu"
    t0, c0 = time.perf_counter(), time.process_time()
    res = reg.register(fixed, moving, p, **kw)
    return res, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-band", type=int, default=6)
    ap.add_argument("--spacing", type=float, default=2.0, help="isotropic working spacing of the images (mm)")
    ap.add_argument("--methods", default="before,after")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--bands", default="10:10,20:20,30:30", help="upper limits 'deg:mm' of the bands of initial "
                    "misalignment; band k draws from (limit k-1, limit k]")
    ap.add_argument("--out", default="bench/results/multimodal.md")
    ap.add_argument("--subjects", default="", help="draw the cases from the subjects whose name contains this "
                    "text only (e.g. patient19: the subject dsm never saw in training)")
    ap.add_argument("--checkpoint", default="", help="dsm checkpoint (default: the bundled one)")
    ap.add_argument("--dsm-params", default="", help="parameters given to both dsm-paradigm methods alike "
                    "(dsm and mi_adam: same optimiser, levels, patches), e.g. 'levels=4,2,1;iterations=40,40,30'")
    ap.add_argument("--only-bands", default="", help="run the cases of these band indices only (comma separated, "
                    "0-based): the draw is the same, so they are the same cases as in a full run")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from the .jsonl next to --out")
    ap.add_argument("--shard", default="", help="K/N: run every N-th case from the K-th (0-based) into "
                    "OUT.shardK.jsonl; run the N shards side by side, then --merge N")
    ap.add_argument("--merge", type=int, default=0, help="N: join OUT.shard0..N-1.jsonl into OUT's .jsonl and report")
    args = ap.parse_args(argv)
    if args.merge:
        out = Path(args.out)
        rows = [json.loads(line) for k in range(args.merge)
                for line in open(out.with_suffix(f".shard{k}.jsonl"))]
        rows.sort(key=lambda r: (r["band"], r["index"], args.methods.split(",").index(r["method"])
                                 if r["method"] in args.methods.split(",") else 99))
        out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_report(rows, [m for m in args.methods.split(",") if any(r["method"] == m for r in rows)], args, out)
        return 0
    if args.report_only:
        rows = [json.loads(line) for line in open(Path(args.out).with_suffix(".jsonl"))]
        write_report(rows, [m for m in args.methods.split(",") if any(r["method"] == m for r in rows)], args,
                     Path(args.out))
        return 0
    subjects = [s for s in subject_list() if args.subjects in s]
    if not subjects:
        raise SystemExit(f"no subject matches {args.subjects!r}")
    bands = tuple(tuple(float(x) for x in b.split(":")) for b in args.bands.split(","))
    cases = make_cases(subjects, per_band=args.per_band, bands=bands, seed=args.seed)
    if args.only_bands:
        keep = {int(b) for b in args.only_bands.split(",")}
        cases = [c for c in cases if c.band in keep]
    jsonl = Path(args.out).with_suffix(".jsonl")
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        if not 0 <= k < n:
            raise SystemExit(f"--shard K/N needs 0 <= K < N, got {args.shard!r}")
        cases = cases[k::n]
        jsonl = Path(args.out).with_suffix(f".shard{k}.jsonl")
    methods = args.methods.split(",")
    dsm_params = dict(kv.split("=", 1) for kv in args.dsm_params.split(";") if kv.strip())
    cache: dict = {}
    rows = []
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(jsonl, "w") as fh:
        for case in cases:
            fixed, moving, truth, points = case_images(case, cache, args.spacing)
            from app.engine.types import Transform
            start = mean_point_error(Transform.identity(), truth, points)
            for m in methods:
                res, secs, cpu = run_method(m, fixed, moving, args.checkpoint or None, dsm_params)
                err = mean_point_error(res.transform, truth, points)
                chosen = res.params.get("chosen", {})
                row = {"method": m, "subject": case.subject, "band": case.band, "band_label": case.label,
                       "index": case.index, "start_mm": start, "error_mm": err, "seconds": secs, "cpu_seconds": cpu,
                       "chosen": chosen}
                rows.append(row)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"{case.label:>12} {case.subject:<45} {m:<7} start {start:6.2f} -> {err:7.2f} mm "
                      f"{secs:5.1f} s (cpu {cpu:5.1f} s) {chosen.get('multimodal', '')} "
                      f"{[(g['stage'], g['kept']) for g in chosen.get('guards', [])]}", flush=True)
    if not args.shard:
        write_report(rows, methods, args, Path(args.out))
    return 0


def write_report(rows, methods, args, out: Path) -> None:
    lines = [f"# Multimodal pairs with exact answers: {', '.join(methods)}", "",
             f"Command: `OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 .venv/bin/python "
             f"bench/bench_multimodal.py --per-band {args.per_band} --spacing {args.spacing} --seed {args.seed}"
             f"{' --bands ' + args.bands if getattr(args, 'bands', '10:10,20:20,30:30') != '10:10,20:20,30:30' else ''}"
             f"{' --subjects ' + args.subjects if args.subjects else ''}"
             f"{' --only-bands ' + args.only_bands if getattr(args, 'only_bands', '') else ''} --methods {args.methods}"
             f"{' --checkpoint ' + args.checkpoint if getattr(args, 'checkpoint', '') else ''}"
             f"{' --dsm-params ' + repr(args.dsm_params) if getattr(args, 'dsm_params', '') else ''}`",
             "",
             f"{len(rows) // max(len(methods), 1)} cases ({args.per_band} per band), fixed = T1 through a known random "
             f"rigid transform, moving = T2 / FLAIR / T1POST (MS) or t2 / flair / t1c (glioma), images at "
             f"{args.spacing:g} mm. Error = mean point error over the fixed brain (mm); success < 2 mm.", "",
             "| band (max rot / trans) | method | n | success | median mm | mean mm | max mm | median s | median CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    bands = sorted({(r["band"], r["band_label"]) for r in rows})
    for b, label in bands:
        for m in methods:
            e = np.array([r["error_mm"] for r in rows if r["band"] == b and r["method"] == m])
            s = np.array([r["seconds"] for r in rows if r["band"] == b and r["method"] == m])
            c = np.array([r.get("cpu_seconds", np.nan) for r in rows if r["band"] == b and r["method"] == m])
            if len(e):
                lines.append(f"| {label} | {m} | {len(e)} | {np.mean(e < 2.0):.0%} | {np.median(e):.2f} | "
                             f"{e.mean():.2f} | {e.max():.2f} | {np.median(s):.1f} | {np.median(c):.1f} |")
    for m in methods:
        e = np.array([r["error_mm"] for r in rows if r["method"] == m])
        s = np.array([r["seconds"] for r in rows if r["method"] == m])
        c = np.array([r.get("cpu_seconds", np.nan) for r in rows if r["method"] == m])
        lines.append(f"| all | {m} | {len(e)} | {np.mean(e < 2.0):.0%} | {np.median(e):.2f} | {e.mean():.2f} | "
                     f"{e.max():.2f} | {np.median(s):.1f} | {np.median(c):.1f} |")
    lines += ["", "Per modality (all bands):", "", "| moving | method | success | median mm |", "|---|---|---|---|"]
    mods = sorted({r["subject"].split(":")[2].lower() for r in rows})
    for mod in mods:
        for m in methods:
            e = np.array([r["error_mm"] for r in rows if r["method"] == m and r["subject"].split(":")[2].lower() == mod])
            lines.append(f"| {mod} | {m} | {np.mean(e < 2.0):.0%} | {np.median(e):.2f} |")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
