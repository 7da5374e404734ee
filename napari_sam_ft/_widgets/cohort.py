"""The "Run on all scans…" panel: apply the active model and adapter to every scan of a folder, in the background.

It calls ``batch.run_cohort`` (automatic segmentation, one dask task per scan on a LocalCluster of worker
processes) in a napari thread worker: scans finished are counted on the progress bar, Cancel stops the
run (the remaining tasks are cancelled and the local cluster is closed; finished masks stay, and a new
run resumes from them). The model, checkpoint, window and adapter are the ones the Segment panel
recorded on the active image layer, and can be changed here.
"""

from __future__ import annotations

from pathlib import Path

from napari.layers import Image
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QFileDialog, QFormLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)

from ..batch import CohortSettings, ModelChoice, default_worker_count, expand_inputs, run_cohort
from ..models.registry import DEFAULT_MODEL
from ._controls import widget_row
from ._session import NO_ADAPTER
from ._workers import BackgroundTask, TaskOutcome, describe_error
from .session_panel import CHOICES_KEY

RESULTS_FOLDER = "napari-sam-ft-batch"


class _MessageRelay(QObject):
    """Carries ``run_cohort``'s one-line reports from the worker thread to the GUI thread."""

    said = Signal(str)


def recorded_choices(viewer) -> dict:
    """Model choices the Segment panel recorded on the active image layer (or on the first that has them)."""
    layers = [viewer.layers.selection.active, *viewer.layers]
    for layer in layers:
        if isinstance(layer, Image) and layer.metadata.get(CHOICES_KEY):
            return dict(layer.metadata[CHOICES_KEY])
    return {}


class CohortWidget(QWidget):
    """Dock widget: scans folder, output folder, adapter, workers; Run, progress, Cancel."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.task: BackgroundTask | None = None
        self.last_outcome: TaskOutcome | None = None
        self.messages: list[str] = []  # the run's reports, in order (the label shows the latest)
        self._relay = _MessageRelay()
        self._relay.said.connect(self._show_message)

        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("a folder of scans (NIfTI, NRRD, DICOM series, TIFF...)")
        folder_button = QPushButton("…")
        folder_button.clicked.connect(lambda: self._choose_folder(self.folder_edit, "Folder of scans"))
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText(f"default: <scans folder>/{RESULTS_FOLDER}")
        output_button = QPushButton("…")
        output_button.clicked.connect(lambda: self._choose_folder(self.output_edit, "Output folder"))
        self.adapter_edit = QLineEdit()
        self.adapter_edit.setToolTip("the adapter folder applied to every scan (empty: the base model); "
                                     "taken from the Segment panel's choice on the active image")
        self.workers_spin = QSpinBox()
        self.workers_spin.setRange(1, 256)
        self.workers_spin.setValue(default_worker_count())
        self.workers_spin.setToolTip("worker processes, each with the model loaded once")
        self.run_button = QPushButton("Run on all scans")
        self.run_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress_bar = QProgressBar()
        self.progress_bar.setFormat("%v / %m scans")
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Scans", widget_row(self.folder_edit, folder_button))
        form.addRow("Output", widget_row(self.output_edit, output_button))
        form.addRow("Adapter", self.adapter_edit)
        form.addRow("Workers", self.workers_spin)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(widget_row(self.run_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addStretch(1)
        self.use_active_choices()
        napari_viewer.layers.selection.events.active.connect(lambda _event: self.use_active_choices())

    # -- choices ------------------------------------------------------------------------------------
    def use_active_choices(self) -> None:
        """Take the adapter the Segment panel uses on the active image (unless a run is going)."""
        if self.running:
            return
        adapter = recorded_choices(self._viewer).get("adapter_dir")
        if adapter and adapter != NO_ADAPTER:
            self.adapter_edit.setText(str(adapter))

    def settings(self) -> CohortSettings:
        recorded = recorded_choices(self._viewer)
        adapter = self.adapter_edit.text().strip() or None
        model = ModelChoice(recorded.get("model_name") or DEFAULT_MODEL, recorded.get("checkpoint") or None,
                            str(Path(adapter).resolve()) if adapter else None)
        window = recorded.get("window") if isinstance(recorded.get("window"), str) else "auto"
        return CohortSettings(mode="auto", model=model, window=window)

    def output_folder(self) -> Path:
        text = self.output_edit.text().strip()
        return Path(text) if text else Path(self.folder_edit.text().strip()) / RESULTS_FOLDER

    def _choose_folder(self, edit: QLineEdit, title: str) -> None:
        path = QFileDialog.getExistingDirectory(self, title)
        if path:
            edit.setText(path)

    # -- running ------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.finished

    def run(self) -> BackgroundTask | None:
        """Start the cohort run in the background (returns its task), or say why it cannot start."""
        if self.running:
            return self.task
        folder = self.folder_edit.text().strip()
        try:
            if not folder or not Path(folder).is_dir():
                raise ValueError("choose the folder of scans to run on")
            output = self.output_folder()
            scans = [scan for scan in expand_inputs([folder])
                     if not Path(scan.image).resolve().is_relative_to(output.resolve())]  # not our own masks
            if not scans:
                raise ValueError(f"{folder} holds no scans")
            settings = self.settings()
            settings.check()
        except ValueError as error:
            show_error(f"napari-sam-ft: {error}")
            return None
        workers = self.workers_spin.value()

        def work(progress, should_cancel):
            return run_cohort(scans, output, settings, workers=workers, progress=progress,
                              should_cancel=should_cancel, report=self._relay.said.emit)

        self.progress_bar.setRange(0, len(scans))
        self.progress_bar.setValue(0)
        self.messages.clear()
        self.status_label.setText(f"starting {workers} worker{'s' if workers > 1 else ''} for {len(scans)} scans…")
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.task = BackgroundTask("run on all scans", work, self._finished, self._progressed).start()
        return self.task

    def cancel(self) -> None:
        if self.running:
            self.task.cancel()
            self.status_label.setText("cancelling: stopping the workers…")

    def _progressed(self, done: int, total: int) -> None:
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)

    def _show_message(self, message: str) -> None:
        self.messages.append(message)
        if self.running and not self.task.cancel_requested:
            self.status_label.setText(message)

    def _finished(self, outcome: TaskOutcome) -> None:
        self.last_outcome = outcome
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if outcome.cancelled:
            self.status_label.setText("cancelled; the scans finished so far are kept (a new run resumes from them)")
            return
        if outcome.error is not None:
            message = f"napari-sam-ft: the run on all scans failed: {describe_error(outcome.error)}"
            self.status_label.setText(message)
            show_error(message)
            return
        table = outcome.value
        failed = int((table["status"] != "ok").sum())
        message = (f"{len(table) - failed} of {len(table)} scans segmented in {outcome.seconds:.0f} s; masks and "
                   f"results.csv in {table.attrs.get('output_dir')}")
        if failed:
            message += f" ({failed} failed: see the error column)"
        self.status_label.setText(message)
        show_info(f"napari-sam-ft: {message}")
