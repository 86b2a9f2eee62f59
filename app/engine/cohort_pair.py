"""One pair of a cohort: its job, how a worker runs it, and the record it leaves.

* Jobs: :class:`PairJob` (everything a worker needs, picklable), :func:`make_jobs` (one per manifest
  row), :func:`pair_ids` (output folder names), :func:`job_fingerprint` (what ``resume`` compares) and
  :class:`Deadline` (the per-pair time limit as a cancel flag).
* Worker side: :func:`run_pair` registers and measures one pair and never raises for a bad pair (the
  error becomes its row: :func:`error_record`, :func:`error_message`); it writes ``out_dir/pairs/<id>/``
  under a temporary name and renames it into place (``row.json`` last). :func:`load_finished` reads a
  pair already done back for ``resume``. Each process keeps the last fixed image it read
  (:func:`_fixed_cached`) and its CPU threads (:func:`configure_threads`).

The executors that run these jobs are in :mod:`app.engine.cohort_executors`, the batch in
:mod:`app.engine.cohort` (which re-exports every name here).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .types import Cancelled, ProgressFn, check_cancel

MODES = ("evaluate", "register")
PAIR_DIR = "pairs"
ROW_FILE = "row.json"


# --------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class PairJob:
    """Everything a worker needs to run one pair (picklable; paths must be visible to the worker).

    Attributes
    ----------
    index : position of the pair in the manifest (rows are reported in this order).
    pair_id : name of its output folder ``out_dir/pairs/<pair_id>``.
    pair : the PAIRS.csv row (absolute paths: fixed, moving, fixed_labels, ... or None).
    paradigm : paradigm key, passed unchanged to :func:`~app.engine.evaluation.register_and_measure`.
    params : parameter overrides (dict, or a Params instance), passed unchanged as well.
    checkpoint, device : as for ``register_and_measure``.
    mode : "evaluate" (metrics only) or "register" (also the warped image, transform and field).
    out_dir : the batch folder, or None (nothing is written per pair).
    threads : CPU threads of the process running the pair (0: leave as they are).
    fingerprint : hash of what determines the result (see :func:`job_fingerprint`).
    measure_options : extra keyword arguments of ``register_and_measure``.
    timeout_s : a time limit for the pair in seconds (0: none); a pair that runs past it is stopped at
        its next cancellation check and reported as failed ("timed out"), the batch goes on.
    """

    index: int
    pair_id: str
    pair: dict
    paradigm: str
    params: Any = None
    checkpoint: Optional[str] = None
    device: str = "auto"
    mode: str = "evaluate"
    out_dir: Optional[str] = None
    threads: int = 0
    fingerprint: str = ""
    measure_options: dict = field(default_factory=dict)
    timeout_s: float = 0.0


class Deadline:
    """A cancel flag (duck-typed ``threading.Event.is_set``) that is also set once ``seconds`` have passed
    since it was made, or when ``outer`` (the batch's cancel event) is set: the per-pair time limit, checked
    wherever the engine checks for cancellation (every optimiser iteration, between stages)."""

    def __init__(self, seconds: float, outer: Optional[threading.Event] = None):
        self.seconds = float(seconds)
        self.outer = outer
        self.end = time.monotonic() + self.seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() > self.end

    def is_set(self) -> bool:
        return (self.outer is not None and self.outer.is_set()) or self.expired


def _params_json(params) -> Any:
    if params is None:
        return None
    if dataclasses.is_dataclass(params):
        return {"__class__": type(params).__qualname__, **dataclasses.asdict(params)}
    if isinstance(params, (list, tuple)):  # one per stage of a pipeline
        return [_params_json(p) for p in params]
    return dict(params)


def job_fingerprint(mode: str, pair: dict, paradigm: str, params, checkpoint, measure_options=None) -> str:
    """SHA-1 of what determines a pair's result (inputs by path; the files are trusted unchanged)."""
    blob = json.dumps({"mode": mode, "paradigm": paradigm, "params": _params_json(params),
                       "checkpoint": None if checkpoint is None else str(checkpoint),
                       "measure": measure_options or {},
                       "pair": {k: (None if v is None else str(v)) for k, v in sorted(pair.items())}},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def _stem(path) -> str:
    name = Path(str(path)).name
    for suf in _IMAGE_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:100] or "pair"


def pair_ids(pairs: list[dict]) -> list[str]:
    """One folder name per pair: the manifest's ``id`` column when present, else ``fixed--moving``.

    Derived names that collide (two different pairs whose files share names) get a hash of their
    paths appended; a pair listed twice gets ``-2``, ``-3``, ... Raises ValueError when an ``id``
    column repeats a value.
    """
    if pairs and all(str(p.get("id") or "").strip() for p in pairs):
        ids = [_safe(str(p["id"]).strip()) for p in pairs]
        seen: dict[str, int] = {}
        for i, k in enumerate(ids):
            if k in seen:
                raise ValueError(f"pairs {seen[k] + 1} and {i + 1} of the manifest share the id '{k}'; "
                                 f"ids name the output folders and must be unique")
            seen[k] = i
        return ids
    base = [_safe(f"{_stem(p['fixed'])}--{_stem(p['moving'])}") for p in pairs]
    keys = [(str(p["fixed"]), str(p["moving"])) for p in pairs]
    out, used = [], set()
    for b, key in zip(base, keys):
        name = b
        if sum(1 for bb, kk in zip(base, keys) if bb == b and kk != key):
            name = f"{b}-{hashlib.sha1(chr(0).join(key).encode()).hexdigest()[:8]}"
        k, n = name, 2
        while k in used:
            k, n = f"{name}-{n}", n + 1
        used.add(k)
        out.append(k)
    return out


def make_jobs(pairs: list[dict], paradigm: str, params=None, *, checkpoint=None, device: str = "auto",
              mode: str = "evaluate", out_dir=None, threads: int = 0,
              measure_options: Optional[dict] = None, timeout_s: float = 0.0) -> list[PairJob]:
    """PairJobs for the rows of a manifest (in manifest order)."""
    if not timeout_s >= 0:
        raise ValueError(f"the per-pair time limit must be >= 0 seconds, got {timeout_s!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "register" and out_dir is None:
        raise ValueError("register mode writes the warped images: it needs an output folder")
    ids = pair_ids(pairs)
    ck = None if checkpoint is None else str(checkpoint)
    mo = dict(measure_options or {})
    return [PairJob(index=i, pair_id=ids[i], pair=dict(p), paradigm=paradigm, params=params, checkpoint=ck,
                    device=device, mode=mode, out_dir=None if out_dir is None else str(out_dir), threads=threads,
                    fingerprint=job_fingerprint(mode, p, paradigm, params, ck, mo), measure_options=mo,
                    timeout_s=float(timeout_s))
            for i, p in enumerate(pairs)]


# --------------------------------------------------------------------------- worker side
_THREADS: dict[str, Any] = {"n": None, "torch": False}


def configure_threads(n: int) -> None:
    """Use ``n`` CPU threads in this process: OpenMP/MKL (torch) and SimpleITK; 0 leaves them be.

    Environment variables cover libraries imported later (torch reads OMP_NUM_THREADS when it
    starts); torch is told directly once it is imported (this is called before every pair).
    """
    if not n or n < 1:
        return
    torch = sys.modules.get("torch")
    if _THREADS["n"] == n and (torch is None or _THREADS["torch"]):
        return
    if _THREADS["n"] != n:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
            os.environ[var] = str(n)
        import SimpleITK as sitk
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    _THREADS.update(n=n, torch=torch is not None)


_FIXED_CACHE: dict[str, Any] = {"key": None, "value": None}


def _stamp(path) -> Optional[tuple]:
    if not path:
        return None
    st = os.stat(path)
    return (str(path), st.st_mtime_ns, st.st_size)


def _fixed_cached(pair: dict):
    """The pair's fixed image and fixed labels, from this process's one-entry cache when unchanged.

    Returns (fixed Volume, fixed LabelMap or None, True when it came from the cache).
    """
    from . import io
    key = (_stamp(pair["fixed"]), _stamp(pair.get("fixed_labels")))
    if _FIXED_CACHE["key"] == key:
        return (*_FIXED_CACHE["value"], True)
    _FIXED_CACHE.update(key=None, value=None)  # drop the old atlas before reading the next
    fixed = io.read_volume(pair["fixed"])
    labels = io.read_labels(pair["fixed_labels"], reference=fixed) if pair.get("fixed_labels") else None
    _FIXED_CACHE.update(key=key, value=(fixed, labels))
    return fixed, labels, False


def clear_fixed_cache() -> None:
    """Forget the cached fixed image of this process."""
    _FIXED_CACHE.update(key=None, value=None)


def error_message(exc: BaseException) -> str:
    """One line for the ``error`` column: ValueErrors as they are (they name what was wrong), other
    exceptions prefixed with their type."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in msg.lower():
        return f"out of memory: {msg}"
    return msg if isinstance(exc, ValueError) else f"{type(exc).__name__}: {msg}"


def _blank_row(job: PairJob) -> dict:
    from .evaluation import _flat_row
    row = {k: None for k in _flat_row("", "", {"before": {}})}
    row.update(fixed=str(job.pair["fixed"]), moving=str(job.pair["moving"]))
    return {"id": job.pair_id, **row, "error": None}


def error_record(job: PairJob, message: str) -> dict:
    """The record of a pair that failed: its row with every metric empty and ``error`` set."""
    row = _blank_row(job)
    row["error"] = message
    return {"index": job.index, "id": job.pair_id, "row": row, "metrics": None, "error": message,
            "resumed": False, "pid": None, "fixed_from_cache": False, "wall_s": None}


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final`` (replacing an older ``final``)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _write_pair(job: PairJob, record: dict, result) -> None:
    from .evaluation import write_json, write_registration
    pairs = Path(job.out_dir) / PAIR_DIR
    pairs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{job.pair_id}-", dir=pairs))
    try:
        if job.mode == "register":
            write_registration(tmp, result, record["metrics"])
        elif getattr(result, "error_map", None) is not None:     # evaluate --error-map: keep the map
            from . import io
            io.write_volume(result.error_map, tmp / "error_map.nii.gz")
        # row.json last: its presence in the final folder is what marks the pair as done
        write_json({"id": job.pair_id, "fingerprint": job.fingerprint, "mode": job.mode,
                    "row": record["row"], "metrics": record["metrics"]}, tmp / ROW_FILE)
        _replace_dir(tmp, pairs / job.pair_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_pair(job: PairJob, progress: Optional[ProgressFn] = None,
             cancel: Optional[threading.Event] = None) -> dict:
    """Register and measure one pair; write its outputs; never raise for a bad pair.

    Returns a record ``{"index", "id", "row" (flat table row with ``id`` and ``error``),
    "metrics" (full metrics of ``register_and_measure``, None on failure), "error" (None or the
    message), "pid", "fixed_from_cache", "wall_s"}``. :class:`~app.engine.types.Cancelled` (and
    KeyboardInterrupt) propagate: cancelling is not a failure of the pair.
    """
    from .evaluation import _flat_row, load_pair, register_and_measure
    t0 = time.perf_counter()
    configure_threads(job.threads)
    cached = False
    outer = cancel
    if job.timeout_s > 0:
        cancel = Deadline(job.timeout_s, outer)
    try:
        check_cancel(cancel)
        fixed, fixed_labels, cached = _fixed_cached(job.pair)
        data = load_pair(job.pair, fixed=fixed, fixed_labels=fixed_labels)
        result, m = register_and_measure(job.paradigm, data["fixed"], data["moving"], job.params,
                                         checkpoint=job.checkpoint, device=job.device, progress=progress,
                                         cancel=cancel, fixed_labels=data["fixed_labels"],
                                         moving_labels=data["moving_labels"], fixed_points=data["fixed_points"],
                                         moving_points=data["moving_points"],
                                         guide_fixed_points=data.get("guide_fixed_points"),
                                         guide_moving_points=data.get("guide_moving_points"), **job.measure_options)
        row = {"id": job.pair_id, **_flat_row(str(job.pair["fixed"]), str(job.pair["moving"]), m), "error": None}
        record = {"index": job.index, "id": job.pair_id, "row": row,
                  "metrics": {"id": job.pair_id, "fixed": str(job.pair["fixed"]), "moving": str(job.pair["moving"]),
                              **m, "error": None},
                  "error": None}
        check_cancel(cancel)
        if job.out_dir is not None:
            _write_pair(job, record, result)
    except Cancelled:
        if not (isinstance(cancel, Deadline) and cancel.expired and not (outer is not None and outer.is_set())):
            raise
        record = error_record(job, f"timed out: stopped after the per-pair time limit of {job.timeout_s:g} s")
    except Exception as e:  # noqa: BLE001 - one bad pair must not stop the batch
        record = error_record(job, error_message(e))
    record.update(resumed=False, pid=os.getpid(), fixed_from_cache=cached, wall_s=time.perf_counter() - t0)
    return record


def load_finished(job: PairJob) -> Optional[dict]:
    """The record of a pair already done in ``job.out_dir`` with the same fingerprint, else None."""
    if job.out_dir is None:
        return None
    p = Path(job.out_dir) / PAIR_DIR / job.pair_id / ROW_FILE
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if d.get("fingerprint") != job.fingerprint or not isinstance(d.get("row"), dict):
        return None
    return {"index": job.index, "id": job.pair_id, "row": d["row"], "metrics": d.get("metrics"), "error": None,
            "resumed": True, "pid": None, "fixed_from_cache": False, "wall_s": None}
