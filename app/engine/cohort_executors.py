"""The executors of a cohort batch: the same per-pair function run in this process, in a pool of local
processes, or on a Dask cluster, each calling ``emit(record)`` once per pair in the caller's process.

* :func:`_run_sequential`: one pair after another (progress callbacks and cancel reach the pair);
* :func:`_run_pool`: ``ProcessPoolExecutor`` ("spawn") of ``workers`` processes with ``threads`` CPU
  threads each; a worker that dies is found out (alone: its pair is the culprit and becomes an error
  row; several in flight: they are run again one at a time), a cancel ends the workers at once;
* :func:`_run_dask`: a Dask distributed scheduler (``tcp://...`` or ``local:N``), imported only here.

:func:`_grouped` orders the jobs so that pairs sharing a fixed image (an atlas) follow each other;
:func:`available_cores` is what the batch divides between workers.
"""
from __future__ import annotations

import os
import signal
import uuid
from collections import deque

from .cohort_pair import (PairJob, configure_threads, error_message, error_record, load_finished,
                          run_pair)
from .types import check_cancel


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


def _init_pool_worker(threads: int) -> None:
    # Ctrl+C belongs to the caller, which stops the pool; a worker must not die half-way on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_threads(threads)


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
