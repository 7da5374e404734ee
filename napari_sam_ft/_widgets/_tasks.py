"""One long engine task at a time for the segment widget: progress bar, cancel button and outcome messages."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Slot

from ..engine import automatic
from ..engine.predictor import VolumePredictor
from ..engine.propagate import propagate_objects, regrow_between_keys
from ..volume import Volume
from ._controls import SegmentControls
from ..finetune.adapters import AdapterError
from ._session import NO_ADAPTER, SegmentSession, SessionChoices
from ._workers import BackgroundTask, TaskOutcome, describe_error

# compute(predictor, progress, should_cancel) -> value, run in the worker after the predictor is built
Compute = Callable[[VolumePredictor, Callable[[int, int], None], Callable[[], bool]], Any]


class TaskRunner(QObject):
    """Runs ``compute`` in a worker after building the session's predictor, and shows how it went.

    ``on_success(value)`` runs in the GUI thread only when the task neither failed nor was cancelled,
    so a cancelled task changes no layer. ``on_update()`` runs after each progress report; ``on_end()`` after
    each task, once the runner is free for the next one.
    """

    def __init__(self, controls: SegmentControls, session: SegmentSession, on_update: Callable[[], None],
                 on_end: Callable[[], None] | None = None):
        super().__init__()
        self._controls = controls
        self._session = session
        self._on_update = on_update
        self._on_end = on_end or on_update
        self.task: BackgroundTask | None = None
        self.last_outcome: TaskOutcome | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None

    def run(self, name: str, volume: Volume, choices: SessionChoices, compute: Compute,
            on_success: Callable[[Any], None]) -> bool:
        """Start the task; False (and a notice) when another one is still running."""
        if self.task is not None:
            show_info(f"napari-sam-ft: wait for {self.task.name} to finish, or cancel it")
            return False
        session = self._session

        def work(progress, should_cancel):
            return compute(session.build(choices, volume), progress, should_cancel)

        def done(outcome: TaskOutcome) -> None:
            self.task, self.last_outcome = None, outcome
            self._set_busy(False)
            label = self._controls.task_label
            if outcome.error is not None:
                label.setText(f"{name} failed")
                report_error(self._controls, name, outcome.error)
            elif outcome.cancelled:
                label.setText(f"{name} cancelled; nothing was changed")
            else:
                label.setText(f"{name} done in {outcome.seconds:.1f} s")
                try:
                    on_success(outcome.value)
                except Exception as error:  # a notification, never a traceback in the viewer
                    report_error(self._controls, name, error)
            self._on_end()

        self._set_busy(True, f"{name}…")
        self.task = BackgroundTask(name, work, done, on_progress=self.show_progress).start()
        return True

    def cancel(self) -> None:
        """Ask the running task to stop at the engine's next check."""
        if self.task is not None:
            self.task.cancel()
            self._controls.task_label.setText(f"cancelling {self.task.name}…")

    @Slot(int, int)
    def show_progress(self, done: int, total: int) -> None:
        self._controls.progress_bar.setRange(0, max(total, 1))
        self._controls.progress_bar.setValue(done if total else 1)
        self._on_update()  # the status line shows the cache filling up

    def _set_busy(self, busy: bool, text: str = "") -> None:
        c = self._controls
        for button in (c.encode_button, c.propagate_button, c.repropagate_button, c.auto_slice_button,
                       c.auto_volume_button):
            button.setEnabled(not busy)
        c.cancel_button.setEnabled(busy)
        if busy:
            c.task_label.setText(text)
            c.progress_bar.setRange(0, 0)  # a busy indicator until the first progress report


def report_error(controls: SegmentControls, what: str, error: BaseException) -> None:
    """A napari error notification; a missing adapter also falls back to the base model."""
    if isinstance(error, AdapterError):
        controls.adapter_combo.setCurrentText(NO_ADAPTER)
    show_error(f"napari-sam-ft: {what} failed: {describe_error(error)}")


def propagation(key_masks: dict[int, np.ndarray], stop_iou: float, slice_range: tuple[int, int] | None) -> Compute:
    """The compute step of a propagation task: ((Z, H, W) bool grown from the key slices, {grown slice: predicted
    IoU})."""

    def compute(predictor, progress, should_cancel):
        scores: dict[int, float] = {}
        grown = propagate_objects(predictor, key_masks, stop_iou=stop_iou, slice_range=slice_range,
                                  progress=progress, should_cancel=should_cancel, scores=scores)
        return grown, scores

    return compute


def repropagation(key_masks: dict[int, np.ndarray]) -> Compute:
    """The compute step of a re-propagation: ({slice between keys: (H, W) bool}, {that slice: predicted IoU})."""

    def compute(predictor, progress, should_cancel):
        scores: dict[int, float] = {}
        regrown = regrow_between_keys(predictor, key_masks, progress=progress, should_cancel=should_cancel,
                                      scores=scores)
        return regrown, scores

    return compute


def automatic_segmentation(whole_volume: bool, slice_index: int, points_per_side: int) -> Compute:
    """The compute step of an auto-segment task: (Z, H, W) int32 labels (only ``slice_index`` filled if not
    ``whole_volume``)."""
    settings = replace(automatic.AutomaticSettings(), points_per_side=points_per_side)

    def compute(predictor, progress, should_cancel):
        if whole_volume:
            return automatic.segment_volume(predictor, settings=settings, progress=progress,
                                            should_cancel=should_cancel)
        labels = np.zeros(predictor.volume.shape, dtype=np.int32)
        labels[slice_index] = automatic.segment_slice(predictor, slice_index, settings)
        return labels

    return compute
