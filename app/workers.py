"""The only bridge between Qt threads and the engine.

The engine reports through plain callbacks (``progress(Progress)``) and stops when a
``threading.Event`` is set. Every engine call the GUI makes (registration runs, checkpoint
probes, the CUDA check, reading and writing files) goes through one :class:`Engine`: a QObject
on the GUI thread that owns **one long-lived QThread**, started once and stopped (quit + wait)
when its owner closes. Requests queue there and run one at a time, so torch work never runs on
a short-lived thread (torch's OpenMP pool and a thread torn down under it corrupted the heap).

Ownership is fixed for the whole life of an engine, and no QObject is created per request:

* ``Engine`` lives on the GUI thread (a child of the window when one is given);
* its ``_EngineWorker`` lives on the engine thread; both the worker and the QThread are kept
  in the module-level ``_LIVE`` list until :meth:`Engine.shutdown` has waited for the thread,
  so Qt never destroys a running thread or a QObject that another thread is using;
* a request is a plain Python :class:`Job`; the worker hands it back through the engine's
  queued signals, and the engine calls the job's Python callbacks on the GUI thread.

Every exception becomes a one-line ``on_error(message)`` (the traceback goes to the log), and
running out of memory (``MemoryError``, torch's CUDA OOM) reads ``"out of memory: ..."``.

* :class:`RegistrationRun` runs :func:`app.engine.evaluation.register_and_measure` on an engine,
  with Qt signals (emitted on the GUI thread) for the registration panel.
* :func:`default_engine` is the application's shared engine for widgets used without a window.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import traceback
from typing import Any, Callable, Optional

from PySide6.QtCore import QCoreApplication, QObject, QThread, Signal, Slot

log = logging.getLogger(__name__)

# (engine, thread, worker) of every engine whose thread has not been waited for yet
_LIVE: list = []
_DEFAULT: Optional["Engine"] = None
_ids = itertools.count(1)


def error_message(exc: BaseException) -> str:
    """One line for the user: the exception's first line, prefixed by its type unless it is a
    plain ValueError (the engine's documented input errors), ``out of memory: ...`` for OOM."""
    text = " ".join(str(exc).split()) if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, MemoryError) or name == "OutOfMemoryError" or "out of memory" in text.lower():
        _free_cuda_cache()
        detail = text or "the machine ran out of memory"
        if detail.lower().startswith("out of memory"):
            detail = detail[len("out of memory"):].lstrip(" :")
        return (f"out of memory: {detail or name}; try the CPU device, a smaller image or fewer "
                f"levels").replace(": ;", ";")
    first = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    if type(exc) is ValueError and first:
        return first
    return f"{name}: {first}" if first else name


def _free_cuda_cache() -> None:
    import sys
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort after an OOM
            pass


class Job:
    """One request to an :class:`Engine` (a plain Python object, not a QObject).

    Attributes
    ----------
    id : int
    name : str
    cancel_event : threading.Event
        Set by :meth:`cancel`; passed to ``fn`` as ``cancel=`` when the job was submitted with
        ``engine_callbacks=True``. A job cancelled before it starts never runs.
    state : 'queued' | 'running' | 'done' | 'failed' | 'cancelled'
    thread_ident : int or None
        ``threading.get_ident()`` of the thread that ran it (the engine thread).
    result, error : the return value / the one-line message
    """

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, *, name: str = "",
                 on_done: Optional[Callable[[Any], None]] = None,
                 on_error: Optional[Callable[[str], None]] = None,
                 on_cancelled: Optional[Callable[[], None]] = None,
                 on_progress: Optional[Callable[[Any], None]] = None,
                 engine_callbacks: bool = False, min_interval_s: float = 0.05, context=None):
        self.context = context
        self.id = next(_ids)
        self.name = name or getattr(fn, "__name__", "job")
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.on_done, self.on_error, self.on_cancelled, self.on_progress = on_done, on_error, on_cancelled, on_progress
        self.engine_callbacks = engine_callbacks
        self.min_interval_s = float(min_interval_s)
        self.cancel_event = threading.Event()
        self.state = "queued"
        self.thread_ident: Optional[int] = None
        self.result: Any = None
        self.error: Optional[str] = None
        self._lock = threading.Lock()
        self._losses: list[tuple[str, int, float]] = []
        self._last_emit = 0.0
        self._last_stage: Optional[str] = None
        self._pending = None

    def cancel(self) -> None:
        """Ask the job to stop (checked by the engine at its next iteration)."""
        self.cancel_event.set()

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def loss_history(self) -> list[tuple[str, int, float]]:
        """Every finite loss reported so far: ``[(stage, iteration, loss), ...]`` (a copy)."""
        with self._lock:
            return list(self._losses)

    def _record(self, p) -> bool:
        """Engine thread: keep the loss; True when this report should be sent now (throttled;
        a stage change and the last report always are)."""
        loss = getattr(p, "loss", None)
        if loss is not None:
            try:
                lf = float(loss)
            except (TypeError, ValueError):
                lf = float("nan")
            if lf == lf and abs(lf) != float("inf"):
                with self._lock:
                    if len(self._losses) < 200_000:
                        self._losses.append((str(getattr(p, "stage", "")), int(getattr(p, "iteration", 0) or 0), lf))
        now = time.monotonic()
        stage = getattr(p, "stage", None)
        frac = getattr(p, "fraction", None)
        if stage != self._last_stage or (frac is not None and frac >= 1.0) or now - self._last_emit >= self.min_interval_s:
            self._last_emit, self._last_stage, self._pending = now, stage, None
            return True
        self._pending = p
        return False


class _EngineWorker(QObject):
    """Lives on the engine thread and runs jobs one after another."""

    progressed = Signal(object, object)     # job, progress report
    ended = Signal(object)                  # job (state, result / error set)

    @Slot(object)
    def run_job(self, job: Job) -> None:
        from app.engine.types import Cancelled
        job.thread_ident = threading.get_ident()
        if job.cancel_event.is_set():
            job.state = "cancelled"
            self.ended.emit(job)
            return
        job.state = "running"
        kwargs = dict(job.kwargs)
        if job.engine_callbacks:
            def progress(p, job=job):
                if job._record(p):
                    self.progressed.emit(job, p)
            kwargs["progress"] = progress
            kwargs["cancel"] = job.cancel_event
        try:
            job.result = job.fn(*job.args, **kwargs)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except BaseException as e:  # noqa: BLE001 - nothing may escape the engine thread
            log.error("engine job %s failed:\n%s", job.name, traceback.format_exc())
            job.error = error_message(e)
            job.state = "failed"
        if job._pending is not None:
            p, job._pending = job._pending, None
            self.progressed.emit(job, p)
        self.ended.emit(job)


class Engine(QObject):
    """One long-lived worker thread for the engine calls of a window.

    Parameters
    ----------
    parent : QObject, optional
        Owner on the GUI thread (the main window). Call :meth:`shutdown` before it goes away
        (``MainWindow.closeEvent`` does; at application exit every engine is shut down).
    name : str
        Thread name (shows in debuggers).
    """

    def __init__(self, parent: Optional[QObject] = None, name: str = "regstation-engine"):
        super().__init__(parent)
        self._jobs: dict[int, Job] = {}
        self._thread = QThread()
        self._thread.setObjectName(name)
        self._worker = _EngineWorker()
        self._worker.moveToThread(self._thread)
        self._request.connect(self._worker.run_job)         # queued: receiver on the engine thread
        self._worker.progressed.connect(self._on_progress)  # queued: back on the GUI thread
        self._worker.ended.connect(self._on_ended)
        self._alive = True
        _LIVE.append((self, self._thread, self._worker))
        _hook_application()
        self._thread.start()

    _request = Signal(object)

    # ---------------------------------------------------------------- API (GUI thread)
    def submit(self, fn: Callable, *args, name: str = "", on_done=None, on_error=None, on_cancelled=None,
               on_progress=None, engine_callbacks: bool = False, min_interval_s: float = 0.05,
               context: Optional[QObject] = None, **kwargs) -> Job:
        """Queue ``fn(*args, **kwargs)`` on the engine thread; returns its :class:`Job`.

        ``on_done(result)``, ``on_error(message)``, ``on_cancelled()`` and ``on_progress(p)`` are
        called on the GUI thread. With ``engine_callbacks=True``, ``fn`` also receives
        ``progress=`` (throttled to one report per ``min_interval_s`` towards ``on_progress``;
        every loss is kept in :meth:`Job.loss_history`) and ``cancel=`` (a threading.Event).
        ``context``: a QObject (usually the calling widget); the callbacks are dropped once it
        has been deleted.
        """
        if not self._alive:
            raise RuntimeError("the engine was shut down; no more work can be queued")
        job = Job(fn, args, kwargs, name=name, on_done=on_done, on_error=on_error, on_cancelled=on_cancelled,
                  on_progress=on_progress, engine_callbacks=engine_callbacks, min_interval_s=min_interval_s,
                  context=context)
        self._jobs[job.id] = job
        self._request.emit(job)
        return job

    def pending(self) -> list[Job]:
        """Jobs queued or running (their callbacks have not been called yet)."""
        return list(self._jobs.values())

    @property
    def alive(self) -> bool:
        """False once :meth:`shutdown` was called (the owner is closing)."""
        return self._alive

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def thread(self) -> QThread:  # noqa: D401 - the QThread (for tests and diagnostics)
        return self._thread

    def wait_idle(self, timeout_ms: int = 10000) -> bool:
        """Process events until every job's callbacks ran (True) or ``timeout_ms`` passed."""
        deadline = time.monotonic() + timeout_ms / 1000.0
        app = QCoreApplication.instance()
        while self._jobs and time.monotonic() < deadline:
            if app is not None:
                app.processEvents()
            time.sleep(0.005)
        return not self._jobs

    def wait(self, job: Job, timeout_ms: Optional[int] = None) -> bool:
        """Keep the GUI's event loop running until ``job``'s callbacks have run (True) or
        ``timeout_ms`` passed (False). For code that needs an engine call's answer before it
        goes on (session restore, tests) without blocking the GUI thread in the work itself."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000.0
        app = QCoreApplication.instance()
        while job.id in self._jobs:
            if deadline is not None and time.monotonic() > deadline:
                return False
            if app is not None:
                app.processEvents()
            if job.id in self._jobs:
                time.sleep(0.002)
        return True

    def call(self, fn: Callable, *args, name: str = "", **kwargs):
        """Run ``fn(*args, **kwargs)`` on the engine thread and return its value, keeping the
        GUI's event loop running meanwhile; a failure is raised here as ``ValueError(message)``."""
        if not self._alive:
            raise ValueError("the window is closing; the engine takes no more work")
        out: dict = {}
        job = self.submit(fn, *args, name=name, on_done=lambda v: out.setdefault("value", v),
                          on_error=lambda m: out.setdefault("error", m),
                          on_cancelled=lambda: out.setdefault("error", "cancelled"), **kwargs)
        self.wait(job)
        if "error" in out:
            raise ValueError(out["error"])
        return out.get("value")

    def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel every job, stop the thread and wait for it (True when it stopped)."""
        if not self._alive:
            return True
        self._alive = False
        self.cancel_all()
        self._thread.quit()
        ok = self._thread.wait(timeout_ms)
        if ok:
            _LIVE[:] = [e for e in _LIVE if e[0] is not self]
        else:   # still running: keep the QThread referenced (destroying it would abort)
            log.error("engine thread did not stop within %d ms", timeout_ms)
        self._jobs.clear()
        return bool(ok)

    # ---------------------------------------------------------------- engine thread -> GUI
    @Slot(object, object)
    def _on_progress(self, job: Job, p) -> None:
        if job.id in self._jobs and job.on_progress is not None and _context_alive(job):
            job.on_progress(p)

    @Slot(object)
    def _on_ended(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is None or not _context_alive(job):
            return
        if job.state == "done" and job.on_done is not None:
            job.on_done(job.result)
        elif job.state == "failed" and job.on_error is not None:
            job.on_error(job.error or "failed")
        elif job.state == "cancelled" and job.on_cancelled is not None:
            job.on_cancelled()


def _context_alive(job: Job) -> bool:
    if job.context is None:
        return True
    import shiboken6
    return shiboken6.isValid(job.context)


def default_engine() -> Engine:
    """The application's shared engine (for widgets used without a window; tests)."""
    global _DEFAULT
    if _DEFAULT is None or not _DEFAULT._alive:
        _DEFAULT = Engine(name="regstation-engine-default")
    return _DEFAULT


_HOOKED = False


def _hook_application() -> None:
    global _HOOKED
    if _HOOKED:
        return
    _HOOKED = True
    app = QCoreApplication.instance()
    if app is not None:
        app.aboutToQuit.connect(shutdown_all)
    atexit.register(shutdown_all)


def shutdown_all(timeout_ms: int = 30000) -> bool:
    """Stop every engine (application exit; a QThread destroyed while running aborts)."""
    ok = True
    for eng, _, _ in list(_LIVE):
        try:
            ok &= eng.shutdown(timeout_ms)
        except RuntimeError:    # the engine's C++ side is gone; wait for its thread directly
            pass
    for _, th, _ in list(_LIVE):
        try:
            ok &= th.wait(timeout_ms)
        except RuntimeError:
            pass
    return ok


class RegistrationRun(QObject):
    """A registration on an :class:`Engine`: :func:`register_and_measure` with Qt signals.

    Created, owned and signalled on the GUI thread (the engine thread only runs the job and
    calls plain Python callbacks), so it may be dropped whenever its owner likes.

    Parameters
    ----------
    paradigm_key : str
        Registry key of the paradigm (or pipeline, ``"A+B"``).
    inputs : dict
        ``fixed``, ``moving`` (Volume) and optionally ``fixed_labels``, ``moving_labels``
        (LabelMap) and ``fixed_points``, ``moving_points`` (Landmarks, LPS mm).
    params : Params instance, dict of overrides or None (defaults)
    checkpoint : str or None
    device : str
    min_interval_s : float
        Progress signals are throttled to at most one per this interval.
    measure : callable, optional
        Replaces ``evaluation.register_and_measure`` (same signature); for tests.

    Signals
    -------
    progress(object)   a :class:`~app.engine.types.Progress`
    finished(object, object)   ``(RegistrationResult, metrics dict)``
    failed(str)
    cancelled()
    """

    progress = Signal(object)
    finished = Signal(object, object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, paradigm_key: str, inputs: dict, params=None, *, checkpoint=None, device: str = "auto",
                 min_interval_s: float = 0.05, measure: Optional[Callable] = None, parent: Optional[QObject] = None):
        super().__init__(parent)
        self.paradigm_key = paradigm_key
        self.inputs = dict(inputs)
        self.params = params
        self.checkpoint = checkpoint
        self.device = device
        self.min_interval_s = float(min_interval_s)
        self._measure = measure
        self.job: Optional[Job] = None

    def start(self, engine: Optional[Engine] = None) -> "RegistrationRun":
        if self.job is not None:
            raise RuntimeError("a registration run starts once; create a new one")
        engine = engine or default_engine()
        kw = {k: self.inputs.get(k) for k in ("fixed_labels", "moving_labels", "fixed_points", "moving_points")}
        self.job = engine.submit(self._call, self.inputs.get("fixed"), self.inputs.get("moving"),
                                 name=f"registration:{self.paradigm_key}", engine_callbacks=True,
                                 min_interval_s=self.min_interval_s, on_progress=self.progress.emit,
                                 on_done=self._on_done, on_error=self.failed.emit,
                                 on_cancelled=self.cancelled.emit, **kw)
        return self

    def _call(self, fixed, moving, **kw):
        measure = self._measure
        if measure is None:
            from app.engine.evaluation import register_and_measure as measure
        return measure(self.paradigm_key, fixed, moving, self.params, checkpoint=self.checkpoint,
                       device=self.device, **kw)

    def _on_done(self, out) -> None:
        self.inputs = {}            # the volumes are the window's; do not keep them here
        result, metrics = out
        if self.job is not None:
            self.job.result = None
        self.finished.emit(result, metrics)

    # ---------------------------------------------------------------- API
    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self.job is not None and self.job.cancel_requested

    @property
    def is_running(self) -> bool:
        return self.job is not None and not self.job.finished

    @property
    def thread_ident(self) -> Optional[int]:
        return None if self.job is None else self.job.thread_ident

    def loss_history(self) -> list[tuple[str, int, float]]:
        return [] if self.job is None else self.job.loss_history()
