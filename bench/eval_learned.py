"""Evaluate the learned two-stage checkpoints on the IXI val or test pairs.

    .venv/bin/python bench/eval_learned.py --paradigm unsupervised --checkpoint resources/checkpoints/unsupervised.pt \
        --split test [--pairs 30] [--out bench/results/learned_unsupervised_test.json]

Per pair: mean Dice over the labels of the fixed map (Learn2Reg; 148 DLMUSE regions) before
(physical identity), after the learned affine stage alone, and after affine + deformable;
folding fraction and SDlogJ of the full transform's Jacobian; inference seconds (preprocessing +
networks + composition + one resampling of the image, file I/O and label warping excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.engine import datasets as D  # noqa: E402
from app.engine import io, paradigms  # noqa: E402
from app.engine.evaluation import transform_metrics  # noqa: E402
from app.engine.spatial import resample  # noqa: E402
from app.engine.types import Transform  # noqa: E402

TARGETS = {"unsupervised": "app.engine.paradigms.unsupervised:UnsupervisedRegistrar",
           "weakly": "app.engine.paradigms.weakly:WeaklyRegistrar"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paradigm", required=True, choices=tuple(TARGETS))
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--pairs", type=int, default=0, help="first N pairs only (0: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    ap.add_argument("--card", action="store_true", help="record the summary in the checkpoint's card")
    a = ap.parse_args(argv)
    if a.paradigm not in paradigms.REGISTRY:
        paradigms.register_paradigm(a.paradigm, TARGETS[a.paradigm], a.paradigm)
    reg = paradigms.get(a.paradigm)
    split = D.load_split()
    pairs = split[f"{a.split}_pairs"][: a.pairs or None]
    rows = []
    for i, (f, m) in enumerate(pairs):
        fi, fs = D.ixi_paths(f)
        mi, ms = D.ixi_paths(m)
        fixed, moving = io.read_volume(fi), io.read_volume(mi)
        flab, mlab = io.read_labels(fs, reference=fixed), io.read_labels(ms)
        kw = dict(fixed_labels=flab, moving_labels=mlab, with_hd95=False)
        row = {"fixed": f, "moving": m}
        before = transform_metrics(fixed, moving, Transform.identity(), **kw)
        aff = reg.register(fixed, moving, reg.Params(stages="affine"), checkpoint=a.checkpoint, device=a.device)
        aff_m = transform_metrics(fixed, moving, aff.transform, field=aff.field,
                                  warped_labels=resample(mlab, fixed, aff.transform, "nearest"), **kw)
        t0 = time.perf_counter()
        res = reg.register(fixed, moving, reg.Params(), checkpoint=a.checkpoint, device=a.device)
        wall = time.perf_counter() - t0
        full = transform_metrics(fixed, moving, res.transform, field=res.field,
                                 warped_labels=resample(mlab, fixed, res.transform, "nearest"), **kw)
        row.update(dice_before=before["dice_mean"], dice_affine=aff_m["dice_mean"], dice=full["dice_mean"],
                   fold_fraction=full["fold_fraction"], sdlogj=full["sdlogj"], seconds=wall,
                   timings=res.timings, device=res.device, load=os.getloadavg()[0])
        rows.append(row)
        print(f"{i + 1}/{len(pairs)} {f} <- {m}: Dice {row['dice_before']:.3f} / {row['dice_affine']:.3f} / "
              f"{row['dice']:.3f}  fold {100 * row['fold_fraction']:.3f} %  {wall:.2f} s (load {row['load']:.1f})",
              flush=True)
    keys = ("dice_before", "dice_affine", "dice", "fold_fraction", "sdlogj", "seconds")
    summary = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    summary.update({f"{k}_std": float(np.std([r[k] for r in rows])) for k in keys})
    summary["seconds_median"] = float(np.median([r["seconds"] for r in rows]))
    summary["network_seconds_median"] = float(np.median([r["timings"]["network"] for r in rows]))
    summary.update(pairs=len(rows), split=a.split, paradigm=a.paradigm, checkpoint=a.checkpoint,
                   device=rows[0]["device"] if rows else None)
    print(json.dumps(summary, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"summary": summary, "pairs": rows}, indent=1))
    if a.card:
        update_card(a.checkpoint, a.split, summary)
    return 0


def update_card(path, split: str, summary: dict) -> None:
    """Merge ``summary`` into the checkpoint's card under ``measured[split]`` (creating the card)."""
    from app.engine import checkpoints as C
    jpath = C.card_paths(path)[0]
    ck = C.load_checkpoint(path, build=False)
    card = json.loads(jpath.read_text()) if jpath.is_file() else {}
    tr = ck.get("training", {})
    card.setdefault("title", Path(path).stem)
    card["paradigm"] = ck["paradigm"]
    card["network"] = ck["network"]
    card["preprocessing"] = ck["preprocessing"]
    card["training"] = {k: tr.get(k) for k in ("data", "split", "train_subjects", "steps", "batch_size", "lr",
                                               "stage", "losses", "augmentation", "seconds", "device", "init")
                        if k in tr}
    card["training"]["final_validation_working_grid"] = tr.get("validation")
    card.setdefault("measured", {})[split] = {k: (round(v, 5) if isinstance(v, float) else v)
                                               for k, v in summary.items()}
    C.write_card(path, card)


if __name__ == "__main__":
    raise SystemExit(main())
