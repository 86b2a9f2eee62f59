#!/usr/bin/env python3
"""Collect `main.py evaluate` output folders into one markdown table (and optionally into the cards).

    .venv/bin/python bench/summarise_evaluations.py NAME=DIR [NAME=DIR ...] --pairs-csv resources/splits/ixi_test20.csv
        [--out bench/results/learned_test20.md] [--cards]

Each DIR is an `evaluate --out` folder (summary.json + results.json). The table has, per method,
the mean (and standard deviation) over the pairs of Dice (mean over the labels of the fixed map),
HD95, fold %, SDlogJ and seconds per pair; the first row is the identity ("before"), taken from the
first folder. ``--cards`` adds the table to every bundled checkpoint card (JSON ``comparison`` key,
and at the top of the markdown card) so that each card states its model's numbers next to the others'.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    if "pairs" not in s:
        s["pairs"] = len(json.loads((folder / "results.json").read_text()))
    return s


def fmt(v, std=None, scale=1.0, digits=3):
    if v is None:
        return "-"
    out = f"{scale * v:.{digits}f}"
    return out + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| method | pairs | Dice | HD95 mm | fold % | SDlogJ | s/pair |\n|---|---|---|---|---|---|---|\n"
    first = rows[0][1]["before"]
    lines = [f"| before (identity) | {rows[0][1]['pairs']} | {fmt(first['dice_mean'], first.get('dice_mean_std'))} | "
             f"{fmt(first['hd95_mean'], None, digits=2)} | - | - | - |"]
    for name, s in rows:
        lines.append(f"| {name} | {s['pairs']} | {fmt(s['dice_mean'], s.get('dice_mean_std'))} | "
                     f"{fmt(s['hd95_mean'], None, digits=2)} | {fmt(s['fold_fraction'], None, 100.0, 4)} | "
                     f"{fmt(s['sdlogj'], None)} | {fmt(s['runtime_s'], s.get('runtime_s_std'), digits=2)} |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="NAME=DIR")
    ap.add_argument("--pairs-csv", required=True)
    ap.add_argument("--out")
    ap.add_argument("--note", default="", help="a line under the table (conditions of the run)")
    ap.add_argument("--cards", action="store_true")
    a = ap.parse_args()
    rows = []
    for spec in a.runs:
        name, _, folder = spec.partition("=")
        rows.append((name, load(Path(folder))))
    md = f"Pairs: `{a.pairs_csv}`. {a.note}\n\n" + table(rows)
    print(md)
    if a.out:
        Path(a.out).write_text(md)
    if a.cards:
        from app.engine import checkpoints as C
        comparison = {"pairs_csv": a.pairs_csv, "note": a.note,
                      "methods": {n: {k: s.get(k) for k in ("pairs", "dice_mean", "dice_mean_std", "hd95_mean",
                                                             "fold_fraction", "sdlogj", "runtime_s")}
                                  for n, s in rows}}
        for pt in sorted(C.CHECKPOINT_DIR.glob("*.pt")):
            jpath, mpath = C.card_paths(pt)
            if not jpath.is_file():
                continue
            card = json.loads(jpath.read_text())
            card["comparison"] = comparison
            card["summary"] = (f"{card.get('note', '')}\n\n### Measured on the test split, next to the other "
                               f"paradigms (same pairs)\n\n{md}")
            C.write_card(pt, card)
            print("card updated:", jpath.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
