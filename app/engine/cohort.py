"""Cohorts: register and measure many pairs, in parallel, where one bad pair never stops the batch.

One per-pair function, :func:`run_pair`, is run by three executors that give the same table
with one thread per pair (with more, SimpleITK's multithreaded sums make ``iterative`` vary in the
4th-5th decimal of Dice from run to run, whatever the executor):

* in this process, one pair after another (``workers=1``; progress callbacks and cancel work);
* a pool of ``workers`` local processes (``concurrent.futures.ProcessPoolExecutor``, "spawn"
  context: torch and fork do not mix), each with ``threads`` CPU threads so that
  ``workers x threads`` fits the cores;
* a Dask distributed cluster (``dask_scheduler="tcp://host:8786"``, or ``"local:N"`` for a local
  cluster of N worker processes). Dask is an optional extra, imported only here and only then.

Failure isolation: a pair that raises (unreadable file, bad parameter, out of memory) becomes a row
whose ``error`` column holds the message (``error`` is empty for pairs that succeeded). A worker
process that dies (killed by the OS, a crash in native code) is detected: if it was running alone,
its pair is the culprit and becomes an error row; if several pairs were in flight, they are run
again one at a time to find the culprit, so innocent pairs still get their results.

Outputs and resume: with ``out_dir``, every finished pair is written to ``out_dir/pairs/<id>/``
(``row.json``: its table row, full metrics and a fingerprint of the job; in ``register`` mode also
``warped.nii.gz``, ``transform.h5``, ``field.nii.gz``, ``metrics.json``). The folder is filled
under a temporary name and renamed into place when complete, so a batch killed at any moment never
leaves a half-written pair that looks finished. ``resume=True`` takes a pair as done when its
``row.json`` exists and its fingerprint (mode, paradigm, parameters, checkpoint, input paths)
matches; failed pairs are tried again. ``results.csv`` / ``results.json`` / ``summary.json`` are
written by the caller (rewritten as pairs finish, so a killed batch still shows its progress).

Many-to-one: a pair list may repeat the fixed image (an atlas). Each worker process keeps the last
fixed image it read (and its labels), keyed by path, size and modification time, and jobs are
dispatched grouped by fixed image, so an atlas is read once per worker rather than once per pair.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

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


def _init_pool_worker(threads: int) -> None:
    # Ctrl+C belongs to the caller, which stops the pool; a worker must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_threads(threads)


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


# --------------------------------------------------------------------------- executors
def available_cores() -> int:
    """CPU cores this process may use (affinity mask when the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _grouped(jobs: list[PairJob]) -> list[PairJob]:
    """Jobs ordered so that pairs sharing a fixed image follow each other (first appearance order)."""
    first: dict[str, int] = {}
    for j in jobs:
        first.setdefault(str(j.pair["fixed"]), len(first))
    return sorted(jobs, key=lambda j: (first[str(j.pair["fixed"])], j.index))


def _run_sequential(jobs, emit, pair_fn, progress, cancel) -> None:
    for job in jobs:
        check_cancel(cancel)
        emit(pair_fn(job, progress=progress, cancel=cancel) if pair_fn is run_pair else pair_fn(job))


_DIED = ("the worker process died while registering this pair (killed by the operating system, e.g. "
         "out of memory, or crashed in native code)")


def _stop_pool(pool, kill: bool) -> None:
    if kill:
        # a cancelled batch must stop now, not after the pairs in flight: end the workers
        for p in list((getattr(pool, "_processes", None) or {}).values()):
            try:
                p.terminate()
            except Exception:  # noqa: BLE001 - already gone
                pass
    pool.shutdown(wait=True, cancel_futures=True)


def _run_pool(jobs, emit, pair_fn, workers: int, threads: int, cancel) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    pending = deque(jobs)
    suspects: deque = deque()  # pairs in flight when a worker died: rerun alone to find the culprit
    while pending or suspects:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(threads,))
        inflight: dict = {}
        lost: list[PairJob] = []
        killed = True
        try:
            while (pending or suspects or inflight) and not lost:
                queue, limit = (suspects, 1) if suspects else (pending, workers)
                while queue and len(inflight) < limit:
                    job = queue.popleft()
                    inflight[pool.submit(pair_fn, job)] = job
                done, _ = wait(list(inflight), timeout=0.5, return_when=FIRST_COMPLETED)
                check_cancel(cancel)
                for fut in done:
                    job = inflight.pop(fut)
                    try:
                        emit(fut.result())
                    except BrokenProcessPool:
                        lost.append(job)
                    except Exception as e:  # noqa: BLE001 - e.g. a result that could not be sent back
                        emit(error_record(job, error_message(e)))
            killed = bool(lost)
        finally:
            _stop_pool(pool, kill=killed)
        if lost:
            lost += list(inflight.values())
            lost = [j for j in lost if not _recovered(j, emit)]
            if len(lost) == 1:
                emit(error_record(lost[0], _DIED))
            else:
                suspects.extend(sorted(lost, key=lambda j: j.index))


def _recovered(job: PairJob, emit) -> bool:
    """A pair caught in a dying pool may have finished and been written just before: take it."""
    rec = load_finished(job)
    if rec is None:
        return False
    rec["resumed"] = False
    emit(rec)
    return True


def _dask_client(address: str):
    try:
        from distributed import Client, LocalCluster
    except ImportError as e:
        raise ImportError("--dask-scheduler needs Dask distributed, which is not installed: "
                          "pip install 'regstation[cluster]' (or 'dask[distributed]')") from e
    if address.startswith("local:"):
        try:
            n = int(address.split(":", 1)[1])
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--dask-scheduler local:N needs a number of workers N >= 1, got {address!r}")
        import logging
        # the scheduler's own complaints (a worker died, keys lost) reach the caller as error rows
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=logging.CRITICAL)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="30s"), None
    except (OSError, TimeoutError) as e:
        raise ValueError(f"cannot reach the Dask scheduler at {address}: {e}") from e


def _run_dask(jobs, emit, pair_fn, address: str, cancel) -> None:
    client, cluster = _dask_client(address)
    from distributed import as_completed
    try:
        futures = {}
        n = len(jobs)
        token = uuid.uuid4().hex[:8]
        for order, job in enumerate(jobs):
            fut = client.submit(pair_fn, job, key=f"regstation-{job.pair_id}-{token}", pure=False,
                                priority=n - order, retries=0)
            futures[fut] = job
        ac = as_completed(list(futures))
        try:
            for fut in ac:
                job = futures[fut]
                try:
                    emit(fut.result())
                except Exception as e:  # noqa: BLE001 - KilledWorker, lost connection, ...
                    emit(error_record(job, f"the Dask worker failed or died while registering this pair: "
                                           f"{error_message(e)}"))
                check_cancel(cancel)
        finally:
            client.cancel([f for f in futures if not f.done()])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- the batch
def write_tables(out_dir, records: list[dict], summary: dict) -> None:
    """``results.csv`` (flat rows, ``error`` last), ``results.json`` (full metrics) and ``summary.json``."""
    from .evaluation import write_evaluation
    rows = [r["row"] for r in records]
    full = [r["metrics"] if r["metrics"] is not None else {"id": r["id"], "fixed": r["row"]["fixed"],
                                                           "moving": r["row"]["moving"], "error": r["error"]}
            for r in records]
    write_evaluation(out_dir, rows, full, summary)


def batch_summary(records: list[dict], total: int, paradigm: str, checkpoint=None, executor: str = "",
                  measure_options: Optional[dict] = None) -> dict:
    """Summary over the pairs that succeeded (:func:`~app.engine.evaluation.summarize`) plus counts.

    ``pairs``: pairs summarised (succeeded); ``pairs_total``; ``failed``; ``failed_pairs`` (id,
    fixed, moving, error); ``resumed``: pairs taken from an earlier run; ``pending``: not yet run.
    """
    from .evaluation import summarize
    ok = [r["row"] for r in records if not r["error"]]
    s = summarize(ok)
    failed = [{"id": r["id"], "fixed": r["row"]["fixed"], "moving": r["row"]["moving"], "error": r["error"]}
              for r in records if r["error"]]
    s.update(paradigm=paradigm, checkpoint=str(checkpoint) if checkpoint else None, pairs_total=total,
             failed=len(failed), failed_pairs=failed, resumed=sum(1 for r in records if r.get("resumed")),
             pending=total - len(records), executor=executor)
    s.update(measure_options or {})  # e.g. metric_style: which definitions the numbers follow
    return s


def run_batch(pairs: list[dict], paradigm: str, params=None, *, checkpoint=None, device: str = "auto",
              out_dir=None, mode: str = "evaluate", workers: int = 1, dask_scheduler: Optional[str] = None,
              threads: Optional[int] = None, resume: bool = False, measure_options: Optional[dict] = None,
              progress: Optional[ProgressFn] = None, cancel: Optional[threading.Event] = None,
              on_result: Optional[Callable[[dict, dict], None]] = None,
              pair_fn: Callable[[PairJob], dict] = run_pair,
              rewrite_every_s: float = 2.0, timeout_s: float = 0.0) -> tuple[list[dict], dict]:
    """Register (and measure) every pair of a manifest; failures become rows, never exceptions.

    Parameters
    ----------
    pairs : list of dict
        PAIRS.csv rows (:func:`~app.engine.io.read_pairs_csv`): absolute paths visible to every
        worker (a shared filesystem for a Dask cluster).
    paradigm, params, checkpoint, device
        Passed unchanged to :func:`~app.engine.evaluation.register_and_measure` for every pair.
    out_dir : path, optional
        Batch folder: ``pairs/<id>/`` per pair, ``results.csv``, ``results.json``, ``summary.json``.
    mode : "evaluate" | "register"
        "register" also writes each pair's warped image, transform and field (needs ``out_dir``).
    workers : int
        1: in this process; N > 1: a pool of N processes. Ignored when ``dask_scheduler`` is given.
    dask_scheduler : str, optional
        Address of a running Dask scheduler, or ``"local:N"`` for a local cluster of N workers.
    threads : int, optional
        CPU threads per running pair. Default: all cores in this process (untouched) for
        ``workers=1``; ``cores // workers`` for a pool or ``local:N``; 1 per Dask task otherwise.
    resume : bool
        Skip pairs whose ``out_dir/pairs/<id>/row.json`` exists with the same fingerprint.
    measure_options : dict, optional
        Extra keyword arguments of ``register_and_measure``.
    progress, cancel
        Per-iteration progress of the running pair (in-process only) and a cancel event (checked
        between pairs; a pool is stopped at once). Cancelling raises ``Cancelled``; pairs already
        finished stay in ``out_dir`` for ``resume``.
    on_result : callable(record, counts), optional
        Called in the caller's process after each pair (``counts``: done, failed, resumed, total).
    pair_fn : callable
        The per-pair function (a top-level function, picklable by reference); tests replace it.
    timeout_s : float
        Time limit per pair in seconds (0: none): a pair past it stops at its next cancellation check
        and becomes a failed row ("timed out"); the batch goes on (:class:`Deadline`).

    Returns
    -------
    (rows, summary)
        ``rows``: flat table rows in manifest order, with ``id`` and ``error`` (None when the pair
        succeeded); ``summary``: :func:`batch_summary` (metrics over the pairs that succeeded).
    """
    if not pairs:
        raise ValueError("the pair list is empty")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    cores = available_cores()
    if dask_scheduler:
        local_n = dask_scheduler.split(":", 1)[1] if dask_scheduler.startswith("local:") else None
        default_threads = max(1, cores // int(local_n)) if local_n and local_n.isdigit() and int(local_n) > 0 else 1
        executor = f"dask {dask_scheduler}"
    elif workers > 1:
        default_threads = max(1, cores // workers)
        executor = f"{workers} processes"
    else:
        default_threads = 0
        executor = "in process"
    n_threads = threads if threads is not None else default_threads
    jobs = make_jobs(pairs, paradigm, params, checkpoint=checkpoint, device=device, mode=mode, out_dir=out_dir,
                     threads=n_threads, measure_options=measure_options, timeout_s=timeout_s)
    if out_dir is not None:
        pdir = Path(out_dir) / PAIR_DIR
        pdir.mkdir(parents=True, exist_ok=True)
        for stale in list(pdir.glob(".tmp-*")) + list(pdir.glob(".old-*")):  # left by a killed batch
            shutil.rmtree(stale, ignore_errors=True)

    records: dict[int, dict] = {}
    counts = {"done": 0, "failed": 0, "resumed": 0, "total": len(jobs)}
    last_write = {"at": 0.0, "took": 0.0}

    def tables(final: bool) -> None:
        # rewritten as pairs finish so that a running or killed batch shows its progress; at most
        # every rewrite_every_s, and never more than ~5 % of the time for a very large cohort
        if out_dir is None:
            return
        now = time.monotonic()
        if not final and now - last_write["at"] < max(rewrite_every_s, 20.0 * last_write["took"]):
            return
        recs = [records[i] for i in sorted(records)]
        write_tables(out_dir, recs, batch_summary(recs, len(jobs), paradigm, checkpoint, executor, measure_options))
        last_write.update(at=time.monotonic(), took=time.monotonic() - now)

    def emit(rec: dict) -> None:
        records[rec["index"]] = rec
        counts["done"] += 1
        counts["failed"] += bool(rec["error"])
        counts["resumed"] += bool(rec.get("resumed"))
        if on_result is not None:
            on_result(rec, dict(counts))
        tables(final=False)

    todo = []
    for job in jobs:
        rec = load_finished(job) if resume else None
        if rec is not None:
            emit(rec)
        else:
            todo.append(job)
    todo = _grouped(todo)
    try:
        if not todo:
            pass
        elif dask_scheduler:
            _run_dask(todo, emit, pair_fn, dask_scheduler, cancel)
        elif workers > 1 and len(todo) > 1:
            _run_pool(todo, emit, pair_fn, min(workers, len(todo)), n_threads, cancel)
        else:
            configure_threads(n_threads)
            _run_sequential(todo, emit, pair_fn, progress, cancel)
    finally:
        tables(final=True)
    recs = [records[i] for i in sorted(records)]
    return [r["row"] for r in recs], batch_summary(recs, len(jobs), paradigm, checkpoint, executor, measure_options)
