"""Interactive SAM segmentation of a 3D image layer: clicks and boxes -> preview -> commit, propagate, auto.

Each prompt edit decodes the current slice from its cached embedding (tens of ms) into the preview layer;
slices are encoded in background workers. Commits go through napari's Labels undo history.
"""

from __future__ import annotations

import time

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from .._layer_data import volume_from_layer
from ..engine.predictor import VolumePredictor
from ..engine.propagate import propagate_mask
from ..volume import Volume
from ._controls import NEW_LABELS_LAYER, build_controls
from ._layers import (NEGATIVE, POSITIVE, PREVIEW_VALUE, commit_mask, current_slice_index, make_boxes_layer,
                      make_points_layer, make_preview_layer, new_labels_layer, prompted_slices, slice_prompts)
from ._session import NO_ADAPTER, AdapterUnavailable, SegmentSession, SessionChoices, adapter_functions
from ._workers import BackgroundTask, TaskOutcome, describe_error

FINISHED_ACTIONS = ("added", "changed", "removed")


class SegmentWidget(QWidget):
    """The dock widget: pick image/model/window/adapter, click to segment, commit, propagate, auto-segment."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self._session = SegmentSession()
        self.controls = build_controls(self, napari_viewer)
        self._volume: Volume | None = None
        self._volume_source: tuple[int, int] | None = None  # (id(layer), id(layer.data)) the volume came from
        self._points = self._boxes = self._preview = None
        self._task: BackgroundTask | None = None  # encode volume, propagate, auto-segment, adapter
        self._slice_task: BackgroundTask | None = None  # encode the clicked slice, then segment it
        self._pending_slice: int | None = None
        self._muted = False  # True while the widget itself edits the prompt layers
        self.last_click_to_preview_ms = float("nan")
        self._key_actions = {"s": self.segment_current_slice, "c": self.commit, "Shift-S": self.propagate,
                             "Shift-C": self.clear_prompts}
        self._bind_keys(self._viewer)
        self._connect_controls()
        self._image_changed()

    # -- wiring ------------------------------------------------------------------------------------
    def _connect_controls(self) -> None:
        c = self.controls
        c.image_combo.currentIndexChanged.connect(self._image_changed)
        c.checkpoint_button.clicked.connect(self._choose_checkpoint)
        c.adapter_button.clicked.connect(self._choose_adapter)
        c.adapter_combo.currentTextChanged.connect(self._adapter_changed)
        c.encode_button.clicked.connect(self.encode_volume)
        c.negative_check.toggled.connect(lambda _checked: self._reset_point_sign())
        c.segment_button.clicked.connect(self.segment_current_slice)
        c.commit_button.clicked.connect(self.commit)
        c.propagate_button.clicked.connect(self.propagate)
        c.clear_button.clicked.connect(self.clear_prompts)
        c.auto_slice_button.clicked.connect(lambda: self.auto_segment(whole_volume=False))
        c.auto_volume_button.clicked.connect(lambda: self.auto_segment(whole_volume=True))
        c.cancel_button.clicked.connect(self.cancel)

    def _bind_keys(self, provider) -> None:
        for key, action in self._key_actions.items():
            provider.bind_key(key, lambda _provider, action=action: action(), overwrite=True)

    def _choose_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors)")
        if path:
            self.controls.checkpoint_edit.setText(path)

    def _choose_adapter(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "LoRA adapter folder")
        if path:
            self.set_adapter(path)

    # -- public state ------------------------------------------------------------------------------
    @property
    def image_layer(self):
        return self.controls.image_combo.current_layer()

    @property
    def predictor(self) -> VolumePredictor | None:
        """The predictor for the current choices, if it has been built."""
        choices = self._choices()
        return None if choices is None else self._session.ready_predictor(choices)

    @property
    def idle(self) -> bool:
        return self._task is None and self._slice_task is None

    def set_adapter(self, adapter_dir: str | None) -> None:
        """Use the LoRA adapter in ``adapter_dir`` (None or "none": the base model); the fine-tune panel calls this."""
        combo = self.controls.adapter_combo
        text = NO_ADAPTER if adapter_dir in (None, "", NO_ADAPTER) else str(adapter_dir)
        if combo.findText(text) < 0:
            combo.addItem(text)
        combo.setCurrentText(text)

    def _adapter_changed(self, adapter_dir: str) -> None:
        if adapter_dir == NO_ADAPTER and self._session.model is None:
            return
        try:
            adapter_functions()  # fails fast, here, when fine-tuning support is missing
        except AdapterUnavailable as error:
            self._report_error("loading the adapter", error)
            return
        if self.image_layer is not None and self._session.model is not None:
            self._run_task("apply adapter", lambda predictor, progress, should_cancel: None, lambda _value: None)

    def _choices(self) -> SessionChoices | None:
        image = self.image_layer
        if image is None:
            return None
        c = self.controls
        return SessionChoices(id(image), c.model_combo.currentText(), c.checkpoint_edit.text().strip(),
                              c.device_combo.currentText(), c.window_combo.currentText(), c.adapter_combo.currentText())

    def _current_volume(self) -> Volume | None:
        """The image layer as a Volume (reused while the layer and its data are the same), or None + a notice."""
        image = self.image_layer
        if image is None:
            show_error("napari-sam-ft: add or open a 3D image first")
            return None
        source = (id(image), id(image.data))
        if self._volume_source != source:
            try:
                self._volume = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            except ValueError as error:
                show_error(f"napari-sam-ft cannot segment layer {image.name!r}: {error}")
                return None
            self._volume_source = source
        return self._volume

    def prompt_layers(self):
        """(points, boxes, preview) layers over the current image, created or re-created as needed."""
        image = self.image_layer
        if image is None or self._current_volume() is None:
            return None
        layers = self._viewer.layers
        ours = (self._preview, self._boxes, self._points)
        if not (all(layer is not None and layer in layers for layer in ours)
                and self._preview.data.shape == image.data.shape and tuple(self._preview.scale) == tuple(image.scale)):
            for layer in ours:
                if layer is not None and layer in layers:
                    layers.remove(layer)
            self._preview = make_preview_layer(self._viewer, image)
            self._boxes = make_boxes_layer(self._viewer, image)
            self._points = make_points_layer(self._viewer, image)  # added last: the active layer for clicks
            self._points.events.data.connect(self._on_points_changed)
            self._boxes.events.data.connect(self._on_boxes_changed)
            self._points.mouse_drag_callbacks.insert(0, self._pick_point_sign)
            for layer in (self._points, self._boxes, self._preview):
                self._bind_keys(layer)
            self._reset_point_sign()
        return self._points, self._boxes, self._preview

    def _image_changed(self, *_args) -> None:
        # Deferred: the combo changes inside the layer list's own "inserted" event.
        QTimer.singleShot(0, lambda: self.image_layer is not None and self.prompt_layers())

    # -- prompts -> preview ------------------------------------------------------------------------
    def _pick_point_sign(self, layer, event) -> None:
        """Shift/Ctrl at the press makes the point added on release negative (or positive in negative mode)."""
        flipped = bool({"Shift", "Control"} & {str(key) for key in event.modifiers})
        negative = self.controls.negative_check.isChecked() != flipped
        layer.feature_defaults["prompt"] = NEGATIVE if negative else POSITIVE

    def _reset_point_sign(self) -> None:
        if self._points is not None:
            self._points.feature_defaults["prompt"] = NEGATIVE if self.controls.negative_check.isChecked() else POSITIVE

    def _on_points_changed(self, event) -> None:
        if self._muted or str(event.action) not in FINISHED_ACTIONS:
            return
        started = time.perf_counter()
        added = str(event.action) == "added" and len(self._points.data)
        self._reset_point_sign()
        z = int(np.rint(self._points.data[-1][0])) if added else self._current_slice()
        self._segment_prompted_slice(z, started)

    def _on_boxes_changed(self, event) -> None:
        if self._muted or str(event.action) not in FINISHED_ACTIONS:
            return
        started = time.perf_counter()
        added = str(event.action) == "added" and len(self._boxes.data)
        z = int(np.rint(np.asarray(self._boxes.data[-1])[:, 0].mean())) if added else self._current_slice()
        self._segment_prompted_slice(z, started)

    def _current_slice(self) -> int:
        return current_slice_index(self._viewer, self.image_layer)

    def segment_current_slice(self) -> None:
        """Predict the current slice from its prompts into the preview (key ``s``)."""
        if self.prompt_layers() is not None:
            z = self._current_slice()
            if slice_prompts(self._points, self._boxes, z).empty:
                show_info(f"napari-sam-ft: place a point or a box on slice {z} first")
                return
            self._segment_prompted_slice(z, time.perf_counter())

    def _segment_prompted_slice(self, z: int, started: float) -> None:
        prompts = slice_prompts(self._points, self._boxes, z)
        if prompts.empty:
            self._show_preview_slice(z, None)
            return
        predictor = self.predictor
        if predictor is None or not predictor.is_encoded(z):
            self._encode_then_segment(z)
            return
        single_point = prompts.box_xyxy is None and len(prompts.points_xy) == 1
        try:
            prediction = predictor.predict(point_coords=prompts.points_xy, point_labels=prompts.point_labels,
                                           box=prompts.box_xyxy, multimask_output=single_point, slice_index=z)
        except Exception as error:
            show_error(f"napari-sam-ft: segmenting slice {z} failed: {describe_error(error)}")
            return
        self._show_preview_slice(z, prediction.mask)
        self.last_click_to_preview_ms = (time.perf_counter() - started) * 1000.0
        self._update_status()

    def _encode_then_segment(self, z: int) -> None:
        """Encode slice ``z`` in a worker (loading the model first if needed), then segment it."""
        self._pending_slice = z
        if self._slice_task is not None:
            return  # the running one segments the newest pending slice when it ends
        volume, choices = self._current_volume(), self._choices()
        if volume is None or choices is None:
            return

        def work(progress, should_cancel):
            predictor = self._session.build(choices, volume)
            predictor.encode_slices([z], progress=progress, should_cancel=should_cancel)

        def done(outcome: TaskOutcome) -> None:
            self._slice_task = None
            pending, self._pending_slice = self._pending_slice, None
            self.controls.task_label.setText(f"encoded slice {z} in {outcome.seconds:.1f} s" if outcome.succeeded
                                             else "")
            if outcome.error is not None:
                self._report_error(f"encoding slice {z}", outcome.error)
            elif outcome.succeeded and pending is not None:
                self._segment_prompted_slice(pending, time.perf_counter())
            self._update_status()

        self.controls.task_label.setText(f"encoding slice {z}…")
        self._slice_task = BackgroundTask(f"encode slice {z}", work, done).start()

    def _show_preview_slice(self, z: int, mask: np.ndarray | None) -> None:
        self._preview.data[z] = 0 if mask is None else mask.astype(np.uint8) * PREVIEW_VALUE
        self._preview.refresh()

    # -- commit, clear -----------------------------------------------------------------------------
    def target_labels_layer(self, create: bool = True):
        """The labels layer commits go into; with "(new layer)" chosen, a new one is made and chosen."""
        combo = self.controls.labels_combo
        layer = combo.current_layer()
        if layer is None and create and combo.currentText() == NEW_LABELS_LAYER and self.image_layer is not None:
            layer = new_labels_layer(self._viewer, self.image_layer, f"{self.image_layer.name} labels")
            combo.select_layer(layer)
            self._select_points_layer()
        return layer

    def commit(self) -> None:
        """Paint the preview into the labels layer under the chosen label id (key ``c``); Ctrl-Z undoes it."""
        if self.prompt_layers() is None:
            return
        mask = np.asarray(self._preview.data) > 0
        if not mask.any():
            show_info("napari-sam-ft: the preview is empty; nothing to commit")
            return
        labels = self.target_labels_layer()
        if labels is None:
            return
        label_id = self.controls.label_spin.value()
        try:
            changed = commit_mask(labels, mask, label_id, self.controls.overwrite_check.isChecked())
        except ValueError as error:
            show_error(f"napari-sam-ft: {error}")
            return
        kept = int((mask & (np.asarray(labels.data) != label_id)).sum())
        note = f"; {kept} voxels of other labels kept" if kept else ""
        self.controls.task_label.setText(f"committed {changed} voxels as label {label_id} into {labels.name!r}{note}")
        self.clear_prompts()

    def clear_prompts(self) -> None:
        """Remove every point and box and empty the preview (key ``Shift-C``)."""
        if self._points is None:
            return
        self._muted = True
        try:
            self._points.data = np.empty((0, 3))
            self._boxes.data = []
        finally:
            self._muted = False
        self._preview.data[:] = 0
        self._preview.refresh()

    def _select_points_layer(self) -> None:
        if self._points is not None and self._points in self._viewer.layers:
            self._viewer.layers.selection.active = self._points

    # -- long tasks --------------------------------------------------------------------------------
    def _run_task(self, name: str, compute, on_success) -> None:
        """Run ``compute(predictor, progress, should_cancel)`` in a worker after building the predictor."""
        if self._task is not None:
            show_info(f"napari-sam-ft: wait for {self._task.name} to finish or cancel it")
            return
        volume, choices = self._current_volume(), self._choices()
        if volume is None or choices is None:
            return

        def work(progress, should_cancel):
            return compute(self._session.build(choices, volume), progress, should_cancel)

        def done(outcome: TaskOutcome) -> None:
            self._task = None
            self._set_busy(False)
            if outcome.error is not None:
                self.controls.task_label.setText(f"{name} failed")
                self._report_error(name, outcome.error)
            elif outcome.cancelled:
                self.controls.task_label.setText(f"{name} cancelled; nothing was changed")
            else:
                self.controls.task_label.setText(f"{name} done in {outcome.seconds:.1f} s")
                try:
                    on_success(outcome.value)
                except Exception as error:
                    show_error(f"napari-sam-ft: {name} failed: {describe_error(error)}")
            self._update_status()

        self._set_busy(True, f"{name}…")
        self._task = BackgroundTask(name, work, done, on_progress=self._on_progress).start()

    def _report_error(self, what: str, error: BaseException) -> None:
        if isinstance(error, AdapterUnavailable):
            self.controls.adapter_combo.setCurrentText(NO_ADAPTER)  # keep the widget usable with the base model
        show_error(f"napari-sam-ft: {what} failed: {describe_error(error)}")

    def _set_busy(self, busy: bool, text: str = "") -> None:
        c = self.controls
        for button in (c.encode_button, c.propagate_button, c.auto_slice_button, c.auto_volume_button):
            button.setEnabled(not busy)
        c.cancel_button.setEnabled(busy)
        if busy:
            c.task_label.setText(text)
            c.progress_bar.setRange(0, 0)  # busy indicator until the first progress report

    def _on_progress(self, done: int, total: int) -> None:
        self.controls.progress_bar.setRange(0, max(total, 1))
        self.controls.progress_bar.setValue(done if total else 1)
        self._update_status()

    def cancel(self) -> None:
        """Stop the running encode / propagate / auto-segment task at its next check."""
        if self._task is not None:
            self._task.cancel()
            self.controls.task_label.setText(f"cancelling {self._task.name}…")

    def encode_volume(self) -> None:
        """Precompute every slice's embedding in the background (cached in memory and on disk)."""
        self._run_task("encode volume", lambda predictor, progress, should_cancel: predictor.encode_volume(
            progress=progress, should_cancel=should_cancel), lambda _count: None)

    def propagate(self) -> None:
        """Grow the preview (or the committed label on this slice) through z into the preview (``Shift-S``)."""
        if self.prompt_layers() is None:
            return
        key_masks = self._key_masks()
        if not key_masks:
            show_info("napari-sam-ft: segment or commit an object on this slice before propagating")
            return
        stop_iou, reach = self.controls.stop_iou_spin.value(), self.controls.range_spin.value()
        num_slices = self._preview.data.shape[0]
        slice_range = None if reach == 0 else (max(0, min(key_masks) - reach), min(num_slices - 1, max(key_masks) + reach))

        def compute(predictor, progress, should_cancel):
            return propagate_mask(predictor, key_masks, stop_iou=stop_iou, slice_range=slice_range,
                                  progress=progress, should_cancel=should_cancel)

        def show(result: np.ndarray) -> None:
            self._preview.data[:] = result.astype(np.uint8) * PREVIEW_VALUE
            self._preview.refresh()

        self._run_task("propagate", compute, show)

    def _key_masks(self) -> dict[int, np.ndarray]:
        """Preview masks on prompted slices; else the preview or the committed label on the current slice."""
        preview = np.asarray(self._preview.data) > 0
        keys = {z: preview[z].copy() for z in prompted_slices(self._points, self._boxes) if preview[z].any()}
        z = self._current_slice()
        if not keys and preview[z].any():
            keys = {z: preview[z].copy()}
        labels = self.target_labels_layer(create=False)
        if not keys and labels is not None:
            committed = np.asarray(labels.data[z]) == self.controls.label_spin.value()
            if committed.any():
                keys = {z: committed}
        return keys

    def auto_segment(self, whole_volume: bool = True) -> None:
        """Segment without prompts into a NEW labels layer (adapter class head if one is active)."""
        image = self.image_layer
        if image is None or self._current_volume() is None:
            return
        z = self._current_slice()
        try:
            from ..engine import automatic  # imported in the GUI thread, never first in a worker
        except ImportError as error:
            show_error(f"napari-sam-ft: automatic segmentation is not available ({error})")
            return

        def compute(predictor, progress, should_cancel):
            if whole_volume:
                return automatic.segment_volume(predictor, progress=progress, should_cancel=should_cancel)
            labels = np.zeros(predictor.volume.shape, dtype=np.int32)
            labels[z] = automatic.segment_slice(predictor, z)
            return labels

        def add_layer(labels: np.ndarray) -> None:
            where = "" if whole_volume else f" slice {z}"
            new_labels_layer(self._viewer, image, f"{image.name} auto-segmentation{where}", labels)
            self._select_points_layer()

        self._run_task("auto-segment volume" if whole_volume else f"auto-segment slice {z}", compute, add_layer)

    # -- status ------------------------------------------------------------------------------------
    def _update_status(self) -> None:
        predictor = self.predictor
        if predictor is None:
            return
        status = predictor.status()
        click = "" if np.isnan(self.last_click_to_preview_ms) else f" · click→preview {self.last_click_to_preview_ms:.0f} ms"
        self.controls.status_label.setText(
            f"{status['device']} · {status['dtype']} · cache {status['cached_slices']}/{status['num_slices']} slices "
            f"({status['cache_mb']:.0f} MB) · last decode {status['last_ms']:.0f} ms{click}")

    def closeEvent(self, event) -> None:
        for task in (self._task, self._slice_task):
            if task is not None:
                task.cancel()
        for key in self._key_actions:
            self._viewer.bind_key(key, None)
        super().closeEvent(event)
