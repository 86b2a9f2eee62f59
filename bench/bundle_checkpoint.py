#!/usr/bin/env python3
"""Bundle a trained checkpoint into resources/checkpoints/ with a measured card.

    .venv/bin/python bench/bundle_checkpoint.py TRAINED.pt --paradigm unsupervised [--variant diffeomorphic]
        [--pairs resources/splits/ixi_test10.csv] [--note "how it was trained"]

Drops the optimiser state (the file stays small), writes ``<paradigm>[_<variant>].pt``, then runs
``evaluate_pairs`` (the engine code `main.py evaluate` uses) on the test pairs with it and writes the
card (JSON + markdown) with the training metadata and the measured Dice / fold / SDlogJ / seconds.
Paradigms whose checkpoint is not measured on IXI pairs (``dsm``: multimodal known-transform cases)
pass ``--measured RESULTS.json`` instead: its content becomes the card's ``test_evaluation``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.engine import checkpoints, io  # noqa: E402
from app.engine.evaluation import evaluate_pairs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trained")
    ap.add_argument("--paradigm", required=True)
    ap.add_argument("--variant", default="")
    ap.add_argument("--pairs", default=str(ROOT / "resources" / "splits" / "ixi_test10.csv"))
    ap.add_argument("--note", default="")
    ap.add_argument("--param", action="append", default=[], help="paradigm parameter for the evaluation")
    ap.add_argument("--measured", default="", help="JSON of measurements made elsewhere (e.g. bench_multimodal): "
                    "written as the card's test_evaluation instead of evaluating IXI pairs")
    a = ap.parse_args()
    raw = torch.load(a.trained, map_location="cpu", weights_only=True)
    if raw.get("paradigm") != a.paradigm:
        raise SystemExit(f"{a.trained} is a '{raw.get('paradigm')}' checkpoint, not '{a.paradigm}'")
    raw.pop("optimizer", None)
    name = f"{a.paradigm}_{a.variant}.pt" if a.variant else f"{a.paradigm}.pt"
    out = checkpoints.CHECKPOINT_DIR / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    torch.save(raw, tmp)
    os.replace(tmp, out)
    checkpoints.load_checkpoint(out, expected_paradigm=a.paradigm)  # must load strictly

    if a.measured:
        import json
        card = {"paradigm": a.paradigm, "variant": a.variant or "default", "file": name,
                "network": raw["network"], "preprocessing": raw["preprocessing"], "training": raw["training"],
                "created": raw["created"], "note": a.note,
                "test_evaluation": json.loads(Path(a.measured).read_text())}
        checkpoints.write_card(out, card)
        print(f"{name}: card written with the measurements of {a.measured}")
        return 0

    from app.engine.paradigms import parse_param_args
    params = parse_param_args(a.param)
    pairs = io.read_pairs_csv(a.pairs)
    rows, summary = evaluate_pairs(pairs, a.paradigm, params, checkpoint=str(out), device="cpu")
    if summary["failed"]:  # a card states numbers over every test pair, or none
        raise SystemExit(f"{summary['failed']} test pairs failed: {summary['failed_pairs']}")
    card = {
        "paradigm": a.paradigm, "variant": a.variant or "default", "file": name,
        "network": raw["network"], "preprocessing": raw["preprocessing"], "training": raw["training"],
        "created": raw["created"], "note": a.note,
        "test_evaluation": {"pairs_csv": str(Path(a.pairs).relative_to(ROOT)) if Path(a.pairs).is_absolute() else a.pairs,
                            "pairs": len(rows), "params": params, **{k: summary[k] for k in summary}},
        "reproduce": f".venv/bin/python main.py evaluate --pairs {a.pairs} --paradigm {a.paradigm} "
                     f"--checkpoint resources/checkpoints/{name} --out OUT",
    }
    checkpoints.write_card(out, card)
    print(f"{name}: Dice {summary['before']['dice_mean']:.4f} -> {summary['dice_mean']:.4f}, "
          f"fold {100 * summary['fold_fraction']:.4f} %, SDlogJ {summary['sdlogj']:.3f}, "
          f"{summary['runtime_s']:.2f} s/pair ({len(rows)} test pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
