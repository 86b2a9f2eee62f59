"""The only bridge between Qt threads and the engine.

The engine reports through plain callbacks (``progress(Progress)``) and stops when a
``threading.Event`` is set; the workers here run engine calls on a ``QThread`` and turn those
callbacks, results and exceptions into Qt signals, which Qt delivers on the receiver's (GUI)
thread. Widgets therefore never touch engine work directly and never change off the GUI thread.

* :class:`RegistrationWorker` runs :func:`app.engine.evaluation.register_and_measure`.
* :class:`TaskWorker` runs any callable (loading big files, probing checkpoints);
  :func:`run_in_thread` starts one and wires its callbacks.

Every exception becomes a one-line ``failed(message)`` (the traceback goes to the log), and
running out of memory (``MemoryError``, torch's CUDA OOM) reads ``"out of memory: ..."``.
Started workers are kept alive here until their thread has ended, so callers may drop them.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Callable, Optional

from PySide6.QtCore import QCoreApplication, QObject, Qt, QThread, Signal, Slot

log = logging.getLogger(__name__)

# Workers whose thread is running; removed (after the thread has stopped) on the GUI thread.
_ACTIVE: set = set()
_REAPER: Optional["_Reaper"] = None


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


class _Reaper(QObject):
    """Lives on the GUI thread; forgets a worker once its thread has stopped."""

    @Slot(object)
    def reap(self, worker) -> None:
        th = worker._thread
        if th is not None:
            th.wait(5000)
        _ACTIVE.discard(worker)


def _reaper() -> "_Reaper":
    global _REAPER
    if _REAPER is None:
        _REAPER = _Reaper()
        app = QCoreApplication.instance()
        if app is not None:
            _REAPER.moveToThread(app.thread())
            # a QThread destroyed while running aborts the process: stop every worker on quit
            app.aboutToQuit.connect(_on_about_to_quit)
    return _REAPER


def _on_about_to_quit() -> None:
    cancel_all_and_wait(10000)


class ThreadedWorker(QObject):
    """Base: a QObject that moves itself to its own QThread and runs :meth:`work` there.

    Signals
    -------
    ended(object)
        Emitted with the worker itself after its outcome signal (finished / failed /
        cancelled), whatever the outcome.
    """

    ended = Signal(object)

    def __init__(self, name: str = "worker"):
        super().__init__()
        self._thread: Optional[QThread] = None
        self._name = name
        self.thread_ident: Optional[int] = None     # threading ident of the thread that ran work()
        self._running = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "ThreadedWorker":
        """Move to a new QThread and run there. Call on the GUI thread."""
        if self._thread is not None:
            raise RuntimeError("a worker runs once; create a new one")
        th = QThread()
        th.setObjectName(self._name)
        self._thread = th
        self.moveToThread(th)
        th.started.connect(self._run)
        # direct: quit() is thread-safe, and a GUI thread blocked in wait() must still see it
        self.ended.connect(th.quit, Qt.DirectConnection)
        self.ended.connect(_reaper().reap)
        _ACTIVE.add(self)
        self._running = True
        th.start()
        return self

    @property
    def is_running(self) -> bool:
        return self._running

    def wait(self, timeout_ms: int = -1) -> bool:
        """Block until the thread has stopped (True) or ``timeout_ms`` passed (False)."""
        if self._thread is None:
            return True
        return self._thread.wait(timeout_ms) if timeout_ms >= 0 else self._thread.wait()

    @Slot()
    def _run(self) -> None:
        self.thread_ident = threading.get_ident()
        try:
            self.work()
        except BaseException as e:  # noqa: BLE001 - nothing may escape a worker thread
            log.error("worker %s crashed:\n%s", self._name, traceback.format_exc())
            self._emit_failed(error_message(e))
        finally:
            self._running = False
            self.ended.emit(self)

    def work(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _emit_failed(self, message: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class RegistrationWorker(ThreadedWorker):
    """Runs ``register_and_measure`` on a QThread.

    Parameters
    ----------
    paradigm_key : str
        Registry key of the paradigm.
    inputs : dict
        ``fixed``, ``moving`` (Volume) and optionally ``fixed_labels``, ``moving_labels``
        (LabelMap) and ``fixed_points``, ``moving_points`` (Landmarks, LPS mm); missing or None
        entries are not used.
    params : Params instance, dict of overrides or None (defaults)
    checkpoint : str or None
        Checkpoint path for learned paradigms.
    device : str
        'auto', 'cpu' or 'cuda'.
    min_interval_s : float
        Progress signals are throttled to at most one per this interval (a stage change and the
        last report are always delivered); every loss is still recorded, see :meth:`loss_history`.
    measure : callable, optional
        Replaces ``evaluation.register_and_measure`` (same signature); for tests.

    Signals
    -------
    progress(object)   a :class:`~app.engine.types.Progress`
    finished(object, object)   ``(RegistrationResult, metrics dict)``
    failed(str)   one-line message
    cancelled()
    """

    progress = Signal(object)
    finished = Signal(object, object)
    failed = Signal(str)
    cancelled = Signal()

    def __init__(self, paradigm_key: str, inputs: dict, params=None, *, checkpoint=None,
                 device: str = "auto", min_interval_s: float = 0.05,
                 measure: Optional[Callable] = None):
        super().__init__(f"registration:{paradigm_key}")
        self.paradigm_key = paradigm_key
        self.inputs = dict(inputs)
        self.params = params
        self.checkpoint = checkpoint
        self.device = device
        self.min_interval_s = float(min_interval_s)
        self._measure = measure
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._losses: list[tuple[str, int, float]] = []
        self._last_emit = 0.0
        self._last_stage: Optional[str] = None
        self._pending = None

    # ---------------------------------------------------------------- API (any thread)
    def cancel(self) -> None:
        """Ask the run to stop; it ends with ``cancelled()`` at the registrar's next check."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def loss_history(self) -> list[tuple[str, int, float]]:
        """Every finite loss reported so far: ``[(stage, iteration, loss), ...]`` (a copy)."""
        with self._lock:
            return list(self._losses)

    # ---------------------------------------------------------------- worker thread
    def _on_progress(self, p) -> None:
        """The engine's progress callback (worker thread): record, then emit throttled."""
        loss = getattr(p, "loss", None)
        if loss is not None:
            try:
                lf = float(loss)
            except (TypeError, ValueError):
                lf = float("nan")
            if lf == lf and abs(lf) != float("inf"):
                with self._lock:
                    if len(self._losses) < 200_000:
                        self._losses.append((str(p.stage), int(p.iteration or 0), lf))
        now = time.monotonic()
        stage_changed = p.stage != self._last_stage
        last = p.fraction is not None and p.fraction >= 1.0
        if stage_changed or last or now - self._last_emit >= self.min_interval_s:
            self._last_emit = now
            self._last_stage = p.stage
            self._pending = None
            self.progress.emit(p)
        else:
            self._pending = p

    def _flush(self) -> None:
        if self._pending is not None:
            p, self._pending = self._pending, None
            self.progress.emit(p)

    def work(self) -> None:
        from app.engine.types import Cancelled
        measure = self._measure
        if measure is None:
            from app.engine.evaluation import register_and_measure as measure
        kw = {k: self.inputs.get(k) for k in ("fixed_labels", "moving_labels", "fixed_points", "moving_points")}
        try:
            result, metrics = measure(self.paradigm_key, self.inputs.get("fixed"), self.inputs.get("moving"),
                                      self.params, checkpoint=self.checkpoint, device=self.device,
                                      progress=self._on_progress, cancel=self._cancel, **kw)
        except Cancelled:
            self._flush()
            self.cancelled.emit()
            return
        except BaseException as e:  # noqa: BLE001 - every error becomes failed(message)
            self._flush()
            log.error("registration %s failed:\n%s", self.paradigm_key, traceback.format_exc())
            self.failed.emit(error_message(e))
            return
        self._flush()
        self.finished.emit(result, metrics)

    def _emit_failed(self, message: str) -> None:
        self.failed.emit(message)


class TaskWorker(ThreadedWorker):
    """Runs ``fn(*args, **kwargs)`` on a QThread.

    Signals: ``finished(object)`` with the return value, ``failed(str)`` one-line message.
    """

    finished = Signal(object)
    failed = Signal(str)

    def __init__(self, fn: Callable, *args, name: str = "", **kwargs):
        super().__init__(name or getattr(fn, "__name__", "task"))
        self._fn, self._args, self._kwargs = fn, args, kwargs

    def work(self) -> None:
        try:
            out = self._fn(*self._args, **self._kwargs)
        except BaseException as e:  # noqa: BLE001
            log.error("task %s failed:\n%s", self._name, traceback.format_exc())
            self.failed.emit(error_message(e))
            return
        self.finished.emit(out)

    def _emit_failed(self, message: str) -> None:
        self.failed.emit(message)


def run_in_thread(fn: Callable, *args, on_done: Optional[Callable[[Any], None]] = None,
                  on_error: Optional[Callable[[str], None]] = None, context: Optional[QObject] = None,
                  **kwargs) -> TaskWorker:
    """Start ``fn(*args, **kwargs)`` on a worker thread; call ``on_done(result)`` or
    ``on_error(message)`` on the GUI thread. Returns the started :class:`TaskWorker`.

    ``context``: a QObject living on the GUI thread (usually the calling widget); the callbacks
    are delivered through it (queued) and dropped when it is deleted.
    """
    w = TaskWorker(fn, *args, **kwargs)
    relay = _Relay(on_done, on_error, context if context is not None else _reaper())
    w.finished.connect(relay.done)
    w.failed.connect(relay.error)
    return w.start()


class _Relay(QObject):
    """Lives on the GUI thread (a child of the context object) and calls plain Python callbacks
    there; removed after the first outcome."""

    def __init__(self, on_done: Optional[Callable], on_error: Optional[Callable], parent: QObject):
        super().__init__(parent)
        self._on_done, self._on_error = on_done, on_error

    @Slot(object)
    def done(self, value) -> None:
        try:
            if self._on_done is not None:
                self._on_done(value)
        finally:
            self.deleteLater()

    @Slot(str)
    def error(self, message: str) -> None:
        try:
            if self._on_error is not None:
                self._on_error(message)
        finally:
            self.deleteLater()


def active_workers() -> list:
    """Workers whose thread has not been reaped yet."""
    return list(_ACTIVE)


def cancel_all_and_wait(timeout_ms: int = 10000) -> bool:
    """Cancel every running registration and wait for all worker threads (application exit).
    Returns False when some thread is still running after ``timeout_ms``."""
    deadline = time.monotonic() + timeout_ms / 1000.0
    ok = True
    for w in list(_ACTIVE):
        if isinstance(w, RegistrationWorker):
            w.cancel()
    for w in list(_ACTIVE):
        left = max(0, int((deadline - time.monotonic()) * 1000))
        ok &= w.wait(left)
    return ok
