"""Persistence: session save / restore (JSON), saving results, landmark autosave, file roles.

A session file holds the workspace (:class:`app.viewer.workspace.Workspace`): the image and label
files (paths relative to the session file when they are below it, absolute otherwise), cursor,
overlay settings, window/levels, per-view cameras, the landmark pairs, the guide pairs of a
landmark-guided correction and the run history (name,
time, paradigm, parameters, checkpoint, pipeline stages, metrics). Each run's transform is
written next to the session, compactly (``<stem>_runs/run<i>.npz``, see
:mod:`app.viewer.transform_store`; older sessions' ``.h5`` files are still read), so that
restoring recomputes the warped image instead of storing it.

Landmarks are autosaved by the landmark panel on every change, to ``<session>.landmarks.json``
(:func:`landmarks_autosave_path`; the window's autosave folder before a session is saved), so
they are never silently lost.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .main_window import MainWindow

FORMAT = "regstation-session"
LANDMARK_SUFFIXES = (".fcsv", ".mrk.json", ".csv", ".txt")
VERSION = 1


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return repr(o)


def _write_json_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    os.replace(tmp, path)


def _rel(p: str, base: Path) -> str:
    try:
        return os.path.relpath(p, base) if Path(p).resolve().is_relative_to(base.resolve()) else str(p)
    except ValueError:
        return str(p)


def _abs(p: str, base: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (base / q)


def session_dict(win: "MainWindow", path: Path) -> dict:
    """Everything a session file stores (transforms of runs are written by :func:`save_session`)."""
    st = win.state
    base = path.parent
    d = {
        "format": FORMAT, "version": VERSION,
        "files": {role: _rel(p, base) for role, p in st.paths.items()},
        "cursor": [float(c) for c in st.cursor],
        "overlay": dataclasses.asdict(st.overlay),
        "windows": {k: list(v) for k, v in st.windows.items()},
        "views": {o: v.view_state() for o, v in win.slice_views.items()},
        "view3d": win.view3d.view_state(),
        "runs": [],
        "current_run": win.workspace.runs.current,
        "landmarks": win.workspace.landmarks.to_dict(),
        "guides": win.workspace.guides.to_dict(),
    }
    if win.label_table_path:
        d["label_table"] = _rel(win.label_table_path, base)
    if win.metrics_panel is not None:
        d["label_names"] = dict(win.metrics_panel.label_names)
    return d


def session_snapshot(win: "MainWindow", path) -> tuple[dict, list]:
    """GUI thread: the session dictionary and ``[(run index, run, result)]`` to write."""
    path = Path(path)
    d = session_dict(win, path)
    return d, [(i, run, run["result"]) for i, run in enumerate(win.runs)]


def write_session(snapshot: tuple[dict, list], path) -> Path:
    """Any thread: write the session JSON and its runs' transforms (compactly: see
    :mod:`app.viewer.transform_store`); each run keeps its paradigm, parameters, checkpoint and
    pipeline stages. Run files the session no longer has are removed."""
    from app.viewer.transform_store import write_transform_compact
    d, runs = snapshot
    path = Path(path)
    run_dir = path.with_name(path.stem + "_runs")
    written = set()
    for i, run, res in runs:
        if res is None:
            d["runs"].append({"name": run["name"], "time": run["time"], "transform": None, "summary": {},
                              "metrics": run["metrics"]})
            continue
        tfile = run_dir / f"run{i + 1}.npz"
        write_transform_compact(res.transform, tfile)
        written.add(tfile.name)
        d["runs"].append({"name": run["name"], "time": run["time"], "transform": _rel(str(tfile), path.parent),
                          "summary": res.summary(), "stages": run.stages, "metrics": run["metrics"]})
    _write_json_atomic(d, path)
    if run_dir.is_dir():        # transforms of runs this session no longer has
        for old in run_dir.glob("run*.*"):
            if old.name not in written and old.suffix in (".npz", ".h5"):
                old.unlink()
    return path


def save_session(win: "MainWindow", path) -> Path:
    """Write the session of ``win`` to ``path`` (on this thread)."""
    return write_session(session_snapshot(win, path), path)


def load_session(win: "MainWindow", path) -> None:
    """Restore a session into ``win``. Files that fail to load are reported and skipped."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"not a readable session file: {e}") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"not a RegStation session (format '{d.get('format') if isinstance(d, dict) else '?'}')")
    if int(d.get("version", 0)) > VERSION:
        raise ValueError(f"session version {d.get('version')} is newer than this program ({VERSION})")
    base = path.parent
    st = win.state
    win.unload_all(ask=False)           # nothing of the previous work may mix with the session's
    for role in ("fixed", "moving", "fixed_labels", "moving_labels"):
        if role in d.get("files", {}):
            win.load_layer(role, _abs(d["files"][role], base), wait=True)
    ov = {k: v for k, v in d.get("overlay", {}).items() if k in {f.name for f in dataclasses.fields(st.overlay)}}
    if ov:
        st.set_overlay(**ov)
    for layer, wl in d.get("windows", {}).items():
        if getattr(st, layer, None) is not None:
            st.set_window(layer, *wl)
    if "cursor" in d:
        st.set_cursor(d["cursor"])
    if "landmarks" in d:
        win.workspace.landmarks.from_dict(d["landmarks"])
    if d.get("guides"):
        win.workspace.guides.from_dict(d["guides"])
    _restore_runs(win, d, base)
    if win.metrics_panel is not None:
        names = d.get("label_names") or (d.get("metrics_panel") or {}).get("label_names") or {}
        win.metrics_panel.set_label_names(names)
    if d.get("label_table"):
        win.load_colour_table(_abs(d["label_table"], base))
    cur = d.get("current_run")
    if cur is not None and 0 <= int(cur) < len(win.runs):
        win.select_run(int(cur))
    for v in win.slice_views.values():
        v.flush()
    for o, vs in d.get("views", {}).items():
        if o in win.slice_views:
            win.slice_views[o].set_view_state(vs)
    if "view3d" in d:
        win.view3d.set_view_state(d["view3d"])


def rebuild_runs(runs: list[dict], base: Path, fixed, moving) -> list[tuple[dict, object, str]]:
    """Any thread: each saved run's result rebuilt from its transform (warped = moving resampled
    on the fixed grid). Returns ``[(run dict, RegistrationResult or None, error or "")]``."""
    from app.engine import io, spatial
    from app.engine.types import RegistrationResult
    from app.viewer.transform_store import read_transform_compact
    out = []
    for r in runs:
        try:
            if not r.get("transform"):
                raise ValueError("no transform was saved for this run")
            tpath = _abs(r["transform"], base)
            t = read_transform_compact(tpath) if tpath.suffix == ".npz" else io.read_transform(str(tpath))
            s = r.get("summary", {})
            res = RegistrationResult(transform=t, warped=spatial.resample(moving, fixed, t),
                                     timings=s.get("timings", {}), device=s.get("device", "cpu"),
                                     paradigm=s.get("paradigm", ""), params=s.get("params", {}),
                                     checkpoint_id=s.get("checkpoint"))
            if r.get("stages") or s.get("stages"):
                res.stages = r.get("stages") or s.get("stages")
            out.append((r, res, ""))
        except Exception as e:  # noqa: BLE001 - a missing run file must not stop the session
            out.append((r, None, str(e)))
    return out


def _restore_runs(win: "MainWindow", d: dict, base: Path) -> None:
    """Rebuild the runs on the window's engine thread, then list them."""
    st = win.state
    if not d.get("runs") or st.fixed is None or st.moving is None:
        return
    rebuilt = win.engine.call(rebuild_runs, d["runs"], base, st.fixed, st.moving, name="restore runs")
    failed = []
    for r, res, err in rebuilt:
        if err:
            failed.append(f"{r.get('name', '?')}: {err}")
        # a run that failed is kept without a result: its metrics stay readable
        win.workspace.runs.add(res, r.get("metrics", {}), r.get("name") or "?", select=False, time=r.get("time"))
    if failed:
        win.show_error("Some runs could not be restored", "\n".join(failed))


def landmarks_autosave_path(win: "MainWindow") -> Path:
    """Where the landmark panel autosaves: next to the session file, else in the autosave folder."""
    if win.session_path is not None:
        return win.session_path.with_name(win.session_path.stem + ".landmarks.json")
    return Path(win.autosave_dir) / "landmarks.json"


def guides_autosave_path(win: "MainWindow") -> Path:
    """Where the guide pairs (landmark-guided correction) are autosaved: beside the landmarks'
    autosave, ``<session>.guides.json`` (``guides.json`` in the autosave folder)."""
    p = landmarks_autosave_path(win)
    name = p.name[:-len("landmarks.json")] + "guides.json" if p.name.endswith("landmarks.json") else p.stem + ".guides.json"
    return p.with_name(name)


def keep_previous_autosave(path: Path) -> Path | None:
    """Move an autosave file that holds landmarks to ``*.previous.json`` (so a new session does
    not overwrite landmarks a crashed or unsaved session left behind). Returns the new path."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(d, dict) and d.get("pairs")):
        return None
    backup = path.with_name(path.name.replace(".json", "") + ".previous.json")
    os.replace(path, backup)
    return backup


def results_snapshot(win: "MainWindow") -> dict:
    """GUI thread: what :func:`write_results` writes (ValueError without a result)."""
    st = win.state
    if st.result is None:
        raise ValueError("there is no registration result to save; run a registration first")
    cur = win.workspace.runs.current_run
    lm = win.workspace.landmarks
    return {"result": st.result, "metrics": cur.metrics if cur is not None else {}, "fixed": st.fixed,
            "landmarks": {"fixed": lm.fixed_landmarks(), "moving": lm.moving_landmarks()},
            "runs": [{"name": r["name"], "summary": r["result"].summary() if r["result"] is not None else {},
                      "metrics": r["metrics"]} for r in win.runs]}


def write_results(snap: dict, folder) -> list[Path]:
    """Any thread: the current run's warped image, transform (.h5, plus .tfm when linear),
    displacement field (mm, LPS; computed from the transform when the run has none), warped
    labels, landmarks (.mrk.json) and metrics (JSON, plus the history of all runs)."""
    from app.engine import io, spatial
    from app.engine.evaluation import write_json, write_registration
    res = snap["result"]
    out = Path(folder)
    written = list(write_registration(out, res, snap["metrics"]))
    if res.transform.is_linear:
        io.write_transform(res.transform, out / "transform.tfm")
        written.append(out / "transform.tfm")
    if res.field is None and snap["fixed"] is not None:
        io.write_field(spatial.transform_to_field(res.transform, snap["fixed"]), out / "field.nii.gz")
        written.append(out / "field.nii.gz")
    for which, lms in snap["landmarks"].items():
        if len(lms):
            io.write_landmarks(lms, out / f"{which}_landmarks.mrk.json")
            written.append(out / f"{which}_landmarks.mrk.json")
    write_json({"runs": snap["runs"]}, out / "runs.json")
    written.append(out / "runs.json")
    return written


def save_results(win: "MainWindow", folder) -> list[Path]:
    """Write the current run of ``win`` into ``folder`` (on this thread)."""
    return write_results(results_snapshot(win), folder)


def is_label_name(name: str) -> bool:
    """Whether a file name looks like a label map ('label', 'seg', 'mask', ...)."""
    n = name.lower()
    return any(k in n for k in ("label", "seg", "mask", "aseg", "parc", "dlmuse"))


def guess_roles(images: list[Path], state) -> list[tuple[str, Path]]:
    """Guess the layer of each dropped image file: 'fixed' / 'moving' in the name when present,
    label maps by name, otherwise the order of the files (first fixed, then moving), preferring
    layers that are still empty."""
    roles: dict[str, Path] = {}
    rest = []
    for p in images:
        n = Path(p).name.lower()
        side = "fixed" if "fixed" in n else "moving" if "moving" in n else None
        role = None if side is None else side + ("_labels" if is_label_name(n) else "")
        if role is not None and role not in roles:
            roles[role] = Path(p)
        else:
            rest.append(Path(p))
    for p in rest:
        kinds = ("fixed_labels", "moving_labels") if is_label_name(p.name) else ("fixed", "moving")
        free = [r for r in kinds if r not in roles and getattr(state, r) is None]
        taken = [r for r in kinds if r not in roles]
        if free or taken:
            roles[(free or taken)[0]] = p
    return list(roles.items())
