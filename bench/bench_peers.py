#!/usr/bin/env python3
"""RegStation's paradigms against the conventional peers Greedy and ANTsPy SyN, on the same IXI pairs, in one run.

    PYTHONPATH=. .venv/bin/python bench/bench_peers.py [--pairs resources/splits/ixi_test20.csv] [--threads 1]
        [--methods identity,greedy,ants,iterative,weakly,unsupervised,weakly+instance,weakly+instance_fast,weakly+instance_tuned]
        [--out bench/results/peers_test20]      # writes OUT.json (every pair, every method) and OUT.md
        [--shard K/N]                            # pairs K, K+N, ...: OUT.shardK-of-N.json; then --merge N
        [--indices I,J,...]                      # those pairs only (0-based): OUT.partI.json

On a machine shared by many jobs, N shards run side by side (each interleaves all methods on its pairs, so
every method meets the same load), and ``--merge N`` joins their rows (and those of any ``OUT.part*.json``;
one row per pair) into OUT.json and OUT.md.

Peers (bench only, never requirements of the app):

* **Greedy** (``.venv/bin/pip install picsl-greedy``, runs in this process): affine (12 dof, image centres
  aligned first) then deformable, both NCC 2x2x2 and 100x50x10 iterations, ``-threads N``. Greedy writes its
  affine in the RAS convention of c3d (``x_ras -> A x_ras``, fixed -> moving); it is converted to LPS
  (``F A F``, ``F = diag(-1, -1, 1, 1)``) and composed like ANTs' ``[warp, affine]``: ``T(x) = A(x + u(x))``.
* **ANTsPy SyN** (``type_of_transform='SyN'``, defaults): antspyx pins numpy<2.4, so it runs in its own venv
  ``.venv-bench`` (``python3 -m venv .venv-bench && .venv-bench/bin/pip install antspyx SimpleITK scipy
  nibabel tqdm torch==2.13.0``; symlink it into a worktree) as a subprocess per pair
  (``bench/_ants_worker.py``) that writes its forward transforms; they are read here and composed.

Both peers' compositions are *verified*, not assumed: the moving labels warped by the peer's own resampler
(nearest neighbour: Greedy's ``-ri NN`` reslice, ``ants.apply_transforms``) must agree with RegStation's
resampling through the converted transform on > 99 % of the fixed grid's voxels (``*_label_agreement``).

Every method is scored by the same code, :func:`app.engine.evaluation.transform_metrics` on its transform
(fixed physical points -> moving physical points): Dice mean over the labels present in the fixed map
(148 DLMUSE labels), HD95 mean (mm), fold % and SDlogJ of the Jacobian determinant of the full transform
computed in physical space with the direction cosines (:func:`app.engine.metrics.jacobian_determinant`;
IXI's directions are permuted, where SimpleITK's DisplacementFieldJacobianDeterminant reports false folds).
Seconds are those of the registration call alone (file reading and scoring excluded): wall clock and the
process's CPU seconds (all threads; on this shared 2-core machine CPU seconds are the load-independent
number, wall seconds depend on what else runs). ``--threads N`` caps ITK, torch, Greedy and ANTs alike.
Before the first pair every torch method runs once untimed (imports, first-call costs).

Methods (``--methods``): ``identity``; ``greedy``; ``ants``; ``iterative`` (defaults); ``weakly``,
``unsupervised`` (bundled checkpoints, affine + deformable); ``weakly+instance`` (instance's defaults after
``weakly``); ``weakly+instance_fast`` (the budgeted instance after ``weakly``: instance parameters of
``--fast``, default :data:`FAST`); ``weakly+instance_tuned`` (the instance schedule chosen on validation
pairs to spend Greedy's time budget: :data:`TUNED`, ``--tuned``); any other paradigm or pipeline key runs with its defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if "--threads" in sys.argv:
    _n = sys.argv[sys.argv.index("--threads") + 1]
    for _v in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_v] = _n

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from app.engine import io  # noqa: E402
from app.engine.evaluation import transform_metrics  # noqa: E402
from app.engine.spatial import compose, field_to_transform, resample  # noqa: E402
from app.engine.types import Transform, Volume  # noqa: E402

DEFAULT_METHODS = ("identity", "greedy", "ants", "iterative", "weakly", "unsupervised", "weakly+instance",
                   "weakly+instance_fast", "weakly+instance_tuned")
# method name -> (paradigm or pipeline key, parameters) for RegStation's own methods
OURS = {
    "iterative": ("iterative", None),
    "weakly": ("weakly", None),
    "unsupervised": ("unsupervised", None),
    "weakly+instance": ("weakly+instance", None),
    "weakly+instance_fast": ("weakly+instance", None),      # [{}, --fast] (see main)
    "weakly+instance_tuned": ("weakly+instance", None),     # [{}, --tuned] (see main)
}
# the budgeted instance after a learned pass: tuned on validation pairs of resources/splits/ixi_split.json
FAST = "iterations=30,20,5"
# chosen on the first 6 validation pairs among schedules that keep weakly + instance under Greedy's CPU time
# (bench/results/instance_after_weakly_val.md): fewer squarings (velocity integrated with 4 instead of 7), the
# time saved and some more spent on the finest level (20 instead of 10 iterations)
TUNED = "integration_steps=4;iterations=60,30,20"
LABELS = {"identity": "identity (before)", "greedy": "Greedy (affine + deformable)", "ants": "ANTsPy SyN",
          "iterative": "iterative (default)"}
GREEDY_AFFINE = "-d 3 -a -dof 12 -ia-image-centers -m NCC 2x2x2 -n 100x50x10 -i fixed moving -o aff"
GREEDY_DEFORM = "-d 3 -m NCC 2x2x2 -n 100x50x10 -i fixed moving -it aff -o warp"
AGREEMENT_MIN = 0.99


# --------------------------------------------------------------------------- pairs
def read_pairs(path: Path) -> list[dict]:
    """Rows of a PAIRS.csv (``fixed,moving,fixed_labels,moving_labels``; relative paths are relative to the csv)."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append({k: str((path.parent / v).resolve()) for k, v in r.items()
                         if k in ("fixed", "moving", "fixed_labels", "moving_labels") and v})
    if not rows:
        raise ValueError(f"no pairs in {path}")
    return rows


def subject(p: str) -> str:
    return Path(p).name.split("_")[0]


# --------------------------------------------------------------------------- peers
def ras_to_lps(m_ras: np.ndarray) -> Transform:
    """A 4x4 affine of physical RAS points (c3d / Greedy convention, fixed -> moving) as an LPS Transform."""
    m = np.asarray(m_ras, float)
    if m.shape != (4, 4):
        raise ValueError(f"an affine matrix must be 4x4, got shape {m.shape}")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = flip @ m @ flip
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(lps[:3, :3].reshape(-1)))
    tx.SetTranslation(tuple(lps[:3, 3]))
    return Transform(tx, "affine")


@contextlib.contextmanager
def quiet_stdout():
    """Silence a C++ library's prints to the process's stdout (file descriptor 1) for a while."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def run_greedy(fixed_img: sitk.Image, moving_img: sitk.Image, moving_labels_img: sitk.Image, threads: int):
    """Greedy affine then deformable; returns (Transform fixed -> moving in LPS, wall s, CPU s, greedy's own
    nearest-neighbour warp of the moving labels as a zyx array)."""
    from picsl_greedy import Greedy3D
    g = Greedy3D()
    thr = f" -threads {threads}" if threads else ""
    log = open(os.devnull, "w")
    with quiet_stdout():
        c0, t0 = time.process_time(), time.perf_counter()
        g.execute(GREEDY_AFFINE + thr, fixed=fixed_img, moving=moving_img, aff=None, out=log, err=log)
        g.execute(GREEDY_DEFORM + thr, warp=None, out=log, err=log)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        g.execute("-d 3 -rf fixed -ri NN -rm mlab wlab -r warp aff" + thr, mlab=moving_labels_img, wlab=None,
                  out=log, err=log)
    log.close()
    affine = ras_to_lps(np.asarray(g["aff"], float))
    warp = Volume.from_sitk(sitk.Cast(g["warp"], sitk.sitkVectorFloat64))
    tx = compose(affine, field_to_transform(warp))
    return tx, secs, cpu, sitk.GetArrayFromImage(g["wlab"])


def run_ants(pair: dict, workdir: Path, threads: int, python: Path):
    """ANTsPy SyN in ``.venv-bench`` (subprocess); returns (Transform, wall s, CPU s, ANTs' warped labels zyx)."""
    env = dict(os.environ)
    if threads:
        env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    cmd = [str(python), str(ROOT / "bench" / "_ants_worker.py"), pair["fixed"], pair["moving"],
           pair["moving_labels"], str(workdir)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ANTs worker failed ({out.returncode}): {out.stderr[-2000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    stages = []
    for p in reversed(info["fwdtransforms"]):  # [warp, affine]: the affine is the first stage
        if p.endswith(".mat"):
            stages.append(Transform(sitk.ReadTransform(p)))
        else:
            stages.append(field_to_transform(Volume.from_sitk(sitk.ReadImage(p, sitk.sitkVectorFloat64))))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(info["warped_labels"]))
    return compose(*stages), info["seconds"], info["cpu_seconds"], np.rint(warped).astype(np.int64)


def label_agreement(peer_warped_zyx: np.ndarray, moving_labels, fixed: Volume, tx: Transform) -> float:
    """Fraction of the fixed grid's voxels where the peer's own warp of the labels equals ours through ``tx``."""
    ours = resample(moving_labels, fixed, tx, "nearest").array
    if peer_warped_zyx.shape != ours.shape:
        raise ValueError(f"peer's warped labels {peer_warped_zyx.shape} vs ours {ours.shape}")
    return float(np.mean(np.rint(peer_warped_zyx).astype(np.int64) == ours.astype(np.int64)))


# --------------------------------------------------------------------------- ours
def run_ours(name: str, fixed, moving, device: str = "cpu"):
    from app.engine.pipeline import make_stage_params, register_pipeline, stages_of
    key, params = OURS.get(name, (name, None))
    keys = stages_of(key)
    stage_params = make_stage_params(keys, params)
    c0, t0 = time.process_time(), time.perf_counter()
    res = register_pipeline(keys, fixed, moving, stage_params, device=device)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return res.transform, secs, cpu


def warm_up(methods, fixed, moving) -> None:
    """Run every torch stage once, untimed (torch._dynamo's import in Adam's constructor, checkpoint loading)."""
    from app.engine.paradigms.instance import refine
    from app.engine.pipeline import stages_of
    keys = {k for m in methods if m not in ("identity", "greedy", "ants") for k in stages_of(OURS.get(m, (m,))[0])}
    for key in sorted(keys - {"iterative"}):
        if key == "instance":
            refine(fixed, moving, None, {"levels": "4", "iterations": "2"}, device="cpu")
        else:
            run_ours(key, fixed, moving)


# --------------------------------------------------------------------------- report
def summarise(rows: list[dict], methods) -> dict:
    out = {}
    for m in methods:
        rs = [r[m] for r in rows if m in r and r[m].get("dice_mean") is not None]
        if not rs:
            continue
        s = {"pairs": len(rs)}
        for k in ("dice_mean", "hd95_mean", "fold_fraction", "sdlogj", "seconds", "cpu_seconds", "label_agreement"):
            v = [r[k] for r in rs if r.get(k) is not None]
            if v:
                s[k] = float(np.mean(v))
                s[k + "_std"] = float(np.std(v))
        if "label_agreement" in s:
            s["label_agreement_min"] = float(min(r["label_agreement"] for r in rs))
        out[m] = s
    if "greedy" in out:
        for m in methods:
            both = [r for r in rows if m in r and "greedy" in r and r[m].get("dice_mean") is not None
                    and r["greedy"].get("dice_mean") is not None]
            if m in ("greedy", "identity") or m not in out or not both:
                continue
            d = np.array([r[m]["dice_mean"] - r["greedy"]["dice_mean"] for r in both])
            out[m]["dice_minus_greedy"] = float(d.mean())
            out[m]["pairs_above_greedy"] = int((d > 0).sum())
            out[m]["cpu_ratio_to_greedy"] = float(np.mean([r[m]["cpu_seconds"] for r in both]) /
                                                  np.mean([r["greedy"]["cpu_seconds"] for r in both]))
    return out


def markdown(summary: dict, meta: dict, rows: list = ()) -> str:
    lines = [f"# Peers on {meta['pairs']} IXI test pairs (`{meta['pairs_csv']}`), one run",
             "",
             f"`{meta['command']}`  ",
             f"{meta['started']} - {meta['finished']} UTC; threads {meta['threads']}; "
             f"load average {meta['load_start']} at the start, {meta['load_end']} at the end; "
             f"checkpoints: {meta['checkpoints']}.",
             "",
             "Scored by one code (`evaluation.transform_metrics`): Dice mean over the fixed map's labels (148 "
             "DLMUSE), HD95 mean (mm), fold % and SDlogJ of the Jacobian in physical space (direction cosines), "
             "seconds of the registration call alone (file reading excluded). CPU s = process CPU seconds (all "
             "threads), the load-independent number on this shared machine; wall s depends on the load.",
             "",
             "| method | Dice | HD95 mm | fold % | SDlogJ | wall s | CPU s | Dice - Greedy (pairs above) | CPU / Greedy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        vs = (f"{s['dice_minus_greedy']:+.4f} ({s['pairs_above_greedy']}/{s['pairs']})"
              if "dice_minus_greedy" in s else "")
        ratio = f"{s['cpu_ratio_to_greedy']:.2f}" if "cpu_ratio_to_greedy" in s else ""
        lines.append(f"| {LABELS.get(m, m)} | {s['dice_mean']:.4f} ± {s['dice_mean_std']:.4f} | "
                     f"{s.get('hd95_mean', float('nan')):.2f} | {100 * s['fold_fraction']:.3f} | "
                     f"{s['sdlogj']:.3f} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | {vs} | {ratio} |")
    checks = [f"{LABELS.get(m, m)}: min {summary[m]['label_agreement_min']:.4f}, mean {summary[m]['label_agreement']:.4f}"
              for m in ("greedy", "ants") if m in summary and "label_agreement_min" in summary[m]]
    if checks:
        lines += ["", "Composition check (the peer's own nearest-neighbour warp of the moving labels vs RegStation's "
                  f"resampling through the converted transform, fraction of voxels equal; required > {AGREEMENT_MIN}): "
                  + "; ".join(checks) + "."]
    if rows:
        ms = list(summary)
        lines += ["", "Dice per pair:", "", "| pair | fixed | moving | " + " | ".join(ms) + " |",
                  "|---|---|---|" + "---|" * len(ms)]
        for r in rows:
            vals = [f"{r[m]['dice_mean']:.4f}" if r.get(m, {}).get("dice_mean") is not None else "-" for m in ms]
            lines.append(f"| {r['pair']} | {r['fixed']} | {r['moving']} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def merge(out: str, n: int) -> int:
    """Join the rows of ``OUT.shardK-of-N.json`` (K = 0..N-1) and ``OUT.part*.json`` into OUT.json and OUT.md
    (one row per pair: the first file that has it)."""
    files = [Path(f"{out}.shard{k}-of-{n}.json") for k in range(n)]
    files += sorted(Path(out).parent.glob(Path(out).name + ".part*.json"))
    parts = [json.loads(f.read_text()) for f in files]
    by_pair = {}
    for p in parts:
        for r in p["rows"]:
            by_pair.setdefault(r["pair"], r)
    rows = [by_pair[k] for k in sorted(by_pair)]
    meta = dict(parts[0]["meta"])
    meta.update(started=min(p["meta"]["started"] for p in parts), finished=max(p["meta"]["finished"] for p in parts),
                load_start="%s-%s" % (min((p["meta"]["load_start"] for p in parts), key=float), max((p["meta"]["load_start"] for p in parts), key=float)),
                load_end="%s-%s" % (min((p["meta"]["load_end"] for p in parts), key=float), max((p["meta"]["load_end"] for p in parts), key=float)),
                pairs=len(rows),
                command=parts[0]["meta"]["command"].split(" --shard")[0] + f" --shard K/{n} (K = 0..{n - 1}, side by side)"
                + (f" and --indices for {len(files) - n} more processes" if len(files) > n else ""))
    summary = summarise(rows, meta["methods"])
    Path(out + ".json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    Path(out + ".md").write_text(markdown(summary, meta, rows))
    print(Path(out + ".md").read_text())
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default=str(ROOT / "resources" / "splits" / "ixi_test20.csv"), help="PAIRS.csv")
    ap.add_argument("--limit", type=int, default=0, help="only the first N pairs (0: all)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--threads", type=int, default=1, help="threads for every method (0: each one's default)")
    ap.add_argument("--ants-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    ap.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    ap.add_argument("--fast", default=FAST, help="instance parameters of weakly+instance_fast, NAME=VALUE;...")
    ap.add_argument("--tuned", default=TUNED, help="instance parameters of weakly+instance_tuned, NAME=VALUE;...")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "peers_test20"), help="OUT.json and OUT.md")
    ap.add_argument("--shard", default="", help="K/N: only pairs K, K+N, K+2N, ... (0 <= K < N)")
    ap.add_argument("--indices", default="", help="only these pairs (0-based, comma-separated): OUT.partI.json")
    ap.add_argument("--merge", type=int, default=0, help="join the N shards' files into OUT.json and OUT.md")
    a = ap.parse_args()
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    OURS["weakly+instance_fast"] = ("weakly+instance", [{}, dict(kv.split("=", 1) for kv in a.fast.split(";") if kv)])
    OURS["weakly+instance_tuned"] = ("weakly+instance", [{}, dict(kv.split("=", 1) for kv in a.tuned.split(";") if kv)])
    LABELS.update({"weakly+instance": "weakly + instance (defaults)",
                   "weakly+instance_fast": f"weakly + instance ({a.fast.replace(';', '; ')})",
                   "weakly+instance_tuned": f"weakly + instance ({a.tuned.replace(';', '; ')})"})
    if a.merge:
        return merge(a.out, a.merge)
    shard, nshards = (int(v) for v in a.shard.split("/")) if a.shard else (0, 1)
    if not 0 <= shard < nshards:
        raise SystemExit(f"--shard K/N needs 0 <= K < N, got {a.shard!r}")
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(a.threads)
    if "ants" in methods and not Path(a.ants_python).exists():
        raise SystemExit(f"ANTs needs {a.ants_python} (see this script's docstring) or leave 'ants' out of --methods")
    pairs_csv = Path(a.pairs)
    pairs = [(i, p) for i, p in enumerate(read_pairs(pairs_csv)[: a.limit or None]) if i % nshards == shard]
    if a.indices:
        wanted = [int(v) for v in a.indices.split(",")]
        pairs = [(i, p) for i, p in pairs if i in wanted]
    meta = {"pairs_csv": os.path.relpath(pairs_csv, ROOT), "command": " ".join(["bench/bench_peers.py"] + sys.argv[1:]),
            "threads": a.threads or "default", "fast": a.fast, "tuned": a.tuned, "started": time.strftime("%Y-%m-%d %H:%M"),
            "load_start": "%.1f" % os.getloadavg()[0], "methods": methods}
    from app.engine.checkpoints import checkpoint_id, default_checkpoint, load_checkpoint
    meta["checkpoints"] = ", ".join(checkpoint_id(load_checkpoint(default_checkpoint(k), build=False))
                                    for k in ("weakly", "unsupervised") if any(k in m for m in methods)) or "none"
    rows = []
    suffix = f".shard{shard}-of-{nshards}" if nshards > 1 else ""
    suffix += f".part{pairs[0][0]}" if a.indices else ""
    out_json, out_md = Path(a.out + suffix + ".json"), Path(a.out + suffix + ".md")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        for n_done, (i, pair) in enumerate(pairs):
            fixed, moving = io.read_volume(pair["fixed"]), io.read_volume(pair["moving"])
            fl = io.read_labels(pair["fixed_labels"], reference=fixed)
            ml = io.read_labels(pair["moving_labels"])
            if n_done == 0:
                warm_up(methods, fixed, moving)
            row = {"pair": i, "fixed": subject(pair["fixed"]), "moving": subject(pair["moving"])}
            for m in methods:
                check = None
                try:
                    if m == "identity":
                        tx, secs, cpu = Transform.identity(), 0.0, 0.0
                    elif m == "greedy":
                        fi = sitk.ReadImage(pair["fixed"], sitk.sitkFloat32)
                        mi = sitk.ReadImage(pair["moving"], sitk.sitkFloat32)
                        li = sitk.ReadImage(pair["moving_labels"])
                        tx, secs, cpu, peer = run_greedy(fi, mi, li, a.threads)
                        check = label_agreement(peer, ml, fixed, tx)
                    elif m == "ants":
                        tx, secs, cpu, peer = run_ants(pair, Path(tmp) / f"ants{i}", a.threads, Path(a.ants_python))
                        check = label_agreement(peer, ml, fixed, tx)
                    else:
                        tx, secs, cpu = run_ours(m, fixed, moving)
                    s = transform_metrics(fixed, moving, tx, fixed_labels=fl, moving_labels=ml,
                                          with_hd95=not a.no_hd95)
                    row[m] = {k: s[k] for k in ("dice_mean", "hd95_mean", "fold_fraction", "sdlogj")}
                    row[m].update(seconds=secs, cpu_seconds=cpu)
                    if check is not None:
                        row[m]["label_agreement"] = check
                        if check <= AGREEMENT_MIN:
                            print(f"WARNING {m} pair {i}: label agreement {check:.4f} <= {AGREEMENT_MIN}: "
                                  "the transform conversion is wrong", flush=True)
                except Exception as e:  # noqa: BLE001  (a failed method is reported, the run goes on)
                    row[m] = {"error": f"{type(e).__name__}: {e}", "dice_mean": None}
                print(json.dumps({"pair": i, "method": m, **{k: (round(v, 4) if isinstance(v, float) else v)
                                                              for k, v in row[m].items()}}), flush=True)
            rows.append(row)
            meta.update(finished=time.strftime("%Y-%m-%d %H:%M"), load_end="%.1f" % os.getloadavg()[0],
                        pairs=len(rows))
            summary = summarise(rows, methods)
            out_json.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
            out_md.write_text(markdown(summary, meta, rows))
    print(out_md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
