#!/usr/bin/env python3
"""Write PAIRS.csv files of the IXI test split for `main.py evaluate`.

    .venv/bin/python bench/make_pairs.py   -> resources/splits/ixi_test10.csv, ixi_test20.csv, ixi_test30.csv

Paths are relative to the CSV (resources/splits/ -> ../../../shared/data/ixi), so the files work
from any checkout with ../shared beside it.
"""
import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "resources" / "splits"
DATA_REL = Path("..") / ".." / ".." / "shared" / "data" / "ixi"


def write(n: int) -> Path:
    pairs = json.loads((SPLITS / "ixi_split.json").read_text())["test_pairs"][:n]
    out = SPLITS / f"ixi_test{n}.csv"
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"])
        for f, m in pairs:
            w.writerow([DATA_REL / "t1" / f"{f}_T1.nii.gz", DATA_REL / "t1" / f"{m}_T1.nii.gz",
                        DATA_REL / "seg" / f"{f}_T1_DLMUSE.nii.gz", DATA_REL / "seg" / f"{m}_T1_DLMUSE.nii.gz", "", ""])
    return out


if __name__ == "__main__":
    for n in (10, 20, 30):
        print(write(n))
