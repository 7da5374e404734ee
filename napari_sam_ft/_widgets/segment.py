"""Interactive SAM segmentation of a 3D image layer: clicks and boxes -> preview -> commit, propagate, auto.

Each prompt edit decodes the current slice from its cached embedding into the preview layer; slices
are encoded in background workers. Commits go through napari's Labels undo history.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QWidget

from ..engine.click_search import predict_object, uses_click_search
from ..engine.predictor import VolumePredictor
from ..engine.window_choice import predictor_for_box, windows_used
from ..models.registry import MODELS
from ..volume import Volume
from ._controls import NEW_LABELS_LAYER, build_controls, status_text
from ._events import Hookups
from ._layers import (NEGATIVE, POSITIVE, PREVIEW_VALUE, LayerVolume, commit_mask, current_slice_index,
                      key_masks_for_propagation, make_boxes_layer, make_points_layer, make_preview_layer,
                      new_labels_layer, slice_prompts, slices_with_content)
from .session_panel import CHOICES_KEY
from ..finetune.adapters import AdapterError
from ._session import NO_ADAPTER, SegmentSession, SessionChoices
from ._tasks import TaskRunner, automatic_segmentation, propagation, repropagation, report_error
from .propagation_review import PropagationReview
from ._workers import BackgroundTask, TaskOutcome, torch_threads

FINISHED_ACTIONS = ("added", "changed", "removed")  # napari also emits "adding", "changing", "removing"


class SegmentWidget(QWidget):
    """Dock widget: choose image, model, window and adapter; click or box to segment; commit; propagate; auto.

    ``session`` lets several widgets share one loaded model and embedding cache (each widget makes its own
    by default).
    """

    def __init__(self, napari_viewer, session: SegmentSession | None = None, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self._session = session if session is not None else SegmentSession()
        self.controls = build_controls(self, napari_viewer)
        self.tasks = TaskRunner(self.controls, self._session, on_update=self._update_status,
                                on_end=self._task_ended)
        self._layer_volume = LayerVolume()
        self.review = PropagationReview()  # the last propagation: per-slice IoU, keys, what it wrote
        self._points = self._boxes = self._preview = None
        self._slice_task: BackgroundTask | None = None  # encodes a clicked slice, then segments it
        self._pending_slice: int | None = None
        # Slow prompts (a click's box search on a box-trained model, about a second on a CPU, or a window that has
        # to encode the slice) run in a worker, one at a time; a prompt made meanwhile is segmented when it ends.
        self._prompt_task: BackgroundTask | None = None
        self._prompt_pending: tuple[int, float] | None = None
        self._adapter_change_pending = False  # applied once the work started with the previous adapter has ended
        self._muted = False  # True while the widget itself edits the prompt layers
        self.last_click_to_preview_ms = float("nan")
        # torch threads for the decoder on the GUI thread; None keeps torch's default, which measured as fast as
        # one thread with the viewer idle and faster while encoding (benchmarks/gui_latency.py compares them).
        self.decode_threads: int | None = None
        self._key_actions = {"s": self.segment_current_slice, "c": self.commit, "Shift-S": self.propagate,
                             "Shift-C": self.clear_prompts}
        self._hookups = Hookups(self)
        self._hookups.on_release(self._cancel_background_work)
        self._bind_keys(self._viewer)
        self._connect_controls()
        self._image_changed()

    def _connect_controls(self) -> None:
        c = self.controls
        c.image_combo.currentIndexChanged.connect(self._image_changed)
        c.adapter_chosen.connect(self.set_adapter)
        c.adapter_combo.currentTextChanged.connect(self._adapter_changed)
        c.encode_button.clicked.connect(self.encode_volume)
        c.negative_check.toggled.connect(lambda _checked: self._reset_point_sign())
        c.segment_button.clicked.connect(self.segment_current_slice)
        c.commit_button.clicked.connect(self.commit)
        c.propagate_button.clicked.connect(self.propagate)
        c.clear_button.clicked.connect(self.clear_prompts)
        c.weakest_button.clicked.connect(self.go_to_weakest_slice)
        c.repropagate_button.clicked.connect(self.repropagate)
        c.auto_slice_button.clicked.connect(lambda: self.auto_segment(whole_volume=False))
        c.auto_volume_button.clicked.connect(lambda: self.auto_segment(whole_volume=True))
        c.cancel_button.clicked.connect(self.cancel)

    def _bind_keys(self, provider) -> None:
        for key, action in self._key_actions.items():
            self._hookups.bind_key(provider, key, lambda _provider, action=action: action())

    # -- state -------------------------------------------------------------------------------------
    @property
    def image_layer(self):
        return self.controls.image_combo.current_layer()

    @property
    def predictor(self) -> VolumePredictor | None:
        """The predictor for the current choices, if it is built already."""
        choices, volume = self._choices(), self._layer_volume.cached(self.image_layer)
        return None if choices is None or volume is None else self._session.ready_predictor(choices, volume)

    @property
    def idle(self) -> bool:
        """No background work running (tests and scripts wait for this)."""
        return not self.tasks.busy and self._slice_task is None and self._prompt_task is None

    @property
    def segmenting_in_background(self) -> bool:
        """A slow prompt (a click's box search, or a new window to encode) is being segmented in its worker."""
        return self._prompt_task is not None

    def set_adapter(self, adapter_dir: str | None) -> None:
        """Use the LoRA adapter saved in ``adapter_dir`` (None or "none": the base model); for the fine-tune panel."""
        combo = self.controls.adapter_combo
        text = NO_ADAPTER if adapter_dir in (None, "", NO_ADAPTER) else str(adapter_dir)
        if combo.findText(text) < 0:
            combo.addItem(text)
        combo.setCurrentText(text)

    def _adapter_changed(self, adapter_dir: str) -> None:
        if adapter_dir != NO_ADAPTER:
            if not Path(adapter_dir).is_dir():
                error = AdapterError(f"{adapter_dir} is not a folder; choose the folder an adapter was saved in")
                report_error(self.controls, "loading the adapter", error)
                return
        # Work started with the previous adapter is cancelled (the engine would also stop it at its next batch);
        # the new adapter is applied once that work has ended, and the prompted slice is segmented again with it.
        self._cancel_background_work()
        self._adapter_change_pending = True
        self._apply_pending_adapter()

    def _apply_pending_adapter(self) -> None:
        if not (self._adapter_change_pending and self.idle):
            return
        self._adapter_change_pending = False
        if self._session.model is None or self.image_layer is None:
            return  # the first task loads the model with the chosen adapter
        z = self._current_slice()

        def segment_again(_value) -> None:
            if self._points is not None and not slice_prompts(self._points, self._boxes, z).empty:
                self._segment_prompted_slice(z, time.perf_counter())

        self._run("apply adapter", lambda predictor, progress, should_cancel: None, segment_again)

    def _choices(self) -> SessionChoices | None:
        if self.image_layer is None:
            return None
        c = self.controls
        choices = SessionChoices(c.model_combo.currentText(), c.checkpoint_edit.text().strip(),
                                 c.device_combo.currentText(), c.window_combo.currentText(),
                                 c.adapter_combo.currentText())
        # Recorded on the image layer so a saved session (the Session panel) knows how it was segmented.
        recorded = dict(self.image_layer.metadata.get(CHOICES_KEY) or {})
        recorded.update(model_name=choices.model_name, checkpoint=choices.checkpoint or None, window=choices.window,
                        adapter_dir=None if choices.adapter_dir == NO_ADAPTER else choices.adapter_dir)
        self.image_layer.metadata[CHOICES_KEY] = recorded
        return choices

    def _restore_choices(self) -> None:
        """Put back the model, window and adapter recorded on the image layer (e.g. by an opened session)."""
        recorded = (self.image_layer.metadata.get(CHOICES_KEY) or {}) if self.image_layer is not None else {}
        c = self.controls
        if recorded.get("model_name") and c.model_combo.findText(recorded["model_name"]) >= 0:
            c.model_combo.setCurrentText(recorded["model_name"])
        if recorded.get("checkpoint"):
            c.checkpoint_edit.setText(str(recorded["checkpoint"]))
        if isinstance(recorded.get("window"), str) and c.window_combo.findText(recorded["window"]) >= 0:
            c.window_combo.setCurrentText(recorded["window"])
        if recorded.get("adapter_dir"):
            self.set_adapter(recorded["adapter_dir"])

    def _current_volume(self, notify: bool = True) -> Volume | None:
        """The image layer as a Volume, or None after saying why (a notification, or the task line)."""
        image = self.image_layer
        try:
            if image is None:
                raise ValueError("add or open a 3D image first")
            return self._layer_volume.get(image)
        except ValueError as error:
            where = f" cannot segment layer {image.name!r}" if image is not None else ""
            message = f"napari-sam-ft{where}: {error}"
            if notify:
                show_error(message)
            else:
                self.controls.task_label.setText(message)
            return None

    def prompt_layers(self, notify: bool = True):
        """(points, boxes, preview) layers over the current image, created or re-created as needed."""
        image = self.image_layer
        if image is None or self._current_volume(notify) is None:
            return None
        layers, ours = self._viewer.layers, (self._preview, self._boxes, self._points)
        if not (all(layer is not None and layer in layers for layer in ours)
                and self._preview.data.shape == image.data.shape and tuple(self._preview.scale) == tuple(image.scale)):
            for layer in ours:
                if layer is not None and layer in layers:
                    layers.remove(layer)
            self._preview = make_preview_layer(self._viewer, image)
            self.review.clear()  # it described the previous preview
            self.controls.propagation_label.setText("")
            self._boxes = make_boxes_layer(self._viewer, image)
            self._points = make_points_layer(self._viewer, image)  # then _select_prompt_tool picks the active one
            for layer in (self._points, self._boxes):
                self._hookups.connect(layer.events.data, partial(self._on_prompts_changed, layer))
            self._hookups.add_mouse_callback(self._points, self._pick_point_sign)  # before napari's "add point"
            for layer in (self._points, self._boxes, self._preview):
                self._bind_keys(layer)  # the active layer's keys come first; ours must win over "s" = select
                self._hookups.bind_key(layer, "Control-Z", lambda _layer: self.undo())
            self._reset_point_sign()
            self._select_prompt_tool()
        return self._points, self._boxes, self._preview

    def _image_changed(self, *_args) -> None:
        # Deferred: the combo changes inside the layer list's own "inserted" event.
        QTimer.singleShot(0, self._make_prompt_layers)

    def _make_prompt_layers(self) -> None:
        if self.image_layer is not None:
            self._restore_choices()
            self.prompt_layers(notify=False)  # an unusable layer is explained on the task line until used

    # -- prompts -> preview ------------------------------------------------------------------------
    def _pick_point_sign(self, layer, event) -> None:
        """Shift/Ctrl held at the press makes the point added on release negative (positive in negative mode)."""
        flipped = bool({"Shift", "Control"} & {str(key) for key in event.modifiers})
        layer.feature_defaults["prompt"] = NEGATIVE if self.controls.negative_check.isChecked() != flipped else POSITIVE

    def _reset_point_sign(self) -> None:
        if self._points is not None:
            self._points.feature_defaults["prompt"] = NEGATIVE if self.controls.negative_check.isChecked() else POSITIVE

    def _on_prompts_changed(self, layer, event) -> None:
        """A point or box was added, moved or deleted: re-segment the slice it is on."""
        if self._muted or str(event.action) not in FINISHED_ACTIONS:
            return
        started = time.perf_counter()
        self._reset_point_sign()  # after a Shift/Ctrl-click
        added = str(event.action) == "added" and len(layer.data) > 0
        z = int(np.rint(np.asarray(layer.data[-1])[..., 0].mean())) if added else self._current_slice()
        self._segment_prompted_slice(z, started)

    def _current_slice(self) -> int:
        return current_slice_index(self._viewer, self.image_layer)

    def segment_current_slice(self) -> None:
        """Predict the current slice from its points and box into the preview (key ``s``)."""
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
        if self._prompt_task is not None:  # a slow prompt is being segmented: this one goes next
            self._prompt_pending = (z, started)
            return
        # A click's box search, or a box whose window (chosen from under it) has not encoded this slice yet,
        # takes a second or so: it runs in a worker.
        needs_encoding = not predictor_for_box(predictor, z, prompts.box_xyxy).is_encoded(z)
        if needs_encoding or (prompts.box_xyxy is None and uses_click_search(predictor)):
            self._segment_in_worker(predictor, z, prompts, started)
            return
        # One point is ambiguous (part or whole?): let SAM pick the best of its three masks.
        try:
            with torch_threads(self.decode_threads):  # clicks as boxes for box-trained models, window per prompt
                prediction = predict_object(predictor, z, prompts.points_xy, prompts.point_labels, prompts.box_xyxy)
        except Exception as error:
            report_error(self.controls, f"segmenting slice {z}", error)
            return
        self._show_preview_slice(z, prediction.mask)
        self.last_click_to_preview_ms = (time.perf_counter() - started) * 1000.0
        self._update_status()

    def _segment_in_worker(self, predictor: VolumePredictor, z: int, prompts, started: float) -> None:
        """Segment a slow prompt off the GUI thread: clicks without a box on a box-trained model (their box
        search), or a prompt whose window still has to encode the slice."""
        threads = self.decode_threads

        def work(progress, should_cancel):
            with torch_threads(threads):
                return predict_object(predictor, z, prompts.points_xy, prompts.point_labels, prompts.box_xyxy)

        def done(outcome: TaskOutcome) -> None:
            self._prompt_task = None
            pending, self._prompt_pending = self._prompt_pending, None
            if pending is not None:  # newer prompts came in meanwhile: they decide the preview
                self._segment_prompted_slice(*pending)
                return
            if outcome.error is not None:
                report_error(self.controls, f"segmenting slice {z}", outcome.error)
            elif outcome.succeeded and self._preview is not None:
                self._show_preview_slice(z, outcome.value.mask)
                self.last_click_to_preview_ms = (time.perf_counter() - started) * 1000.0
            self._update_status()
            self._apply_pending_adapter()

        self.controls.task_label.setText(f"segmenting slice {z} in the background…")
        self._prompt_task = BackgroundTask(f"segment slice {z}", work, done).start()

    def _encode_then_segment(self, z: int) -> None:
        """Encode slice ``z`` in a worker (loading the model first if needed), then segment it."""
        self._pending_slice = z
        if self._slice_task is not None:
            return  # the running task segments the newest pending slice when it ends
        volume, choices = self._current_volume(), self._choices()
        if volume is None or choices is None:
            return
        session = self._session

        def work(progress, should_cancel):
            session.build(choices, volume).encode_slices([z], progress=progress, should_cancel=should_cancel)

        def done(outcome: TaskOutcome) -> None:
            self._slice_task = None
            self.controls.cancel_button.setEnabled(self.tasks.busy)
            pending, self._pending_slice = self._pending_slice, None
            self.controls.task_label.setText(f"encoded slice {z} in {outcome.seconds:.1f} s" if outcome.succeeded
                                             else f"encoding slice {z} cancelled" if outcome.cancelled else "")
            if outcome.error is not None:
                report_error(self.controls, f"encoding slice {z}", outcome.error)
            elif outcome.succeeded and pending is not None and self._points is not None:
                self._segment_prompted_slice(pending, time.perf_counter())
            self._update_status()
            self._apply_pending_adapter()

        self.controls.task_label.setText(f"loading the model and encoding slice {z}…" if self.predictor is None
                                         else f"encoding slice {z}…")
        self._slice_task = BackgroundTask(f"encode slice {z}", work, done).start()
        self.controls.cancel_button.setEnabled(True)

    def _show_preview_slice(self, z: int, mask: np.ndarray | None) -> None:
        self._preview.data[z] = 0 if mask is None else mask.astype(np.uint8) * PREVIEW_VALUE
        self._preview.refresh()

    # -- commit, clear -----------------------------------------------------------------------------
    def target_labels_layer(self, create: bool = True):
        """The labels layer commits go into; with "(new layer)" chosen, a new one is made and chosen."""
        combo, image = self.controls.labels_combo, self.image_layer
        layer = combo.current_layer()
        if layer is None and create and combo.currentText() == NEW_LABELS_LAYER and image is not None:
            layer = new_labels_layer(self._viewer, image, f"{image.name} labels")
            combo.select_layer(layer)
            self._select_prompt_tool()
        return layer

    def commit(self) -> None:
        """Paint the preview into the labels layer as the chosen label id (key ``c``); Ctrl-Z undoes it."""
        if self.prompt_layers() is None:
            return
        preview = np.asarray(self._preview.data)
        slices = slices_with_content(preview)
        if slices.size == 0:
            show_info("napari-sam-ft: the preview is empty; nothing to commit")
            return
        labels, label_id = self.target_labels_layer(), self.controls.label_spin.value()
        if labels is None:
            return
        try:
            changed, kept = commit_mask(labels, slices, preview[slices] > 0, label_id,
                                        self.controls.overwrite_check.isChecked())
        except ValueError as error:
            show_error(f"napari-sam-ft: {error}")
            return
        note = f"; {kept} voxels of other labels kept (tick 'overwrite other labels' to replace them)" if kept else ""
        self.controls.task_label.setText(f"committed {changed} voxels as label {label_id} into {labels.name!r}{note}")
        self.clear_prompts(keep_review=True)  # committed slices are keys of a later re-propagation

    def undo(self) -> None:
        """Undo the labels layer's last edit, e.g. a commit (Ctrl-Z while a SAM layer is selected)."""
        labels = self.target_labels_layer(create=False)
        if labels is not None:
            labels.undo()

    def clear_prompts(self, keep_review: bool = False) -> None:
        """Remove every point and box and empty the preview (key ``Shift-C``)."""
        if self._points is None or self._points not in self._viewer.layers:
            return
        if not keep_review:
            self.review.clear()
            self.controls.propagation_label.setText("")
        self._muted = True
        try:
            self._points.data = np.empty((0, 3))
            self._boxes.data = []
        finally:
            self._muted = False
        self._preview.data[:] = 0
        self._preview.refresh()

    @property
    def best_prompt_layer(self):
        """The prompt layer the chosen model works best with: boxes for box-trained models (LiteMedSAM, MedSAM:
        a box beats a searched click on every real case in docs/results), points for SAM and MobileSAM."""
        spec = MODELS.get(self.controls.model_combo.currentText())
        return self._boxes if spec is not None and spec.automatic_prompt == "box" else self._points

    def _select_prompt_tool(self) -> None:
        layer = self.best_prompt_layer
        if layer is not None and layer in self._viewer.layers:
            self._viewer.layers.selection.active = layer
            layer.mode = "add_rectangle" if layer is self._boxes else "add"  # napari resets an inactive layer's mode

    # -- long tasks --------------------------------------------------------------------------------
    def _run(self, name: str, compute, on_success) -> bool:
        volume, choices = self._current_volume(), self._choices()
        return volume is not None and choices is not None and self.tasks.run(name, volume, choices, compute, on_success)

    def encode_volume(self) -> None:
        """Precompute every slice's embedding in the background (cached in memory and on disk)."""
        self._run("encode volume", lambda predictor, progress, should_cancel: predictor.encode_volume(
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
        last = self._preview.data.shape[0] - 1
        slice_range = None if reach == 0 else (max(0, min(key_masks) - reach), min(last, max(key_masks) + reach))

        def show(value) -> None:
            result, scores = value
            # Written slice by slice where the result holds the object: quick on large scans.
            filled = slices_with_content(result)
            self._preview.data[:] = 0
            self._preview.data[filled] = result[filled].astype(np.uint8) * PREVIEW_VALUE
            self._preview.refresh()
            self.review.clear()
            self._record_review({int(z): scores.get(int(z), float("nan")) for z in filled}, key_masks)

        self._run("propagate", propagation(key_masks, stop_iou, slice_range), show)

    def _record_review(self, written: dict[int, float], keys) -> None:
        self.review.record(self._preview.data, written, keys)
        self.controls.propagation_label.setText(self.review.summary())

    def go_to_weakest_slice(self) -> None:
        """Move the viewer to the propagated slice with the lowest predicted IoU that the user has not corrected."""
        if self._preview is None or not self.review.active:
            show_info("napari-sam-ft: propagate first; the weakest slice is the one with the lowest predicted IoU")
            return
        z = self.review.weakest_slice(exclude=self.review.corrected_slices(self._preview.data))
        if z is None:
            show_info("napari-sam-ft: every propagated slice is a key or was corrected")
            return
        self._viewer.dims.set_point(0, float(self.image_layer.data_to_world([z, 0, 0])[0]))
        self.controls.task_label.setText(f"slice {z}: predicted IoU {self.review.scores[z]:.2f}, the weakest")

    def repropagate(self) -> None:
        """Regrow only the slices between key, corrected and committed slices; those keep exactly what they hold.

        Only the preview changes (the labels layer changes on commit, which Ctrl-Z undoes)."""
        if self.prompt_layers() is None:
            return
        if not self.review.active:
            show_info("napari-sam-ft: propagate first, correct slices, then re-propagate")
            return
        key_masks = self._repropagation_keys()
        if not any(mask.any() for mask in key_masks.values()):
            show_info("napari-sam-ft: the key slices are empty; nothing to regrow from")
            return

        def show(value) -> None:
            regrown, scores = value
            for z, mask in regrown.items():  # never a key slice: the engine returns only slices between keys
                self._preview.data[z] = mask.astype(np.uint8) * PREVIEW_VALUE
            self._preview.refresh()
            self._record_review({z: scores[z] for z in regrown}, key_masks)

        self._run("re-propagate", repropagation(key_masks), show)

    def _repropagation_keys(self) -> dict[int, np.ndarray]:
        """The propagation's keys, the slices corrected since, and the slices committed as this label in its span.

        A slice's key mask is its preview; a committed slice whose preview is empty uses the committed label."""
        preview = self._preview.data
        keys = set(self.review.keys) | set(self.review.corrected_slices(preview))
        committed: dict[int, np.ndarray] = {}
        labels, span = self.target_labels_layer(create=False), self.review.span()
        if labels is not None and span is not None:
            label_id = self.controls.label_spin.value()
            for z in range(span[0], span[1] + 1):
                mask = np.asarray(labels.data[z]) == label_id
                if mask.any():
                    committed[z] = mask
        key_masks = {z: np.asarray(preview[z]) > 0 for z in keys | set(committed)}
        for z, mask in committed.items():
            if not key_masks[z].any():
                key_masks[z] = mask
        return key_masks

    def _key_masks(self) -> dict[int, np.ndarray]:
        z, labels = self._current_slice(), self.target_labels_layer(create=False)
        committed = None if labels is None else np.asarray(labels.data[z]) == self.controls.label_spin.value()
        return key_masks_for_propagation(self._preview.data, self._points, self._boxes, z, committed)

    def auto_segment(self, whole_volume: bool = True) -> None:
        """Segment without prompts into a NEW labels layer (with the adapter's class head when one is active)."""
        image = self.image_layer
        if image is None or self._current_volume() is None:
            return
        z = self._current_slice()
        compute = automatic_segmentation(whole_volume, z, self.controls.grid_spin.value())

        def add_layer(labels: np.ndarray) -> None:
            where = "" if whole_volume else f" slice {z}"
            new_labels_layer(self._viewer, image, f"{image.name} auto-segmentation{where}", labels)
            self._select_prompt_tool()

        self._run("auto-segment volume" if whole_volume else f"auto-segment slice {z}", compute, add_layer)

    # -- status ------------------------------------------------------------------------------------
    def _update_status(self) -> None:
        predictor = self.predictor
        if predictor is not None:
            status = dict(predictor.status(), window=", ".join(windows_used(predictor)))
            self.controls.status_label.setText(status_text(status, self.last_click_to_preview_ms))

    def cancel(self) -> None:
        """Stop every running job: the long task and a clicked slice's encode (the Cancel button)."""
        self.tasks.cancel()
        if self._slice_task is not None:
            self._slice_task.cancel()
            self._pending_slice = None
            self.controls.task_label.setText(f"cancelling {self._slice_task.name}…")

    def _task_ended(self) -> None:
        self._update_status()
        self._apply_pending_adapter()

    def _cancel_background_work(self) -> None:
        for task in (self.tasks.task, self._slice_task, self._prompt_task):
            if task is not None:
                task.cancel()

    def closeEvent(self, event) -> None:
        self._cancel_background_work()
        super().closeEvent(event)
