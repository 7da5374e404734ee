"""The segment widget's controls, laid out in groups; the widget wires them to layers and the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from napari.layers import Image, Labels
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                            QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ..devices import DEVICE_CHOICES
from ..engine.automatic import AutomaticSettings
from ..engine.propagate import DEFAULT_STOP_IOU
from ..models.registry import DEFAULT_MODEL, MODELS
from ..volume import WINDOW_CHOICES
from ._layer_combo import LayerComboBox
from ._layers import PREVIEW_NAME
from ._session import NO_ADAPTER

NEW_LABELS_LAYER = "(new layer)"
KEYS = (("s", "segment the current slice from its prompts"),
        ("c", "commit the preview into the labels layer"),
        ("Shift-S", "propagate the preview through z"),
        ("Shift-C", "clear prompts and preview"),
        ("re-propagate", "after correcting slices of a propagation (paint, erase or prompt them), regrows only the "
                         "slices between corrected, committed and key slices; those are never changed"),
        ("Ctrl-Z", "undo the last commit (labels layer undo)"),
        ("click", "on the SAM points layer (active at start for SAM/MobileSAM): segments the structure under it "
                  "(LiteMedSAM/MedSAM: found by a search over boxes around the click); more clicks add; "
                  "Shift/Ctrl-click removes what it is on"),
        ("box", "drag on the SAM boxes layer (active at start for LiteMedSAM/MedSAM, their best prompt): segments "
                "the object inside the box; clicks inside refine it"))


class _AdapterPicker(QObject):
    """Asks for an adapter folder and says which one was chosen."""

    chosen = Signal(str)

    def ask(self, parent: QWidget) -> None:
        path = QFileDialog.getExistingDirectory(parent, "LoRA adapter folder")
        if path:
            self.chosen.emit(path)


@dataclass
class SegmentControls:
    image_combo: LayerComboBox
    model_combo: QComboBox
    checkpoint_edit: QLineEdit
    checkpoint_button: QPushButton
    device_combo: QComboBox
    window_combo: QComboBox
    adapter_combo: QComboBox
    adapter_button: QPushButton
    encode_button: QPushButton
    negative_check: QCheckBox
    label_spin: QSpinBox
    labels_combo: LayerComboBox
    overwrite_check: QCheckBox
    segment_button: QPushButton
    commit_button: QPushButton
    propagate_button: QPushButton
    clear_button: QPushButton
    weakest_button: QPushButton
    repropagate_button: QPushButton
    propagation_label: QLabel
    stop_iou_spin: QDoubleSpinBox
    range_spin: QSpinBox
    grid_spin: QSpinBox
    auto_slice_button: QPushButton
    auto_volume_button: QPushButton
    progress_bar: QProgressBar
    cancel_button: QPushButton
    task_label: QLabel
    status_label: QLabel
    adapter_picker: _AdapterPicker

    @property
    def adapter_chosen(self):
        """Signal(str): the user picked an adapter folder with the "…" button."""
        return self.adapter_picker.chosen


def widget_row(*widgets: QWidget) -> QWidget:
    holder = QWidget()
    layout = QHBoxLayout(holder)
    layout.setContentsMargins(0, 0, 0, 0)
    for widget in widgets:
        layout.addWidget(widget)
    return holder


def _combo(items, current: str, tooltip: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(list(items))
    combo.setCurrentText(current)
    combo.setToolTip(tooltip)
    return combo


def build_controls(widget: QWidget, viewer) -> SegmentControls:
    """Create the controls inside ``widget`` (a vertical layout of groups) and return them."""
    model_help = "\n".join(f"{name}: {spec.description}" for name, spec in MODELS.items())
    model_combo = _combo(MODELS, DEFAULT_MODEL, model_help)
    checkpoint_edit = QLineEdit()
    checkpoint_edit.setPlaceholderText("embedded weights")
    checkpoint_edit.setToolTip("Checkpoint file (.pth or .safetensors); required for every model but litemedsam")
    adapter_combo = _combo([NO_ADAPTER], NO_ADAPTER, "LoRA adapter applied to the model (made by the fine-tune panel)")
    controls = SegmentControls(
        image_combo=LayerComboBox(viewer, Image), model_combo=model_combo, checkpoint_edit=checkpoint_edit,
        checkpoint_button=QPushButton("…"), device_combo=_combo(DEVICE_CHOICES, "auto", "Compute device"),
        window_combo=_combo(WINDOW_CHOICES, "auto", "Intensity window the model sees (auto: CT soft tissue or "
                            "MRI percentiles)"),
        adapter_combo=adapter_combo, adapter_button=QPushButton("…"),
        encode_button=QPushButton("Precompute embeddings"),
        negative_check=QCheckBox("negative clicks"), label_spin=QSpinBox(),
        labels_combo=LayerComboBox(viewer, Labels, extra_items=(NEW_LABELS_LAYER,), exclude_names=(PREVIEW_NAME,)),
        overwrite_check=QCheckBox("overwrite other labels"),
        segment_button=QPushButton("Segment [s]"), commit_button=QPushButton("Commit [c]"),
        propagate_button=QPushButton("Propagate [Shift-S]"), clear_button=QPushButton("Clear [Shift-C]"),
        weakest_button=QPushButton("Go to weakest slice"), repropagate_button=QPushButton("Re-propagate"),
        propagation_label=QLabel(""),
        stop_iou_spin=QDoubleSpinBox(), range_spin=QSpinBox(),
        grid_spin=QSpinBox(), auto_slice_button=QPushButton("Auto-segment slice"),
        auto_volume_button=QPushButton("Auto-segment volume"),
        progress_bar=QProgressBar(), cancel_button=QPushButton("Cancel"), task_label=QLabel(""),
        status_label=QLabel("model not loaded"), adapter_picker=_AdapterPicker(widget))
    controls.checkpoint_button.setToolTip("Choose a checkpoint file")
    controls.checkpoint_button.clicked.connect(lambda: _ask_checkpoint(widget, checkpoint_edit))
    controls.adapter_button.clicked.connect(lambda: controls.adapter_picker.ask(widget))
    controls.adapter_button.setToolTip("Choose an adapter folder")
    for button in (controls.checkpoint_button, controls.adapter_button):
        button.setMaximumWidth(32)
    controls.encode_button.setToolTip("Encode every slice in the background, so each click only decodes (~70 ms)")
    controls.label_spin.setRange(1, 2**31 - 1)
    controls.label_spin.setValue(1)
    controls.overwrite_check.setToolTip("Unticked, a commit only paints background and its own label")
    controls.stop_iou_spin.setRange(0.0, 1.0)
    controls.stop_iou_spin.setSingleStep(0.05)
    controls.stop_iou_spin.setValue(DEFAULT_STOP_IOU)
    controls.stop_iou_spin.setToolTip("Propagation stops at the first slice whose predicted IoU is below this")
    controls.weakest_button.setToolTip("Show the propagated slice with the lowest predicted IoU")
    controls.repropagate_button.setToolTip("Regrow only the slices between corrected, committed and key slices")
    controls.propagation_label.setWordWrap(True)
    controls.range_spin.setRange(0, 10000)
    controls.range_spin.setSpecialValueText("whole volume")
    controls.range_spin.setToolTip("Propagate at most this many slices beyond the key slices (0: whole volume)")
    controls.grid_spin.setRange(2, 64)
    controls.grid_spin.setValue(AutomaticSettings().points_per_side)
    controls.grid_spin.setToolTip("Point prompts per side of the grid on each slice, for point-prompted models "
                                  "(SAM, MobileSAM): fewer is faster, more finds smaller objects. Box-trained "
                                  "models (LiteMedSAM, MedSAM) tile boxes of several sizes instead.")

    def enable_grid(model_name: str) -> None:
        controls.grid_spin.setEnabled(getattr(MODELS.get(model_name), "automatic_prompt", "point") == "point")

    model_combo.currentTextChanged.connect(enable_grid)
    enable_grid(model_combo.currentText())
    controls.progress_bar.setRange(0, 1)
    controls.progress_bar.setValue(0)
    controls.cancel_button.setEnabled(False)
    controls.status_label.setWordWrap(True)
    controls.task_label.setWordWrap(True)

    model_group = QGroupBox("Image and model")
    form = QFormLayout(model_group)
    form.addRow("image", controls.image_combo)
    form.addRow("model", controls.model_combo)
    form.addRow("checkpoint", widget_row(controls.checkpoint_edit, controls.checkpoint_button))
    form.addRow("device", controls.device_combo)
    form.addRow("window", controls.window_combo)
    form.addRow("adapter", widget_row(controls.adapter_combo, controls.adapter_button))
    form.addRow(controls.encode_button)

    prompt_group = QGroupBox("Interactive")
    form = QFormLayout(prompt_group)
    form.addRow("labels layer", controls.labels_combo)
    form.addRow("label id", widget_row(controls.label_spin, controls.negative_check))
    form.addRow(controls.overwrite_check)
    form.addRow(widget_row(controls.segment_button, controls.commit_button))
    form.addRow(widget_row(controls.propagate_button, controls.clear_button))
    form.addRow(widget_row(controls.weakest_button, controls.repropagate_button))
    form.addRow(controls.propagation_label)
    form.addRow("stop IoU", controls.stop_iou_spin)
    form.addRow("range ±", controls.range_spin)
    keys = QLabel("<br>".join(f"<b>{key}</b>: {what}" for key, what in KEYS))
    keys.setWordWrap(True)
    form.addRow(keys)

    auto_group = QGroupBox("Automatic (new labels layer)")
    auto_layout = QFormLayout(auto_group)
    auto_layout.addRow("grid points / side", controls.grid_spin)
    auto_layout.addRow(widget_row(controls.auto_slice_button, controls.auto_volume_button))

    progress_group = QGroupBox("Progress")
    progress_layout = QVBoxLayout(progress_group)
    progress_layout.addWidget(widget_row(controls.progress_bar, controls.cancel_button))
    progress_layout.addWidget(controls.task_label)
    progress_layout.addWidget(controls.status_label)

    layout = QVBoxLayout(widget)
    for group in (model_group, prompt_group, auto_group, progress_group):
        layout.addWidget(group)
    layout.addStretch(1)
    return controls


def _ask_checkpoint(parent: QWidget, edit: QLineEdit) -> None:
    path, _ = QFileDialog.getOpenFileName(parent, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors)")
    if path:
        edit.setText(path)


def status_text(status: dict, click_to_preview_ms: float) -> str:
    """The status line: device, dtype, cache fill and the last latencies (from ``VolumePredictor.status()``)."""
    click = "" if math.isnan(click_to_preview_ms) else f" · click→preview {click_to_preview_ms:.0f} ms"
    return (f"{status['device']} · {status['dtype']} · cache {status['cached_slices']}/{status['num_slices']} slices "
            f"({status['cache_mb']:.0f} MB) · last decode {status['last_ms']:.0f} ms{click}"
            + (f" · window {status['window']}" if status.get("window") else ""))
