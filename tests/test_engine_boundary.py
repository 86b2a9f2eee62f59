"""The engine and the viewer models run headless: importing them must not load Qt, VTK or
pyqtgraph."""
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _engine_modules():
    import app.engine
    import app.viewer
    names = ["app.engine", "app.viewer"]
    for pkg, prefix in ((app.engine, "app.engine."), (app.viewer, "app.viewer.")):
        for m in pkgutil.walk_packages(pkg.__path__, prefix):
            names.append(m.name)
    return names


def test_engine_imports_no_gui_modules():
    mods = _engine_modules()
    code = ("import sys\n"
            f"for m in {mods!r}: __import__(m)\n"
            "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('PySide6', 'PyQt5', 'PyQt6', 'vtk', 'vtkmodules', 'pyqtgraph')"
            " or k.startswith('app.widgets'))\n"
            "print(','.join(bad))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"engine imported GUI modules: {r.stdout.strip()}"
    assert len(mods) > 5
    # the packages split out of io.py and metrics.py are walked module by module
    for name in ("io.files", "io.images", "io.fields", "io.transforms", "io.landmarks", "io.manifests",
                 "io.describe", "metrics.similarity", "metrics.overlap", "metrics.deformation", "metrics._surfels",
                 "cards", "jsonsafe"):
        assert f"app.engine.{name}" in mods, name


def test_cards_and_io_do_not_import_torch():
    """Listing bundled checkpoints and their cards (the GUI's checkpoint row) and reading files must
    not pay for torch."""
    code = ("import sys\n"
            "import app.engine.cards as C, app.engine.io, app.engine.metrics, app.engine.jsonsafe\n"
            "C.bundled_path('unsupervised'); C.card_paths('x.pt')\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_registry_import_is_cheap():
    """Listing paradigms (what the GUI does at start-up) must not import torch."""
    code = ("import sys, app.engine.paradigms as p\n"
            "assert 'iterative' in p.available()\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
