"""The one JSON sanitiser: every engine value becomes strict JSON."""
import json
import math
from pathlib import Path

import numpy as np
import torch

from app.engine.jsonsafe import to_jsonable


def test_numpy_paths_tuples_and_nonfinite_become_strict_json():
    obj = {1: (np.float32(0.5), np.int64(3), np.bool_(True)), "p": Path("/a/b.nii.gz"),
           "arr": np.array([[1.0, np.nan], [np.inf, -2.0]]), "nan": float("nan"), "s": {"x"},
           "t": torch.tensor([1.5, float("-inf")]), "none": None}
    out = to_jsonable(obj)
    assert out == {"1": [0.5, 3, True], "p": "/a/b.nii.gz", "arr": [[1.0, None], [None, -2.0]], "nan": None,
                   "s": ["x"], "t": [1.5, None], "none": None}
    assert type(out["1"][1]) is int and type(out["1"][2]) is bool
    json.dumps(out, allow_nan=False)   # strict JSON: would raise on NaN


def test_nonfinite_kept_when_asked():
    out = to_jsonable({"v": np.float64("nan"), "w": (np.float32(np.inf),)}, nonfinite_to_none=False)
    assert math.isnan(out["v"]) and out["w"] == [math.inf] and type(out["v"]) is float
