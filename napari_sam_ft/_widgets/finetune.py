"""The "Fine-tune" panel: train an adapter on the slices the user annotated, watch it learn, then use it.

Training runs ``finetune.train_adapter`` in a napari thread worker; its ``progress`` callback reaches the
GUI thread through a queued Qt signal and Cancel sets the flag its ``should_cancel`` polls (the run stops
within one step and keeps the best adapter so far). "Use this adapter" hands the folder to the docked
Segment panel through its public ``set_adapter(adapter_dir)``. "Learn from my corrections" retrains on
the previous slices plus every slice whose labels changed since the last adapt.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from napari.layers import Image, Labels
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFormLayout, QLabel, QLineEdit, QListWidget,
                            QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ..finetune.adapters import AdapterError, check_output_folder
from ..finetune.data import FinetuneDataError, VolumeAnnotations, annotated_slices, build_training_data
from ..finetune.scopes import SCOPES
from ..finetune.train import TRAINING_PROMPT_MODES, TrainingResult, TrainSettings, train_adapter
from ..models.registry import DEFAULT_MODEL, MODELS
from ..slices import parse_slice_list
from ._controls import widget_row
from ._layer_combo import LayerComboBox
from ._workers import ProgressRelay
from .finetune_corrections import CorrectionTracker
from .finetune_plot import TrainingPlot

PROMPT_LABELS = {"mixed": "mixed (automatic + prompts)", "box": "box", "point": "point", "none": "none (automatic)"}
SKIPPED_LABEL_LAYERS = ("SAM preview",)  # the segment panel's preview is not an annotation
SEGMENT_PANEL_MODEL = "as in the Segment panel"
PAIR_ROLE = Qt.ItemDataRole.UserRole  # where a listed pair keeps its (image, labels) layer names


def default_adapter_folder(image_name: str, scope: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path.home() / "napari-sam-ft" / "adapters" / f"{image_name or 'volume'}-{scope}-{stamp}"


def find_segment_panel(viewer, exclude=None):
    """The docked widget that accepts adapters (has ``set_adapter``), or None."""
    window = viewer.window
    docked = getattr(window, "dock_widgets", None)
    widgets = list(docked.values()) if docked is not None else [dock.widget() for dock in window._dock_widgets.values()]
    for widget in widgets:
        for candidate in (widget, *widget.findChildren(QWidget)) if isinstance(widget, QWidget) else (widget,):
            if candidate is not exclude and callable(getattr(candidate, "set_adapter", None)):
                return candidate
    return None


class FinetuneWidget(QWidget):
    """Dock widget: image/labels pairs, slices, scope, prompt mode, budget, output folder; Train / Cancel.

    ``model``: the base model to adapt (default: the Segment panel's model if one is docked, else the
    default model, loaded on the first run). ``extra_settings`` holds further ``TrainSettings`` fields for
    scripts and tests.
    """

    def __init__(self, napari_viewer, model=None, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self._model = model
        self.extra_settings: dict = {}
        self.tracker = CorrectionTracker()
        self.result: TrainingResult | None = None
        self.running = False
        self._cancel = threading.Event()
        self._worker = None
        self._relay = ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        # id(labels layer) -> (training slices, validation slices) of the last run
        self._last_split: dict[int, tuple[list[int], list[int]]] = {}
        self._correction_runs = 0
        self.dice_before = float("nan")  # held-out Dice of the base model in the current run
        self._loaded_models: dict = {}  # (registry name, checkpoint) -> LoadedModel chosen in the model box
        self._build_ui()

    # -- layout -----------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        viewer = self._viewer
        self.image_combo = LayerComboBox(viewer, Image)
        self.labels_combo = LayerComboBox(viewer, Labels, exclude_names=SKIPPED_LABEL_LAYERS)
        self.pairs_list = QListWidget()
        self.pairs_list.setMaximumHeight(60)
        self.pairs_list.setToolTip("extra image/labels pairs trained together (empty: just the pair above)")
        add_pair, remove_pair = QPushButton("add pair"), QPushButton("remove")
        add_pair.clicked.connect(self.add_current_pair)
        remove_pair.clicked.connect(lambda: self.pairs_list.takeItem(self.pairs_list.currentRow()))
        self.slices_edit = QLineEdit()
        self.slices_edit.setPlaceholderText("every annotated slice")
        self.slices_edit.setToolTip("slices you reviewed, e.g. 62,70,78 or 60:80 (A..B-1); unlabelled slices are "
                                    "never used unless listed here")
        self.validation_edit = QLineEdit()
        self.validation_edit.setPlaceholderText("automatic (20%, at least 1)")
        self.model_combo = QComboBox()
        self.model_combo.addItem(SEGMENT_PANEL_MODEL, None)
        for name, spec in MODELS.items():
            self.model_combo.addItem(name, name)
            self.model_combo.setItemData(self.model_combo.count() - 1, spec.description, Qt.ItemDataRole.ToolTipRole)
        self.model_combo.setToolTip("the base model to adapt: an adapter only works with the model it was trained on")
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("embedded weights (LiteMedSAM); others need a checkpoint file")
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.scope_combo.setToolTip("lora: LoRA on encoder and decoder attention; decoder: the mask decoder only "
                                    "(fastest); full: every weight")
        self.prompt_combo = QComboBox()
        for mode in TRAINING_PROMPT_MODES[::-1]:  # mixed first
            self.prompt_combo.addItem(PROMPT_LABELS[mode], mode)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(0, 100_000)
        self.steps_spin.setSingleStep(50)
        self.steps_spin.setSpecialValueText("planned from the annotations")
        self.steps_spin.setValue(0)
        self.steps_spin.setToolTip("optimisation steps on cached embeddings; the same steps and seed give the same "
                                   "adapter however busy the computer is")
        self.budget_spin = QSpinBox()
        self.budget_spin.setRange(0, 24 * 3600)
        self.budget_spin.setSingleStep(30)
        self.budget_spin.setSuffix(" s")
        self.budget_spin.setSpecialValueText("no limit")
        self.budget_spin.setValue(0)
        self.budget_spin.setToolTip("optional: stop after this long (the result then says it stopped early)")
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("~/napari-sam-ft/adapters/<image>-<scope>-<time>")
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_output)
        self.train_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.corrections_button = QPushButton("Learn from my corrections")
        self.corrections_button.setToolTip("retrain on the last run's slices plus every slice you changed since")
        self.use_button = QPushButton("Use this adapter")
        self.use_button.setToolTip("activate the new adapter in the Segment panel")
        self.train_button.clicked.connect(lambda: self.start_training())
        self.cancel_button.clicked.connect(self.cancel)
        self.corrections_button.clicked.connect(self.learn_from_corrections)
        self.use_button.clicked.connect(self.use_adapter)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status_label = QLabel("annotate at least 2 slices, then Train")
        self.status_label.setWordWrap(True)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)
        self.plot = TrainingPlot(self)

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("labels", self.labels_combo)
        form.addRow(widget_row(add_pair, remove_pair))
        form.addRow(self.pairs_list)
        form.addRow("slices", self.slices_edit)
        form.addRow("validation", self.validation_edit)
        form.addRow("model", self.model_combo)
        form.addRow("checkpoint", self.checkpoint_edit)
        form.addRow("scope", self.scope_combo)
        form.addRow("prompt mode", self.prompt_combo)
        form.addRow("steps", self.steps_spin)
        form.addRow("time limit", self.budget_spin)
        form.addRow("output", widget_row(self.output_edit, browse))
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(widget_row(self.train_button, self.cancel_button))
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.plot)
        layout.addWidget(self.result_label)
        layout.addWidget(widget_row(self.use_button, self.corrections_button))
        self._set_running(False)

    def _browse_output(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder for the adapter")
        if path:
            self.output_edit.setText(path)

    def _set_running(self, running: bool) -> None:
        self.running = running
        self.train_button.setEnabled(not running)
        self.corrections_button.setEnabled(not running and self.result is not None)
        self.cancel_button.setEnabled(running)
        self.use_button.setEnabled(not running and self.result is not None and self.result.adapter_dir is not None)

    # -- inputs -------------------------------------------------------------------------------------
    def add_current_pair(self) -> None:
        image, labels = self.image_combo.current_layer(), self.labels_combo.current_layer()
        if image is None or labels is None:
            show_error("choose an image and a labels layer first")
            return
        self.pairs_list.addItem(f"{image.name}  ⟶  {labels.name}")
        self.pairs_list.item(self.pairs_list.count() - 1).setData(PAIR_ROLE, (image.name, labels.name))

    def pairs(self) -> list[tuple[Image, Labels]]:
        """The (image, labels) layers to train on: the listed pairs, or else the pair chosen above."""
        chosen = [self.pairs_list.item(row).data(PAIR_ROLE) for row in range(self.pairs_list.count())]
        layers = {layer.name: layer for layer in self._viewer.layers}
        pairs = [(layers.get(image), layers.get(labels)) for image, labels in chosen]
        if not chosen:
            pairs = [(self.image_combo.current_layer(), self.labels_combo.current_layer())]
        missing = [index for index, (image, labels) in enumerate(pairs) if image is None or labels is None]
        if missing:
            raise FinetuneDataError("choose an image and a labels layer (a listed layer was removed or renamed)")
        return pairs

    def settings(self) -> TrainSettings:
        values = dict(scope=self.scope_combo.currentText(), prompt_mode=self.prompt_combo.currentData(),
                      decoder_steps=self.steps_spin.value() or None,
                      time_limit_s=float(self.budget_spin.value()) or None)
        values.update(self.extra_settings)
        return TrainSettings(**values)

    # -- training -----------------------------------------------------------------------------------
    def start_training(self, slices_per_pair: list[list[int]] | None = None, output: Path | None = None,
                       validation_per_pair: list[list[int]] | None = None) -> bool:
        """Collect the annotations and train in a worker; False (with a notification) if inputs are wrong."""
        if self.running:
            return False
        try:
            pairs = self.pairs()
            annotations = [VolumeAnnotations(image.data, labels.data, name=image.name) for image, labels in pairs]
            if slices_per_pair is None and self.slices_edit.text().strip():
                slices_per_pair = [parse_slice_list(self.slices_edit.text(), image.data.shape[0]) for image, _ in pairs]
            validation = validation_per_pair
            if validation is None and self.validation_edit.text().strip():
                validation = [parse_slice_list(self.validation_edit.text(), image.data.shape[0])
                              for image, _ in pairs]
            names = {}
            for _, labels in pairs:
                names.update({int(key): str(value) for key, value in labels.metadata.get("class_names", {}).items()})
            data = build_training_data(annotations, slices=slices_per_pair, validation_slices=validation,
                                       class_names=names)
            settings = self.settings()
        except (FinetuneDataError, ValueError) as error:
            show_error(f"fine-tuning: {error}")
            return False
        if output is None:
            text = self.output_edit.text().strip()
            output = Path(text).expanduser() if text else default_adapter_folder(pairs[0][0].name, settings.scope)
        try:
            check_output_folder(output)
        except AdapterError as error:
            show_error(f"fine-tuning: {error}")
            return False
        used = {id(labels): ([s.slice_index for s in data.train if s.volume_index == index],
                             [s.slice_index for s in data.validation if s.volume_index == index])
                for index, (_, labels) in enumerate(pairs)}
        self._launch(data, settings, output, [labels for _, labels in pairs], used)
        return True

    def _launch(self, data, settings, output: Path, labels_layers, used_slices) -> None:
        self._cancel.clear()
        self.result = None
        self.plot.clear()
        self.progress_bar.setValue(0)
        self.result_label.setText("")
        self.status_label.setText(f"preparing: {data.describe()}")
        self.status_label.setStyleSheet("")
        self.dice_before = float("nan")
        self._set_running(True)
        chosen = self.model_combo.currentData()
        checkpoint = self.checkpoint_edit.text().strip() or None
        base_model = self._model if chosen is None else None
        base_model = base_model or (self._segment_model() if chosen is None else None)
        # ``data`` holds copies of the annotated slices: edits made while this run trains are not in it,
        # so they are counted as corrections for the next run from this moment on.
        for layer in labels_layers:
            self.tracker.snapshot(layer)
            self._last_split[id(layer)] = used_slices[id(layer)]

        def work() -> TrainingResult:
            from ..models.registry import load_model

            model = base_model or self._loaded_models.get((chosen, checkpoint))
            if model is None:
                model = load_model(chosen or DEFAULT_MODEL, checkpoint)
                self._loaded_models[(chosen, checkpoint)] = model
            if chosen is None:
                self._model = model
            return train_adapter(model, data, output, settings, progress=self._relay.report,
                                 should_cancel=self._cancel.is_set)

        self._worker = thread_worker(work, start_thread=False)()
        self._worker.returned.connect(self._show_result)
        self._worker.errored.connect(self._on_error)
        self._worker.start()

    def _segment_model(self):
        """The Segment panel's model, so the adapter fits the model it will be used with."""
        panel = find_segment_panel(self._viewer, exclude=self)
        predictor = getattr(panel, "predictor", None) if panel is not None else None
        return getattr(predictor, "model", None)

    def cancel(self) -> None:
        """Stop after the current step; the best adapter so far is saved."""
        if self.running:
            self._cancel.set()
            self.status_label.setText("cancelling after this step…")

    def closeEvent(self, event) -> None:
        self._cancel.set()  # a run outliving its panel stops after the current step
        super().closeEvent(event)

    def _on_progress(self, step: int, total: int, metrics: dict) -> None:
        self.progress_bar.setValue(int(1000 * metrics.get("fraction", 0.0)))
        phase = metrics.get("phase", "")
        if phase == "encoding":
            self.status_label.setText(f"encoding views {metrics['encoded']}/{metrics['to_encode']}")
            return
        if phase == "planned":
            self.status_label.setText(f"plan: {total} steps ({metrics['decoder_steps']} decoder + "
                                      f"{metrics['encoder_steps']} encoder), estimated {metrics['estimate_s']:.0f} s")
            return
        if "val_dice" in metrics:
            self.plot.add_validation(step, metrics["val_dice"])
            if phase == "start":
                self.dice_before = metrics["val_dice"]
        elif "loss" in metrics:
            self.plot.add_loss(step, metrics["loss"])
        best = metrics.get("best_val_dice")
        best_text = f", held-out Dice {self.dice_before:.3f} → {best:.3f}" if best is not None else ""
        loss_text = f", loss {metrics['loss']:.3f}" if "loss" in metrics else ""
        self.status_label.setText(f"{phase} step {step}/{total}{loss_text}{best_text}, ETA "
                                  f"{metrics.get('eta_s', 0):.0f} s ({metrics.get('elapsed_s', 0):.0f} s so far)")

    def _show_result(self, result: TrainingResult) -> None:
        self.result = result
        self._set_running(False)
        self.progress_bar.setValue(1000)
        if result.adapter_dir is None:
            self.status_label.setText("cancelled before any training step: no adapter was written")
            return
        changes = ", ".join(f"{'automatic' if mode == 'none' else mode} "
                            f"{result.val_dice_before.get(mode, float('nan')):.2f} → {after:.2f}"
                            for mode, after in result.val_dice_after.items())
        self.status_label.setText(result.warning or f"done ({result.stopped}) after {result.steps} of "
                                  f"{result.steps_planned} planned steps in {result.seconds:.0f} s")
        if result.warning:
            self.status_label.setStyleSheet("color: #e0a030; font-weight: bold")
            show_warning(result.warning)
        self.result_label.setText(f"validation Dice: {changes}\nadapter {result.adapter_id} "
                                  f"({result.adapter_bytes / 2**20:.1f} MB, {result.trainable_parameters:,} trained "
                                  f"parameters) in {result.adapter_dir}")

    def _on_error(self, error: BaseException) -> None:
        self._set_running(False)
        self.status_label.setText("training failed")
        show_error(f"fine-tuning failed: {error}")

    # -- after training -------------------------------------------------------------------------------
    def use_adapter(self) -> None:
        """Activate the last adapter in the Segment panel (opening the panel if needed)."""
        if self.result is None or self.result.adapter_dir is None:
            show_info("train an adapter first")
            return
        panel = find_segment_panel(self._viewer, exclude=self)
        if panel is None:
            try:
                _, panel = self._viewer.window.add_plugin_dock_widget("napari-sam-ft", "Segment")
            except (KeyError, ValueError, RuntimeError) as error:
                show_error(f"open the Segment panel to use the adapter ({error})")
                return
        panel.set_adapter(str(self.result.adapter_dir))
        show_info(f"the Segment panel now uses adapter {self.result.adapter_id}")

    def learn_from_corrections(self) -> bool:
        """Retrain on the last run's slices plus the slices changed since (an erased slice counts too)."""
        if self.result is None or self.running:
            show_info("train once first; corrections are counted from the last adapt")
            return False
        try:
            pairs = self.pairs()
        except FinetuneDataError as error:
            show_error(f"fine-tuning: {error}")
            return False
        changed = {id(labels): self.tracker.changed_slices(labels) if self.tracker.is_tracking(labels) else []
                   for _, labels in pairs}
        if not any(changed.values()):
            show_info("no labels changed since the last adapt: correct some slices first")
            return False
        # Corrected slices are trained on; the last run's validation slices stay held out unless corrected.
        slices, validation = [], []
        for _, labels in pairs:
            train, held_out = self._last_split.get(id(labels), (annotated_slices(labels.data), []))
            corrected = set(changed[id(labels)])
            kept = [index for index in held_out if index not in corrected]
            slices.append(sorted(set(train) | set(held_out) | corrected))
            validation.append(kept)
        self._correction_runs += 1
        previous = self.result.adapter_dir
        output = (previous.with_name(f"{previous.name.split('-corrected')[0]}-corrected-{self._correction_runs}")
                  if previous else None)
        return self.start_training(slices_per_pair=slices, output=output,
                                   validation_per_pair=validation if all(validation) else None)
