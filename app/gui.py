"""Start the RegStation workstation (cheap to import: Qt, VTK and torch load inside :func:`run`).

    python main.py                                            the bundled demo pair
    python main.py FIXED MOVING [--fixed-labels F] [--moving-labels F]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "resources" / "demo"
IXI_FALLBACK = Path("/work/shared/data/ixi")


def demo_pair(demo_dir: Path = DEMO_DIR) -> dict:
    """Paths of the bundled demo pair: {'fixed', 'moving', 'fixed_labels', 'moving_labels'}.

    Files are found by name in ``resources/demo`` (``fixed*`` / ``moving*``, labels by 'label' or
    'seg' in the name); missing entries are left out.
    """
    out: dict[str, Path] = {}
    images = sorted(p for p in demo_dir.glob("*") if p.name.endswith((".nii", ".nii.gz", ".nrrd", ".mha")))
    for role in ("fixed", "moving"):
        mine = [p for p in images if p.name.lower().startswith(role)]
        labels = [p for p in mine if "label" in p.name.lower() or "seg" in p.name.lower()]
        plain = [p for p in mine if p not in labels]
        if plain:
            out[role] = plain[0]
        if labels:
            out[f"{role}_labels"] = labels[0]
    if "fixed" not in out or "moving" not in out:
        t1, seg = IXI_FALLBACK / "t1", IXI_FALLBACK / "seg"
        for role, subj in (("fixed", "IXI012-HH-1211"), ("moving", "IXI013-HH-1212")):
            if (t1 / f"{subj}_T1.nii.gz").exists():
                out[role] = t1 / f"{subj}_T1.nii.gz"
                if (seg / f"{subj}_T1_DLMUSE.nii.gz").exists():
                    out[f"{role}_labels"] = seg / f"{subj}_T1_DLMUSE.nii.gz"
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="main.py", description="RegStation workstation. Without files it "
                                "opens the bundled demo pair, ready to register.")
    p.add_argument("fixed", nargs="?", help="fixed image (NIfTI, NRRD, MHA, ...)")
    p.add_argument("moving", nargs="?", help="moving image")
    p.add_argument("--fixed-labels", help="label map of the fixed image")
    p.add_argument("--moving-labels", help="label map of the moving image")
    p.add_argument("--session", help="open a saved session instead")
    a = p.parse_args(argv)
    if (a.fixed is None) != (a.moving is None):
        p.error("give both FIXED and MOVING, or neither (for the demo pair)")
    return a


def _install_excepthook(window) -> None:
    """Unexpected exceptions in Qt callbacks become a message box instead of a silent failure."""
    import traceback
    previous = sys.excepthook

    def hook(etype, value, tb):
        traceback.print_exception(etype, value, tb)
        try:
            window.show_error("Unexpected error", f"{etype.__name__}: {value}")
        except Exception:  # noqa: BLE001
            previous(etype, value, tb)
    sys.excepthook = hook


def run(argv: list[str]) -> int:
    """Parse ``argv`` (without the program name), show the main window, run the event loop."""
    a = parse_args(list(argv))
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "regstation"])
    app.setApplicationName("RegStation")
    app.setOrganizationName("RegStation")
    from app.widgets.main_window import MainWindow

    window = MainWindow()
    _install_excepthook(window)
    window.show()
    app.processEvents()
    if a.session:
        window.open_session(a.session)
    elif a.fixed:
        window.load_pair(a.fixed, a.moving, a.fixed_labels, a.moving_labels)
    else:
        demo = demo_pair()
        if "fixed" in demo and "moving" in demo:
            window.load_pair(demo["fixed"], demo["moving"], demo.get("fixed_labels"), demo.get("moving_labels"))
        else:
            window.show_error("Demo data missing", f"No demo pair found in {DEMO_DIR}. Open files with File > Open.")
    if not window.isVisible():
        # closed while the first files were being read (the event loop ran meanwhile): a quit
        # requested before exec() would be lost and leave an invisible process behind
        return 0
    return app.exec()
