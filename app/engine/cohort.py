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

Modules: this one holds the batch (:func:`run_batch`, its tables and summary);
:mod:`app.engine.cohort_pair` one pair (its job, :func:`run_pair`, its record, resume) and
:mod:`app.engine.cohort_executors` the three executors. Every name is re-exported here.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

# the rooms of a batch (see the module docstring); every name they hold is re-exported here
from .cohort_executors import (_DIED, _dask_client, _grouped, _init_pool_worker, _recovered,  # noqa: F401
                               _run_dask, _run_pool, _run_sequential, _stop_pool, available_cores)
from .cohort_pair import (_FIXED_CACHE, _IMAGE_SUFFIXES, _THREADS, MODES, PAIR_DIR, ROW_FILE,  # noqa: F401
                          Deadline, PairJob, _blank_row, _fixed_cached, _params_json, _replace_dir, _safe,
                          _stamp, _stem, _write_pair, clear_fixed_cache, configure_threads, error_message,
                          error_record, job_fingerprint, load_finished, make_jobs, pair_ids, run_pair)
from .types import ProgressFn


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
