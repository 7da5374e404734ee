"""Long engine calls (encoding, propagation, automatic segmentation) in napari thread workers.

The engine reports progress through ``progress(done, total)`` and polls ``should_cancel()``; here those
plain callbacks become a Qt signal and a cancel flag. A task's function never raises into Qt: it ends as
a ``TaskOutcome`` (a value, a cancellation, or the error to show as a notification).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from napari.qt.threading import thread_worker
from qtpy.QtCore import QObject, Signal

from ..engine.predictor import Cancelled


@dataclass
class TaskOutcome:
    """How a background task ended."""

    name: str
    value: Any = None
    cancelled: bool = False
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def succeeded(self) -> bool:
        return not self.cancelled and self.error is None


class ProgressRelay(QObject):
    """Carries progress reports from a worker thread to the GUI thread (a queued signal).

    ``report(done, total, details=None)`` is the plain callback the engine and the training loop call;
    ``details`` is whatever the caller adds (the training metrics), None for the engine.
    """

    progressed = Signal(int, int, object)

    def report(self, done: int, total: int, details=None) -> None:
        self.progressed.emit(int(done), int(total), details)


class BackgroundTask:
    """One engine call running in a napari ``thread_worker``, with progress and a cancel flag.

    ``work(progress, should_cancel)`` runs in the worker thread; ``on_done(TaskOutcome)`` and
    ``on_progress(done, total)`` are called in the GUI thread.
    """

    def __init__(self, name: str, work: Callable[[Callable[[int, int], None], Callable[[], bool]], Any],
                 on_done: Callable[[TaskOutcome], None], on_progress: Callable[[int, int], None] | None = None):
        self.name = name
        self._cancel_requested = threading.Event()
        self._relay = ProgressRelay()
        if on_progress is not None:
            self._relay.progressed.connect(lambda done, total, _details: on_progress(done, total))
        self._on_done = on_done
        self.finished = False

        def run() -> TaskOutcome:
            started = time.perf_counter()
            try:
                value = work(self._relay.report, self._cancel_requested.is_set)
                outcome = TaskOutcome(name, value=value)
            except Cancelled:
                outcome = TaskOutcome(name, cancelled=True)
            except Exception as error:  # shown as a notification in the GUI thread, never a traceback
                outcome = TaskOutcome(name, error=error)
            outcome.seconds = time.perf_counter() - started
            if self._cancel_requested.is_set() and outcome.error is None:
                outcome.cancelled = True  # a cancel that came after the last check still discards the result
            return outcome

        self.worker = thread_worker(run, start_thread=False)()
        self.worker.returned.connect(self._finish)

    def start(self) -> "BackgroundTask":
        self.worker.start()
        return self

    def cancel(self) -> None:
        """Ask the engine to stop at its next check; the task then ends as cancelled."""
        self._cancel_requested.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def _finish(self, outcome: TaskOutcome) -> None:
        self.finished = True
        self._on_done(outcome)


@contextmanager
def torch_threads(count: int | None):
    """Run the enclosed torch ops on ``count`` threads (None: unchanged); OpenMP keeps this per calling thread."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def describe_error(error: BaseException) -> str:
    """One line for a notification: engine errors carry their own message; anything else names its type."""
    from ..models.checkpoints import CheckpointError
    from ..volume import VolumeError

    if isinstance(error, (VolumeError, CheckpointError, ValueError, RuntimeError, IndexError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
