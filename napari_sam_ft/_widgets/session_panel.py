"""Session panel: save and open sessions, mark slices reviewed, autosave the labels, offer to restore them.

The panel talks to layers only. It reads prompts from the segment widget's "SAM points"/"SAM boxes" layers
and the model choices from the image layer's metadata (``CHOICES_KEY``), and autosaves the chosen Labels
layer every N edits through ``session.Autosaver``. Nothing slow runs on the GUI thread: the autosave copy and
write, and a session's hashing, writing and reading, run in threads; the GUI thread only gathers layer
references and adds the layers read. Autosave keeps running while an earlier autosave waits to be restored or
discarded: each layer of each napari process writes its own file, so the earlier one is never overwritten.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (QFileDialog, QFormLayout, QFrame, QHBoxLayout, QLabel, QPushButton, QVBoxLayout,
                            QWidget)

from .._layer_data import GEOMETRY_KEY, labels_layer_data, layer_channel, scan_layers_data, volume_from_layer
from ..engine.prompts import NAPARI_TO_PIXEL, SlicePrompt, points_zyx_to_prompts, rectangle_zyx_to_box
from ..session import (AUTOSAVE_EVERY_EDITS, SESSION_SUFFIX, AutosaveInfo, Autosaver, OpenedSession, SessionError,
                       discard_autosave, open_session, restore_autosave, save_session, scan_autosaves,
                       session_from_volume)
from ..volume import VolumeError
from ._events import Hookups
from ._layer_combo import LayerComboBox
from ._workers import BackgroundTask, TaskOutcome, describe_error
from ._layers import (BOXES_NAME, NEGATIVE, POINTS_NAME, POSITIVE, PREVIEW_NAME, current_slice_index,
                      geometry_kwargs, make_boxes_layer, make_points_layer)

# Image-layer metadata where the model choices of a session live (the segment widget may read and write it).
CHOICES_KEY = "napari_sam_ft_choices"
CHOICE_FIELDS = ("model_name", "checkpoint", "adapter_dir", "window", "axis", "channels")


def image_source_path(image: Image | None) -> Path | None:
    """The file an image layer was read from (our reader's geometry metadata, or napari's layer source)."""
    if image is None:
        return None
    geometry = image.metadata.get(GEOMETRY_KEY) or {}
    source = geometry.get("source_path") or getattr(image.source, "path", None)
    return Path(source) if source else None


class LabelsAutosave:
    """Connects a Labels layer's paint and data events to an ``Autosaver``; ``disconnect()`` undoes it."""

    def __init__(self, labels: Labels, autosaver: Autosaver):
        self.labels = labels
        self.autosaver = autosaver
        self._emitters = (labels.events.paint, labels.events.data)
        self._connected = True
        for emitter in self._emitters:
            emitter.connect(self._edited)

    def _edited(self, _event=None) -> None:
        # napari emits "paint" before a single (unblocked) edit reaches the data: count it once the event is done.
        QTimer.singleShot(0, self._record)

    def _record(self) -> None:
        if self._connected:
            self.autosaver.record_edit()

    def disconnect(self) -> None:
        self._connected = False
        for emitter in self._emitters:
            emitter.disconnect(self._edited)


def connect_autosave(labels: Labels, image_path: str | Path, every_edits: int = AUTOSAVE_EVERY_EDITS,
                     on_saved=None, on_error=None) -> LabelsAutosave:
    """Autosave ``labels`` for ``image_path`` every ``every_edits`` paint/data edits, writing in a thread."""
    autosaver = Autosaver(image_path, lambda: labels.data, every_edits=every_edits, layer_name=labels.name,
                          background=True, on_saved=on_saved, on_error=on_error)
    return LabelsAutosave(labels, autosaver)


class SessionPanel(QWidget):
    """Dock widget: Save/Open session, Mark slice reviewed, autosave status and the restore prompt."""

    autosaved = Signal(str)  # emitted from the autosave thread; Qt delivers it on the GUI thread
    autosave_failed = Signal(str)

    def __init__(self, napari_viewer, every_edits: int = AUTOSAVE_EVERY_EDITS, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.every_edits = every_edits
        self.reviewed_slices: set[int] = set()
        self.recoverable: AutosaveInfo | None = None  # the one offered now
        self._more_recoverable: list[AutosaveInfo] = []  # offered after it
        self._file_task = None  # a session save or open running in a thread
        self._discard_when_autosaved: AutosaveInfo | None = None  # a restored autosave, replaced by a new one
        self.last_saved: Path | None = None
        self.last_opened: tuple[Image, Labels | None] | None = None
        self._autosave: LabelsAutosave | None = None
        self._hookups = Hookups(self)
        self._hookups.on_release(self._stop_autosave)
        self._build()
        self.autosaved.connect(self._show_autosaved)
        self.autosave_failed.connect(lambda message: show_warning(f"autosave failed: {message}"))
        self._hookups.connect(napari_viewer.dims.events.current_step, self._update_reviewed_text)
        self.image_combo.currentIndexChanged.connect(self._image_changed)
        self.labels_combo.currentIndexChanged.connect(lambda _index: self._start_autosave())
        self._image_changed()

    def _build(self) -> None:
        viewer = self._viewer
        self.image_combo = LayerComboBox(viewer, Image)
        self.labels_combo = LayerComboBox(viewer, Labels, exclude_names=(PREVIEW_NAME,))
        self.save_button = QPushButton("Save session…")
        self.open_button = QPushButton("Open session…")
        self.review_button = QPushButton("Mark slice reviewed")
        self.reviewed_label = QLabel()
        self.autosave_label = QLabel("Autosave: no labels layer yet")
        self.autosave_label.setWordWrap(True)
        self.file_label = QLabel()  # what a save/open/restore running in a thread is doing
        self.file_label.setWordWrap(True)
        self.restore_message = QLabel()
        self.restore_message.setWordWrap(True)
        self.restore_button = QPushButton("Restore")
        self.discard_button = QPushButton("Discard")
        self.restore_frame = QFrame()
        self.restore_frame.setFrameShape(QFrame.Shape.StyledPanel)
        restore_layout = QVBoxLayout(self.restore_frame)
        restore_layout.addWidget(self.restore_message)
        buttons = QHBoxLayout()
        buttons.addWidget(self.restore_button)
        buttons.addWidget(self.discard_button)
        restore_layout.addLayout(buttons)
        self.restore_frame.setVisible(False)

        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Labels", self.labels_combo)
        layout = QVBoxLayout(self)
        layout.addWidget(self.restore_frame)
        layout.addLayout(form)
        session_buttons = QHBoxLayout()
        session_buttons.addWidget(self.save_button)
        session_buttons.addWidget(self.open_button)
        layout.addLayout(session_buttons)
        layout.addWidget(self.review_button)
        layout.addWidget(self.reviewed_label)
        layout.addWidget(self.autosave_label)
        layout.addWidget(self.file_label)
        layout.addStretch(1)

        self.save_button.clicked.connect(self._ask_save)
        self.open_button.clicked.connect(self._ask_open)
        self.review_button.clicked.connect(self.toggle_reviewed)
        self.restore_button.clicked.connect(self.restore)
        self.discard_button.clicked.connect(self.discard)

    # -- layers ----------------------------------------------------------------------------------
    @property
    def image_layer(self) -> Image | None:
        return self.image_combo.current_layer()

    @property
    def labels_layer(self) -> Labels | None:
        labels = self.labels_combo.current_layer()
        image = self.image_layer
        if labels is None or image is None or tuple(labels.data.shape) != tuple(image.data.shape[:3]):
            return None
        return labels

    def _image_changed(self, *_args) -> None:
        self.reviewed_slices = set()
        self._update_reviewed_text()
        self.check_for_autosave()
        self._start_autosave()

    # -- autosave --------------------------------------------------------------------------------
    def check_for_autosave(self) -> AutosaveInfo | None:
        """Offer to restore labels autosaved for the chosen image by a session that ended without saving.

        Damaged autosaves found on the way are reported; ``scan_autosaves`` has moved them aside (``*.damaged``).
        """
        path = image_source_path(self.image_layer)
        scan = scan_autosaves(path) if path is not None and path.exists() else None
        if scan is not None:
            for damaged in scan.damaged:
                show_warning(f"napari-sam-ft: an autosave of {path.name} is damaged and cannot be restored; "
                             f"it was kept as {damaged}")
        self._more_recoverable = list(scan.recoverable) if scan is not None else []
        return self._offer_next_autosave()

    def _offer_next_autosave(self) -> AutosaveInfo | None:
        info = self.recoverable = self._more_recoverable.pop(0) if self._more_recoverable else None
        if info is not None:
            changed = " The image file changed since; check the labels fit." if info.image_changed else ""
            layer = f" of {info.layer_name!r}" if info.layer_name else ""
            self.restore_message.setText(
                f"Unsaved labels{layer} for {Path(info.image_path).name} from {info.saved_at_text} ({info.edits} "
                f"edits) were found. Restore them as a new labels layer?{changed}")
        self.restore_frame.setVisible(info is not None)
        return info

    def _start_autosave(self) -> None:
        self._stop_autosave()
        path, labels = image_source_path(self.image_layer), self.labels_layer
        if path is None:
            self.autosave_label.setText("Autosave: off (the image was not opened from a file)")
        elif labels is None:
            self.autosave_label.setText("Autosave: choose a labels layer of the image's shape")
        else:
            self._autosave = connect_autosave(labels, path, self.every_edits, on_saved=self._emit_autosaved,
                                              on_error=lambda error: self.autosave_failed.emit(str(error)))
            self.autosave_label.setText(f"Autosave: every {self.every_edits} edits of {labels.name!r}")

    def _stop_autosave(self) -> None:
        # Not waited for: a write still running finishes in its thread (atomically) while the viewer goes on.
        if self._autosave is not None:
            self._autosave.disconnect()
            self._autosave = None

    @property
    def autosaver(self) -> Autosaver | None:
        return None if self._autosave is None else self._autosave.autosaver

    def _emit_autosaved(self, path: Path) -> None:
        try:
            self.autosaved.emit(str(path))
        except RuntimeError:  # the panel was closed while the write ran
            pass

    def _show_autosaved(self, _path: str) -> None:
        from datetime import datetime

        if self._discard_when_autosaved is not None:  # the restored labels are safe in their own autosave now
            discard_autosave(self._discard_when_autosaved)
            self._discard_when_autosaved = None
        if self._autosave is not None:
            self.autosave_label.setText(f"Autosaved {datetime.now():%H:%M:%S} ({self._autosave.autosaver.total_edits} "
                                        f"edits of {self._autosave.labels.name!r}); every {self.every_edits} edits")

    def restore(self) -> BackgroundTask | None:
        """Read the offered autosave in a thread, then add it as a new Labels layer over the image.

        The autosave file is deleted once the restored layer's own first autosave is written, so a crash in
        between still finds it.
        """
        image, info = self.image_layer, self.recoverable
        if image is None or info is None:
            return None
        like = volume_from_layer(image.data, image.metadata)

        def add_layer(labels: np.ndarray) -> None:
            name = f"{info.layer_name or image.name} (restored {info.saved_at_text})"
            layer = self._viewer.add_labels(labels, name=name, **geometry_kwargs(image))
            self.labels_combo.select_layer(layer)
            if self._autosave is not None and self._autosave.labels is layer:
                self._discard_when_autosaved = info
                self._autosave.autosaver.save_now()
            self._offer_next_autosave()

        def failed() -> None:  # a damaged file was moved aside by restore_autosave: offer the next one
            self._offer_next_autosave()

        return self._run_file_task("restore the autosave", lambda: restore_autosave(info, like=like), add_layer,
                                   on_error=failed)

    def discard(self) -> None:
        """Delete the offered earlier autosave (after the user said so); the next one, if any, is offered."""
        if self.recoverable is not None:
            discard_autosave(self.recoverable)
        self._offer_next_autosave()

    # -- work off the GUI thread -------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        """No session file work running (tests and scripts wait for this)."""
        return self._file_task is None

    def _run_file_task(self, name: str, work, on_success, on_error=None) -> BackgroundTask | None:
        """``work()`` in a thread; ``on_success(value)`` on the GUI thread, or an error notification."""
        if self._file_task is not None:
            show_info(f"napari-sam-ft: wait until {self._file_task.name} has finished")
            return None

        def done(outcome: TaskOutcome) -> None:
            self._file_task = None
            self._set_file_busy(False)
            if outcome.error is not None:
                self.file_label.setText(f"{name}: failed")
                show_error(f"napari-sam-ft: cannot {name}: {describe_error(outcome.error)}")
                if on_error is not None:
                    on_error()
                return
            self.file_label.setText(f"{name}: done in {outcome.seconds:.1f} s")
            on_success(outcome.value)

        self._set_file_busy(True, f"{name}…")
        self._file_task = BackgroundTask(name, lambda _progress, _should_cancel: work(), done).start()
        return self._file_task

    def _set_file_busy(self, busy: bool, text: str = "") -> None:
        for button in (self.save_button, self.open_button, self.restore_button, self.discard_button):
            button.setEnabled(not busy)
        if busy:
            self.file_label.setText(text)

    # -- reviewed slices -------------------------------------------------------------------------
    def toggle_reviewed(self) -> None:
        image = self.image_layer
        if image is None:
            return
        index = current_slice_index(self._viewer, image)
        self.reviewed_slices ^= {index}
        self._update_reviewed_text()

    def _update_reviewed_text(self, *_args) -> None:
        image = self.image_layer
        if image is None:
            self.reviewed_label.setText("Reviewed: no image")
            return
        current = current_slice_index(self._viewer, image)
        self.review_button.setText("Unmark slice reviewed" if current in self.reviewed_slices
                                   else "Mark slice reviewed")
        self.reviewed_label.setText(f"Reviewed: {len(self.reviewed_slices)} of {image.data.shape[0]} slices "
                                    f"(slice {current}: {'yes' if current in self.reviewed_slices else 'no'})")

    # -- save and open ---------------------------------------------------------------------------
    def _ask_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save session", "", f"napari-sam-ft session (*{SESSION_SUFFIX})")
        if path:
            if not path.endswith(SESSION_SUFFIX):
                path += SESSION_SUFFIX
            self.save(path)

    def _ask_open(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open session", "", f"napari-sam-ft session (*{SESSION_SUFFIX})")
        if path:
            self.open(path)

    def _prompts(self, num_slices: int) -> list[SlicePrompt]:
        prompts: list[SlicePrompt] = []
        layers = {layer.name: layer for layer in self._viewer.layers}
        points, boxes = layers.get(POINTS_NAME), layers.get(BOXES_NAME)
        if isinstance(points, Points) and len(points.data):
            positive = np.asarray(points.features["prompt"].astype(str) == POSITIVE)
            prompts += points_zyx_to_prompts(points.data, positive)
        if isinstance(boxes, Shapes):
            for corners, shape_type in zip(boxes.data, boxes.shape_type):
                if shape_type == "rectangle" and np.asarray(corners).shape[-1] == 3:
                    slice_index, box = rectangle_zyx_to_box(corners)
                    prompts.append(SlicePrompt(slice_index, 1, box))
        return [prompt for prompt in prompts if 0 <= prompt.slice_index < num_slices]

    def save(self, session_path: str | Path) -> BackgroundTask | None:
        """Save the image's session (labels, prompts, choices, reviewed slices) in a thread; ``last_saved`` says
        where once done, and this panel's autosave is then removed (everything is in the session)."""
        image, labels = self.image_layer, self.labels_layer
        if image is None:
            show_error("choose an image layer to save a session of")
            return None
        # Gathered here (references and small lists); hashing, copying and writing run in the thread.
        data, metadata, scale, translate = image.data, dict(image.metadata), image.scale, image.translate
        labels_data = None if labels is None else labels.data
        choices = {key: value for key, value in (metadata.get(CHOICES_KEY) or {}).items() if key in CHOICE_FIELDS}
        if layer_channel(image) is not None:  # one channel of a 4D file: what this layer shows and segments
            choices["channels"] = [layer_channel(image)]
        reviewed = sorted(self.reviewed_slices)
        prompts = self._prompts(int(data.shape[0]))

        def work() -> Path:
            volume = volume_from_layer(data, metadata, scale, translate)
            state = session_from_volume(volume, reviewed_slices=reviewed, prompts=prompts, **choices)
            # A copy first: a stroke painted during the write then waits for the next save, whole.
            snapshot = None if labels_data is None else np.array(labels_data, copy=True)
            return save_session(session_path, state, snapshot, like=volume)

        def saved(path: Path) -> None:
            self.last_saved = path
            if self._autosave is not None:
                self._autosave.autosaver.discard()
            show_info(f"session saved to {path}")

        return self._run_file_task("save the session", work, saved)

    def open(self, session_path: str | Path) -> BackgroundTask | None:
        """Open a session in a thread: its image (reused if already open), labels, prompts, choices and reviewed
        slices are added once read; ``last_opened`` is then (image layer, labels layer or None)."""

        def add_layers(opened: OpenedSession) -> None:
            for warning in opened.warnings:
                show_warning(warning)
            self.last_opened = self._show_session(opened)
            show_info(f"opened session {session_path}")

        return self._run_file_task("open the session", lambda: open_session(session_path), add_layers)

    def _show_session(self, opened: OpenedSession) -> tuple[Image, Labels | None]:
        state, volume = opened.state, opened.volume
        # A session on several channels opens one 3D layer per channel (the Segment widget takes 3D layers).
        first_channel = state.channels[0] if state.channels else None
        image = next((layer for layer in self._viewer.layers if isinstance(layer, Image)
                      and image_source_path(layer) is not None
                      and image_source_path(layer).resolve() == Path(state.image_path).resolve()
                      and tuple(layer.data.shape) == tuple(volume.shape) and layer_channel(layer) == first_channel),
                     None)
        if image is None:
            image = [self._viewer.add_image(data, **kwargs) for data, kwargs, _ in
                     scan_layers_data(volume, state.channels)][0]
        image.metadata[CHOICES_KEY] = {key: getattr(state, key) for key in CHOICE_FIELDS}
        labels = None
        if opened.labels is not None:
            data, kwargs, _ = labels_layer_data(volume.with_array(opened.labels), name=f"{volume.name} labels")
            labels = self._viewer.add_labels(data, **kwargs)
        self._add_prompts(image, state.prompts)
        self.image_combo.select_layer(image)
        self.reviewed_slices = set(state.reviewed_slices)
        if labels is not None:
            self.labels_combo.select_layer(labels)
        self._update_reviewed_text()
        return image, labels

    def _add_prompts(self, image: Image, prompts: list[SlicePrompt]) -> None:
        if not prompts:
            return
        layers = {layer.name: layer for layer in self._viewer.layers}
        points = layers.get(POINTS_NAME) if isinstance(layers.get(POINTS_NAME), Points) else None
        boxes = layers.get(BOXES_NAME) if isinstance(layers.get(BOXES_NAME), Shapes) else None
        for prompt in prompts:
            z = float(prompt.slice_index)
            if prompt.points is not None:
                points = points if points is not None else make_points_layer(self._viewer, image)
                for (x, y), sign in zip(prompt.points, prompt.point_labels):
                    points.feature_defaults = {"prompt": POSITIVE if sign else NEGATIVE}
                    points.add([[z, float(y) - NAPARI_TO_PIXEL, float(x) - NAPARI_TO_PIXEL]])
                points.feature_defaults = {"prompt": POSITIVE}
            if prompt.box is not None:
                boxes = boxes if boxes is not None else make_boxes_layer(self._viewer, image)
                x0, y0, x1, y1 = (float(value) - NAPARI_TO_PIXEL for value in prompt.box)
                boxes.add_rectangles(np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]]))
