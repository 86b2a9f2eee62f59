"""The command-line contract, as outside scripts use it (subprocesses, exit codes, files)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--param", "stages=rigid+affine", "--param", "metric=mse", "--no-progress"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def blob_pair(tmp: Path):
    """Two anisotropic, oblique ellipsoid phantoms with labels; moving shifted by 3 mm in x."""
    shape = (24, 28, 32)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    files = {}
    for name, shift in (("fixed", 0.0), ("moving", 3.0)):
        cx = 16 + shift / 1.5
        r = ((x - cx) / 9) ** 2 + ((y - 14) / 8) ** 2 + ((z - 12) / 7) ** 2
        img = (100 * (r < 1) + 50 * (r < 0.4)).astype(np.float32)
        lab = ((r < 1).astype(np.uint8) + (r < 0.4)).astype(np.uint8)
        for arr, suffix in ((img, ""), (lab, "_labels")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((1.5, 1.2, 2.0))
            im.SetOrigin((-20.0, 10.0, 5.0))
            d = sitk.VersorTransform((0, 0, 1), 0.2).GetMatrix()
            im.SetDirection(d)
            p = tmp / f"{name}{suffix}.nii.gz"
            sitk.WriteImage(im, str(p))
            files[name + suffix] = p
    return files


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return blob_pair(tmp_path_factory.mktemp("pair"))


def test_register_writes_contract_files(pair, tmp_path):
    out = tmp_path / "reg"
    r = run("register", pair["fixed"], pair["moving"], "--paradigm", "iterative", "--out", out,
            "--fixed-labels", pair["fixed_labels"], "--moving-labels", pair["moving_labels"], *FAST)
    assert r.returncode == 0, r.stderr
    for name in ("warped.nii.gz", "transform.h5", "metrics.json"):
        assert (out / name).is_file()
    m = json.loads((out / "metrics.json").read_text())
    for k in ("dice_mean", "dice_per_label", "hd95_mean", "tre_mean_mm", "fold_fraction", "sdlogj",
              "runtime_s", "device", "before"):
        assert k in m
    assert m["dice_mean"] > m["before"]["dice_mean"] + 0.05
    assert m["dice_mean"] > 0.85
    # the transform reproduces the warped image through SimpleITK itself
    f = sitk.ReadImage(str(pair["fixed"]), sitk.sitkFloat32)
    w = sitk.ReadImage(str(out / "warped.nii.gz"), sitk.sitkFloat32)
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    ref = sitk.Resample(sitk.ReadImage(str(pair["moving"]), sitk.sitkFloat32), f, tx, sitk.sitkLinear, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(w), sitk.GetArrayFromImage(ref), atol=1e-3)
    assert w.GetDirection() == pytest.approx(f.GetDirection())
    # fixed point -> moving point: the moving phantom sits 3 mm further along the image x axis
    centre = np.array(f.TransformContinuousIndexToPhysicalPoint((16, 14, 12)))
    mapped = np.array(tx.TransformPoint(tuple(centre)))
    expect = np.array(f.TransformContinuousIndexToPhysicalPoint((18, 14, 12)))
    assert np.linalg.norm(mapped - expect) < 1.0


def test_evaluate_writes_tables(pair, tmp_path):
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks", "moving_landmarks"])
        w.writerow([pair["fixed"], pair["moving"], pair["fixed_labels"], pair["moving_labels"], "", ""])
    out = tmp_path / "ev"
    r = run("evaluate", "--pairs", pairs, "--paradigm", "iterative", "--out", out, *FAST)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["pairs"] == 1 and s["dice_mean"] > s["before"]["dice_mean"]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 1 and float(rows[0]["dice_mean"]) == pytest.approx(s["dice_mean"])
    assert len(json.loads((out / "results.json").read_text())) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "text", "unknown_paradigm", "bad_param"])
def test_bad_input_gives_one_line_error(pair, tmp_path, case):
    fixed = pair["fixed"]
    args = ["--paradigm", "iterative"]
    if case == "missing":
        fixed = tmp_path / "nope.nii.gz"
    elif case == "empty":
        fixed = tmp_path / "empty.nii.gz"
        fixed.write_bytes(b"")
    elif case == "truncated":
        fixed = tmp_path / "trunc.nii.gz"
        fixed.write_bytes(Path(pair["fixed"]).read_bytes()[:300])
    elif case == "text":
        fixed = tmp_path / "notes.nii"
        fixed.write_text("this is not an image\n" * 50)
    elif case == "unknown_paradigm":
        args = ["--paradigm", "nosuchthing"]
    elif case == "bad_param":
        args += ["--param", "no_such_param=3"]
    out = tmp_path / "out"
    r = run("register", fixed, pair["moving"], *args, "--out", out, "--no-progress")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr + r.stdout
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error:")
    if case in ("missing", "empty", "truncated", "text"):
        assert Path(fixed).name in err[-1]
    if case == "unknown_paradigm":
        assert "nosuchthing" in err[-1]
    assert not out.exists() or not any(out.iterdir())


def test_landmark_count_mismatch_is_refused(pair, tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x,y,z\n0,0,0\n1,1,1\n")
    b.write_text("x,y,z\n0,0,0\n")
    r = run("register", pair["fixed"], pair["moving"], "--paradigm", "iterative", "--out", tmp_path / "o",
            "--fixed-landmarks", a, "--moving-landmarks", b, *FAST)
    assert r.returncode != 0 and "count" in r.stderr and "Traceback" not in r.stderr


def test_info_describes_geometry(pair):
    r = run("info", pair["fixed"])
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["spacing"] == pytest.approx([1.5, 1.2, 2.0])


def test_info_lists_paradigms():
    r = run("info", "--paradigms")
    assert r.returncode == 0 and "iterative" in r.stdout


IXI = ROOT.parent / "shared" / "data" / "ixi"


@pytest.mark.skipif(not (IXI / "t1").is_dir(), reason="IXI data not available")
def test_train_then_register_with_the_new_checkpoint(tmp_path):
    ck = tmp_path / "tiny.pt"
    tiny = ["grid=18x24x24", "spacing_mm=10", "enc=4,8,8", "dec=8,8", "max_train_subjects=2", "max_val_pairs=1",
            "val_every=0", "lncc_window=3", "dice_labels=8", "stage=joint", "threads=2"]
    r = run("train", "--paradigm", "weakly", "--out", ck, "--steps", "6", "--no-progress",
            *[x for p in tiny for x in ("--param", p)])
    assert r.returncode == 0, r.stderr
    assert "checkpoint written" in r.stdout and ck.is_file()
    demo = ROOT / "resources" / "demo"
    files = {"fixed": demo / "fixed_IXI174_T1.nii.gz", "moving": demo / "moving_IXI136_T1.nii.gz"}
    r = run("register", files["fixed"], files["moving"], "--paradigm", "weakly", "--checkpoint", ck,
            "--out", tmp_path / "reg", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "reg" / "warped.nii.gz").is_file()
    # the checkpoint is a weakly model: the unsupervised paradigm refuses it with one clear line
    r = run("register", files["fixed"], files["moving"], "--paradigm", "unsupervised", "--checkpoint", ck,
            "--out", tmp_path / "reg2", "--no-progress")
    assert r.returncode == 1 and r.stderr.startswith("error:") and "weakly" in r.stderr
    assert not (tmp_path / "reg2").exists()
    r = run("train", "--paradigm", "weakly", "--out", tmp_path / "x.pt", "--param", "grid=4x4")
    assert r.returncode == 1 and "grid" in r.stderr


def test_train_lists_its_options():
    r = run("train", "--list-options")
    assert r.returncode == 0 and "w_adv" in r.stdout and "dice_labels" in r.stdout
    from app.engine import paradigms
    for key in paradigms.trainable():          # every learned paradigm lists its own options
        r = run("train", "--paradigm", key, "--list-options")
        assert r.returncode == 0 and "steps = " in r.stdout and "ckpt_every" in r.stdout, (key, r.stderr)
    assert "dice_labels" in run("train", "--paradigm", "weakly", "--list-options").stdout
    assert "dice_labels" not in run("train", "--paradigm", "unsupervised", "--list-options").stdout
    r = run("train", "--paradigm", "iterative", "--list-options")
    assert r.returncode == 1 and "not trained" in r.stderr


def test_register_learn2reg_metrics_and_undefined_landmarks(pair, tmp_path):
    f = sitk.ReadImage(str(pair["fixed"]))
    pts = [f.TransformContinuousIndexToPhysicalPoint(ijk) for ijk in ((16, 14, 12), (12, 14, 12), (20, 12, 10))]
    moved = [f.TransformContinuousIndexToPhysicalPoint((i + 2, j, k)) for i, j, k in ((16, 14, 12), (12, 14, 12),
                                                                                   (20, 12, 10))]

    def markups(path, points, undefined=()):
        cps = [{"label": f"P{i + 1}", "position": [0.0, 0.0, 0.0] if i in undefined else list(p),
                "positionStatus": "undefined" if i in undefined else "defined"} for i, p in enumerate(points)]
        path.write_text(json.dumps({"markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": cps}]}))
        return path

    fl, ml = markups(tmp_path / "f.mrk.json", pts), markups(tmp_path / "m.mrk.json", moved, undefined=(1,))
    out = tmp_path / "reg"
    r = run("register", pair["fixed"], pair["moving"], "--paradigm", "iterative", "--out", out, "--metrics", "learn2reg",
            "--fixed-labels", pair["fixed_labels"], "--moving-labels", pair["moving_labels"],
            "--fixed-landmarks", fl, "--moving-landmarks", ml, *FAST)
    assert r.returncode == 0, r.stderr
    assert "'P2'" in r.stderr and "undefined" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["metric_style"] == "learn2reg"
    assert len(m["tre_per_point_mm"]) == 2 and m["tre_mean_mm"] < 1.5     # (0, 0, 0) would be ~100 mm off
    assert m["hd95_mean"] is not None


def test_convert_keeps_int16_and_converts_on_request(tmp_path):
    from test_io import _oblique_volume, _write_dicom_series
    _write_dicom_series(_oblique_volume(), tmp_path / "series")
    r = run("convert", tmp_path / "series", tmp_path / "kept.nii.gz")
    assert r.returncode == 0, r.stderr
    assert sitk.ReadImage(str(tmp_path / "kept.nii.gz")).GetPixelID() == sitk.sitkInt16
    r = run("convert", tmp_path / "series", tmp_path / "f.nii.gz", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert sitk.ReadImage(str(tmp_path / "f.nii.gz")).GetPixelID() == sitk.sitkFloat32
