"""Typed Params: tuple fields parsed from "4,2,1", validated per element, shown as "4,2,1"."""
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.engine.paradigms import format_number_list, make_params, param, parse_number_list, validate_params
from app.engine.paradigms.instance import InstanceParams

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class _P:
    shrink: tuple[int, ...] = param((4, 2, 1), "factors", range=(1, 8))
    sigmas: tuple[float, ...] = param((1.5, 0.0), "mm", range=(0.0, 10.0))
    name: str = param("x", "a string stays a string")


def test_parse_number_list():
    assert parse_number_list("4,2,1") == (4, 2, 1)
    assert parse_number_list(" 4, 2 ,1 ") == (4, 2, 1)
    assert parse_number_list("(4, 2, 1)") == (4, 2, 1) and parse_number_list("[4 2 1]") == (4, 2, 1)
    assert parse_number_list("2.0", int) == (2,) and parse_number_list(3) == (3,)
    assert parse_number_list([1, 2.5], float) == (1.0, 2.5)
    assert parse_number_list("1e-3,2", float) == (0.001, 2.0)
    with pytest.raises(ValueError, match="levels.*'4,x'"):
        parse_number_list("4,x", int, "levels")
    with pytest.raises(ValueError, match="levels"):
        parse_number_list("2.5", int, "levels")
    with pytest.raises(ValueError, match="at least one"):
        parse_number_list(" , ", int, "levels")
    assert format_number_list((4, 2, 1)) == "4,2,1" and format_number_list((1.5, 0.0)) == "1.5,0"
    assert parse_number_list(format_number_list((0.25, 3.0)), float) == (0.25, 3.0)


def test_make_params_parses_and_validates_tuples():
    p = make_params(_P, {"shrink": "8,4", "sigmas": "2, 1", "name": "4,2"})
    assert p.shrink == (8, 4) and p.sigmas == (2.0, 1.0) and p.name == "4,2"
    assert make_params(_P, {"shrink": [2, 1]}).shrink == (2, 1)           # JSON lists come back as tuples
    with pytest.raises(ValueError, match=r"shrink='16,2' \(element 16\) is outside its range \[1, 8\]"):
        make_params(_P, {"shrink": "16,2"})
    with pytest.raises(ValueError, match="shrink"):
        make_params(_P, {"shrink": "4,two"})
    with pytest.raises(ValueError, match="outside its range"):
        validate_params(_P(sigmas=(1.0, -1.0)))
    ip = make_params(InstanceParams, {"levels": "2,1", "iterations": "5"})
    assert ip.levels == (2, 1) and ip.iterations == (5,)
    assert json.loads(json.dumps(ip.__dict__))["levels"] == [2, 1]


def test_info_shows_tuples_as_comma_lists():
    out = subprocess.run([sys.executable, "main.py", "info", "--paradigms"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.strip().startswith("levels = 4,2,1"))
    assert "range (1, 32)" in line
