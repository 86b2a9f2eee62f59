"""Cohorts: parallel batches, failure isolation, resume, Dask, many-to-one (``app.engine.cohort``).

Small synthetic pairs (an ellipsoid atlas and shifted copies, 24 x 28 x 32 voxels, oblique and
anisotropic) registered rigidly with MSE: well under a second per pair.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app.engine import cohort
from app.engine.io import read_pairs_csv

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--param", "stages=rigid", "--param", "metric=mse", "--param", "levels=2", "--no-progress"]
FAST_PARAMS = {"stages": "rigid", "metric": "mse", "levels": "2"}
TIMING = {"runtime_s"}  # the only columns allowed to differ between executors


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _write(arr, path: Path, spacing=(1.5, 1.2, 2.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    im.SetOrigin((-20.0, 10.0, 5.0))
    im.SetDirection(sitk.VersorTransform((0, 0, 1), 0.2).GetMatrix())
    sitk.WriteImage(im, str(path))
    return path


def _blob(shift_vox: float, shape=(24, 28, 32)):
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    r = ((x - 16 - shift_vox) / 9) ** 2 + ((y - 14) / 8) ** 2 + ((z - 12) / 7) ** 2
    img = (100 * (r < 1) + 50 * (r < 0.4)).astype(np.float32)
    lab = ((r < 1).astype(np.uint8) + (r < 0.4)).astype(np.uint8)
    return img, lab


def make_cohort(folder: Path, n: int, broken: tuple = (), labels: bool = True) -> Path:
    """An atlas and ``n`` moving images shifted by 0.5 .. n/2 voxels; PAIRS.csv with the atlas fixed.

    Pairs listed in ``broken`` get a moving file that exists but is not an image (truncated gzip for
    even indices, text for odd ones).
    """
    folder.mkdir(parents=True, exist_ok=True)
    img, lab = _blob(0.0)
    atlas = _write(img, folder / "atlas.nii.gz")
    atlas_lab = _write(lab, folder / "atlas_labels.nii.gz")
    rows = []
    for i in range(n):
        img, lab = _blob(0.5 * (i + 1))
        mov = folder / f"subject{i:02d}.nii.gz"
        if i in broken:
            if i % 2 == 0:
                mov.write_bytes(atlas.read_bytes()[:200])
            else:
                mov.write_text("not an image\n" * 40)
        else:
            _write(img, mov)
        ml = _write(lab, folder / f"subject{i:02d}_labels.nii.gz")
        rows.append([atlas.name, mov.name] + ([atlas_lab.name, ml.name] if labels else ["", ""]) + ["", ""])
    pairs = folder / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"])
        w.writerows(rows)
    return pairs


def table(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def cohort6(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort6"), 6)


@pytest.fixture(scope="module")
def reference_table(cohort6, tmp_path_factory):
    """The ``--workers 1`` table (one thread, in process) that the parallel executors must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = run("evaluate", "--pairs", cohort6, "--paradigm", "iterative", "--out", out, "--threads", "1", *FAST)
    assert r.returncode == 0, r.stderr
    rows = table(out)
    assert len(rows) == 6 and all(r["error"] == "" for r in rows)
    assert all(float(r["dice_mean"]) > float(r["before_dice_mean"]) for r in rows[2:])
    return rows


def test_ten_pairs_two_broken(tmp_path):
    pairs = make_cohort(tmp_path / "data", 10, broken=(3, 6))
    out = tmp_path / "out"
    r = run("evaluate", "--pairs", pairs, "--paradigm", "iterative", "--out", out, "--workers", "2", *FAST)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    assert "2 of 10 pairs failed" in r.stderr
    rows = table(out)
    assert [Path(x["moving"]).name for x in rows] == [f"subject{i:02d}.nii.gz" for i in range(10)]
    bad = [i for i, x in enumerate(rows) if x["error"]]
    assert bad == [3, 6]
    assert "subject03.nii.gz" in rows[3]["error"] and "subject06.nii.gz" in rows[6]["error"]
    assert all(rows[i]["dice_mean"] == "" for i in bad)
    good = [x for x in rows if not x["error"]]
    assert len(good) == 8 and all(x["dice_mean"] != "" for x in good)
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 8 and s["pairs_total"] == 10 and s["failed"] == 2 and s["metric_style"] == "regstation"
    assert s["dice_mean"] == pytest.approx(np.mean([float(x["dice_mean"]) for x in good]))
    assert {f["id"] for f in s["failed_pairs"]} == {rows[3]["id"], rows[6]["id"]}
    full = json.loads((out / "results.json").read_text())
    assert len(full) == 10 and full[3]["error"] and full[0]["error"] is None and full[0]["dice_per_label"]
    # finished pairs are on disk, failed ones are not (a resume tries them again)
    done = sorted(p.name for p in (out / "pairs").iterdir())
    assert done == sorted(x["id"] for x in good)


def test_killed_then_resumed_does_not_rerun_finished_pairs(tmp_path):
    pairs = make_cohort(tmp_path / "data", 6)
    out = tmp_path / "out"
    cmd = [sys.executable, "main.py", "evaluate", "--pairs", str(pairs), "--paradigm", "iterative",
           "--out", str(out), "--param", "stages=rigid", "--param", "metric=mse", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "pairs").glob("*/row.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "pairs").glob("*/row.json")}
    assert 1 <= len(finished) < 6, "the batch should have been killed half-way"
    # a half-written pair (a folder without row.json) is not taken as done
    ids = cohort.pair_ids(read_pairs_csv(pairs))
    half = out / "pairs" / ids[-1]
    half.mkdir(exist_ok=True)
    (half / "metrics.json").write_text("{")
    r = run("evaluate", "--pairs", pairs, "--paradigm", "iterative", "--out", out, "--resume", "--workers", "2",
            "--param", "stages=rigid", "--param", "metric=mse", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"{len(finished)} of 6 pairs were already done" in r.stdout
    after = {p.parent.name: p.stat().st_mtime_ns for p in (out / "pairs").glob("*/row.json")}
    assert len(after) == 6
    assert all(after[k] == v for k, v in finished.items())  # not run again
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 6 and s["resumed"] == len(finished) and s["failed"] == 0
    assert (half / "row.json").is_file() and not list((out / "pairs").glob(".tmp-*"))


def test_resume_ignores_incomplete_and_stale_pairs(cohort6, tmp_path):
    pairs = read_pairs_csv(cohort6)[:3]
    out = tmp_path / "out"
    rows, s = cohort.run_batch(pairs, "iterative", FAST_PARAMS, out_dir=out)
    assert s["failed"] == 0 and len(rows) == 3
    ids = [r["id"] for r in rows]
    (out / "pairs" / ids[1] / "row.json").unlink()             # as if killed before its last file
    (out / "pairs" / ".tmp-x-123").mkdir()                      # a temporary folder left by a kill
    ran = []
    rows2, s2 = cohort.run_batch(pairs, "iterative", FAST_PARAMS, out_dir=out, resume=True,
                                 on_result=lambda rec, c: ran.append((rec["id"], rec["resumed"])))
    assert dict(ran) == {ids[0]: True, ids[1]: False, ids[2]: True}
    assert s2["resumed"] == 2 and without_timing(rows2) == without_timing(rows)
    assert not (out / "pairs" / ".tmp-x-123").exists()
    # other parameters: nothing is taken from the earlier run
    ran.clear()
    cohort.run_batch(pairs, "iterative", {**FAST_PARAMS, "linear_iterations": "20"}, out_dir=out, resume=True,
                     on_result=lambda rec, c: ran.append(rec["resumed"]))
    assert ran == [False, False, False]


def test_two_workers_give_the_same_table(cohort6, reference_table, tmp_path):
    out = tmp_path / "out"
    r = run("evaluate", "--pairs", cohort6, "--paradigm", "iterative", "--out", out, "--workers", "2",
            "--threads", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert without_timing(table(out)) == without_timing(reference_table)


def test_dask_local_cluster_gives_the_same_table(cohort6, reference_table, tmp_path):
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install '.[cluster]')")
    out = tmp_path / "out"
    r = run("evaluate", "--pairs", cohort6, "--paradigm", "iterative", "--out", out, "--dask-scheduler", "local:2",
            "--threads", "1", *FAST)
    assert r.returncode == 0, r.stderr
    assert without_timing(table(out)) == without_timing(reference_table)
    assert json.loads((out / "summary.json").read_text())["executor"] == "dask local:2"


def test_register_a_manifest_without_labels(tmp_path):
    pairs = make_cohort(tmp_path / "data", 3, labels=False)
    out = tmp_path / "out"
    r = run("register", "--pairs", pairs, "--paradigm", "iterative", "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    rows = table(out)
    assert len(rows) == 3 and all(x["dice_mean"] == "" and x["error"] == "" for x in rows)
    for x in rows:
        d = out / "pairs" / x["id"]
        for name in ("warped.nii.gz", "transform.h5", "metrics.json", "row.json"):
            assert (d / name).is_file(), name
        w = sitk.ReadImage(str(d / "warped.nii.gz"))
        f = sitk.ReadImage(str(Path(x["fixed"])))
        assert w.GetSize() == f.GetSize() and w.GetDirection() == pytest.approx(f.GetDirection())
    # the third moving image lies 1.5 voxels (2.25 mm) along the image x axis: the transform finds it
    tx = sitk.ReadTransform(str(out / "pairs" / rows[2]["id"] / "transform.h5"))
    f = sitk.ReadImage(str(Path(rows[2]["fixed"])))
    centre = np.array(f.TransformContinuousIndexToPhysicalPoint((16, 14, 12)))
    expect = np.array(f.TransformContinuousIndexToPhysicalPoint((17.5, 14, 12)))
    assert np.linalg.norm(np.array(tx.TransformPoint(tuple(centre))) - expect) < 0.5


def test_cli_batch_usage_errors(cohort6, tmp_path):
    r = run("register", "a.nii", "b.nii", "--paradigm", "iterative", "--out", tmp_path / "o", "--workers", "2")
    assert r.returncode == 2 and "--workers" in r.stderr
    r = run("register", "--paradigm", "iterative", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--pairs" in r.stderr
    r = run("evaluate", "--pairs", cohort6, "--paradigm", "iterative", "--out", tmp_path / "o",
            "--dask-scheduler", "local:0", "--no-progress")
    assert r.returncode == 1 and "local:N" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- engine level
def dies_on_subject02(job):
    """A per-pair function whose worker process dies (as if killed for memory) on one pair."""
    if job.pair["moving"].endswith("subject02.nii.gz"):
        os._exit(137)
    return cohort.run_pair(job)


def test_a_dying_worker_becomes_one_error_row(cohort6):
    pairs = read_pairs_csv(cohort6)[:5]
    rows, s = cohort.run_batch(pairs, "iterative", FAST_PARAMS, workers=2, threads=1, pair_fn=dies_on_subject02)
    errors = [r["error"] for r in rows]
    assert [e is not None for e in errors] == [False, False, True, False, False]
    assert "worker process died" in errors[2]
    assert s["pairs"] == 4 and s["failed"] == 1


@pytest.mark.slow
def test_a_dying_dask_worker_becomes_one_error_row(cohort6):
    pytest.importorskip("distributed", reason="dask.distributed is not installed (pip install '.[cluster]')")
    pairs = read_pairs_csv(cohort6)[:4]
    rows, s = cohort.run_batch(pairs, "iterative", FAST_PARAMS, dask_scheduler="local:2", threads=1,
                               pair_fn=dies_on_subject02)
    errors = [r["error"] for r in rows]
    assert [e is not None for e in errors] == [False, False, True, False]
    assert "Dask worker failed or died" in errors[2]
    assert s["pairs"] == 3 and s["failed"] == 1


def test_the_atlas_is_read_once_per_worker(cohort6):
    pairs = read_pairs_csv(cohort6)
    recs = []
    cohort.clear_fixed_cache()
    cohort.run_batch(pairs, "iterative", FAST_PARAMS, on_result=lambda rec, c: recs.append(rec))
    assert sum(not r["fixed_from_cache"] for r in recs) == 1
    recs.clear()
    cohort.run_batch(pairs, "iterative", FAST_PARAMS, workers=2, threads=1,
                     on_result=lambda rec, c: recs.append(rec))
    reads = {}
    for r in recs:
        reads[r["pid"]] = reads.get(r["pid"], 0) + (not r["fixed_from_cache"])
    assert len(recs) == 6 and all(n == 1 for n in reads.values()) and len(reads) <= 2


def test_atlas_cache_notices_a_changed_file(tmp_path):
    pairs = read_pairs_csv(make_cohort(tmp_path, 1))
    cohort.clear_fixed_cache()
    f1, _, hit1 = cohort._fixed_cached(pairs[0])
    _, _, hit2 = cohort._fixed_cached(pairs[0])
    img, _ = _blob(2.0)
    _write(img, Path(pairs[0]["fixed"]))
    os.utime(pairs[0]["fixed"], ns=(time.time_ns() + 10**9,) * 2)
    f3, _, hit3 = cohort._fixed_cached(pairs[0])
    assert (hit1, hit2, hit3) == (False, True, False)
    assert not np.array_equal(f1.array, f3.array)


def test_pair_ids_are_unique_folder_names():
    pairs = [{"fixed": "/a/atlas.nii.gz", "moving": "/x/s1.nii.gz"},
             {"fixed": "/a/atlas.nii.gz", "moving": "/y/s1.nii.gz"},
             {"fixed": "/a/atlas.nii.gz", "moving": "/x/s1.nii.gz"},
             {"fixed": "/a/atlas.nii.gz", "moving": "/x/s 2.nrrd"}]
    ids = cohort.pair_ids(pairs)
    assert len(set(ids)) == 4 and ids[3] == "atlas--s_2"
    assert ids[0].startswith("atlas--s1-") and ids[2] == ids[0] + "-2"
    assert cohort.pair_ids([{**p, "id": f"case{i}"} for i, p in enumerate(pairs)]) == [f"case{i}" for i in range(4)]
    with pytest.raises(ValueError, match="share the id"):
        cohort.pair_ids([{**p, "id": "same"} for p in pairs[:2]])


def test_missing_dask_is_a_clear_error(cohort6, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match="regstation\\[cluster\\]"):
        cohort.run_batch(read_pairs_csv(cohort6)[:2], "iterative", FAST_PARAMS, dask_scheduler="local:2")


def test_a_pair_past_the_time_limit_becomes_a_timed_out_row_and_the_batch_goes_on(tmp_path):
    pairs = read_pairs_csv(make_cohort(tmp_path / "data", 3))
    slow = {"iterations": "100000", "levels": "1"}           # instance: minutes per pair without a limit
    t0 = time.monotonic()
    rows, summary = cohort.run_batch(pairs, "instance", slow, device="cpu", out_dir=tmp_path / "out",
                                     threads=1, timeout_s=1.0)
    assert time.monotonic() - t0 < 60
    assert [r["error"] for r in rows] == ["timed out: stopped after the per-pair time limit of 1 s"] * 3
    assert summary["failed"] == 3 and not list((tmp_path / "out" / "pairs").iterdir())
    # a limit the pairs stay within changes nothing
    rows, summary = cohort.run_batch(pairs, "iterative", FAST_PARAMS, out_dir=tmp_path / "ok", threads=1,
                                     timeout_s=120)
    assert summary["failed"] == 0 and all(r["dice_mean"] > r["before_dice_mean"] for r in rows[1:])


def test_the_time_limit_does_not_hide_a_user_cancel(tmp_path):
    import threading
    from app.engine.types import Cancelled
    pairs = read_pairs_csv(make_cohort(tmp_path / "data", 1))
    job = cohort.make_jobs(pairs, "instance", {"iterations": "100000", "levels": "1"}, device="cpu",
                           timeout_s=30)[0]
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    with pytest.raises(Cancelled):
        cohort.run_pair(job, cancel=stop)
    d = cohort.Deadline(0.05)
    assert not d.is_set() and (time.sleep(0.1) or d.is_set()) and d.expired
    with pytest.raises(ValueError, match="time limit"):
        cohort.make_jobs(pairs, "instance", timeout_s=-1)


def test_cli_pair_timeout(tmp_path):
    pairs = make_cohort(tmp_path / "data", 2)
    r = run("evaluate", "--pairs", pairs, "--paradigm", "instance", "--out", tmp_path / "out", "--threads", "1",
            "--device", "cpu", "--param", "iterations=100000", "--param", "levels=1", "--pair-timeout", "1",
            "--no-progress")
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "2 of 2 pairs failed" in r.stderr
    assert all("timed out" in x["error"] for x in table(tmp_path / "out"))
    r = run("evaluate", "--pairs", pairs, "--paradigm", "iterative", "--out", tmp_path / "o2", "--pair-timeout", "-1",
            *FAST)
    assert r.returncode != 0 and "--pair-timeout must be >= 0" in r.stderr
