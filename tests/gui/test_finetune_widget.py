"""The Fine-tune panel in a real viewer: train from a Labels layer, activate the adapter, learn from corrections."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam_ft._widgets.finetune import FinetuneWidget, find_segment_panel
from napari_sam_ft._widgets.finetune_corrections import CorrectionTracker
from napari_sam_ft.finetune.adapters import read_adapter_info

from .helpers import LIVER, SLICE, SPLEEN

WORKER_TIMEOUT_MS = 180_000
ANNOTATED = [9, SLICE, 21]
pytestmark = pytest.mark.gui


def annotations_layer(viewer):
    """What a user painted: spleen and liver on three slices, nothing elsewhere."""
    reference = np.asarray(viewer.layers["sample CT reference"].data)
    data = np.zeros(reference.shape, np.int32)
    for z in ANNOTATED:
        data[z] = np.where(np.isin(reference[z], [SPLEEN, LIVER]), reference[z], 0)
    image = viewer.layers["sample CT"]
    return viewer.add_labels(data, name="my annotations", scale=image.scale, translate=image.translate,
                             metadata={"class_names": {SPLEEN: "spleen", LIVER: "liver"}})


@pytest.fixture
def panel(segment_widget, qtbot, tmp_path):
    viewer = segment_widget._viewer
    labels = annotations_layer(viewer)
    widget = FinetuneWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Fine-tune")
    widget.image_combo.select_layer(viewer.layers["sample CT"])
    widget.labels_combo.select_layer(labels)
    widget.scope_combo.setCurrentText("decoder")
    widget.steps_spin.setValue(2)
    widget.budget_spin.setValue(0)
    # Few, small steps: one view per slice, one prompted object per view, a validation after every step.
    widget.extra_settings = {"views_per_slice": 1, "max_objects_per_slice": 1, "patience": 100, "validate_every": 1}
    widget.output_edit.setText(str(tmp_path / "adapter"))
    yield widget
    widget.cancel()
    qtbot.waitUntil(lambda: not widget.running, timeout=WORKER_TIMEOUT_MS)


def test_panel_trains_from_labels_and_activates_the_adapter(panel, segment_widget, qtbot, tmp_path):
    assert find_segment_panel(panel._viewer, exclude=panel) is segment_widget
    statuses = []
    original_progress = panel._on_progress

    def watch(step, total, metrics):
        original_progress(step, total, metrics)
        statuses.append(panel.status_label.text())

    panel._relay.progressed.disconnect(original_progress)
    panel._relay.progressed.connect(watch)
    labels = panel.labels_combo.current_layer()
    panel.train_button.click()
    assert panel.running and not panel.train_button.isEnabled() and panel.cancel_button.isEnabled()
    # The run copied its slices when it started: an edit made now is a correction for the next run.
    edited = labels.data.copy()
    edited[ANNOTATED[0]] = 0
    labels.data = edited
    qtbot.waitUntil(lambda: panel.result is not None, timeout=WORKER_TIMEOUT_MS)
    result = panel.result
    assert result.adapter_dir == tmp_path / "adapter" and result.stopped == "steps"
    assert panel.progress_bar.value() == 1000
    assert len(panel.plot.loss_points) == result.steps == result.steps_planned == 2
    assert len(panel.plot.dice_points) == 3  # before training and after each step
    assert any(text.startswith("plan: 2 steps") and "estimated" in text for text in statuses)
    assert any("step 1/2" in text and "ETA" in text and "held-out Dice" in text for text in statuses)
    assert panel.tracker.changed_slices(labels) == [ANNOTATED[0]]
    assert "→" in panel.result_label.text() and "automatic" in panel.result_label.text()
    info = read_adapter_info(result.adapter_dir)
    assert info.class_ids == (SPLEEN, LIVER) and info.class_names == {SPLEEN: "spleen", LIVER: "liver"}
    assert sorted(s for _, s in info.metadata["training"]["train_slices"] + info.metadata["training"][
        "validation_slices"]) == ANNOTATED

    assert panel.use_button.isEnabled()
    panel.use_button.click()
    assert segment_widget.controls.adapter_combo.currentText() == str(result.adapter_dir)
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    # Automatic segmentation in the Segment panel now runs the adapter's class head: class ids, not instances.
    segment_widget.auto_segment(whole_volume=False)
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert segment_widget.predictor.model.adapter_id == result.adapter_id
    auto_layer = panel._viewer.layers[f"sample CT auto-segmentation slice {SLICE}"]
    assert set(np.unique(auto_layer.data[SLICE])) <= {0, SPLEEN, LIVER}
    segment_widget.set_adapter(None)  # leave the shared model without the adapter for later tests
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)


def test_learn_from_corrections_retrains_on_the_changed_slices(panel, qtbot, notifications):
    assert not panel.learn_from_corrections()  # nothing trained yet
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.result is not None, timeout=WORKER_TIMEOUT_MS)
    first = panel.result
    assert not panel.learn_from_corrections()  # nothing corrected yet
    assert any("no labels changed" in str(n.message) for n in notifications)

    labels = panel.labels_combo.current_layer()
    reference = np.asarray(panel._viewer.layers["sample CT reference"].data)
    corrected = labels.data.copy()
    corrected[12] = np.where(reference[12] == LIVER, LIVER, 0)  # the user fixed slice 12
    labels.data = corrected
    assert panel.learn_from_corrections()
    qtbot.waitUntil(lambda: panel.result is not None and not panel.running, timeout=WORKER_TIMEOUT_MS)
    second = panel.result
    assert second.adapter_dir != first.adapter_dir and second.adapter_dir.name.endswith("-corrected-1")
    training = read_adapter_info(second.adapter_dir).metadata["training"]
    assert [0, 12] in training["train_slices"]
    first_validation = read_adapter_info(first.adapter_dir).metadata["training"]["validation_slices"]
    assert training["validation_slices"] == first_validation  # the held-out slice stays held out


def test_cancel_keeps_the_panel_usable(panel, qtbot):
    panel.extra_settings = {**panel.extra_settings, "views_per_slice": 3, "batch_size": 1}
    panel.steps_spin.setValue(300)
    panel.train_button.click()
    qtbot.waitUntil(lambda: len(panel.plot.loss_points) >= 1, timeout=WORKER_TIMEOUT_MS)
    steps_seen = len(panel.plot.loss_points)
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: not panel.running, timeout=WORKER_TIMEOUT_MS)
    result = panel.result
    assert result.cancelled and result.adapter_dir is not None
    # At most the step under way and one whose progress signal was still queued when Cancel was pressed.
    assert result.steps <= steps_seen + 2 < 300
    assert panel.train_button.isEnabled() and panel.use_button.isEnabled()
    assert "cancelled" in panel.status_label.text()


def test_correction_tracker_finds_changed_slices():
    class Layer:
        data = np.zeros((4, 5, 5), np.int32)

    layer = Layer()
    tracker = CorrectionTracker()
    assert tracker.changed_slices(layer) == [0, 1, 2, 3]
    tracker.snapshot(layer)
    assert tracker.changed_slices(layer) == []
    layer.data[2, 1, 1] = 3
    assert tracker.changed_slices(layer) == [2]


def test_several_pairs_and_bad_input_are_handled(panel, notifications):
    viewer = panel._viewer
    panel.add_current_pair()
    panel.labels_combo.select_layer(viewer.layers["sample CT reference"])
    panel.add_current_pair()
    pairs = panel.pairs()
    assert [(image.name, labels.name) for image, labels in pairs] == [
        ("sample CT", "my annotations"), ("sample CT", "sample CT reference")]
    panel.pairs_list.clear()
    panel.slices_edit.setText(str(SLICE))  # one slice of the reference: nothing left to validate on
    assert not panel.start_training()
    assert any("only one annotated slice" in str(n.message) for n in notifications)
    assert not panel.running and panel.result is None


def test_panel_trains_a_chosen_model_on_a_multi_channel_volume(panel, qtbot):
    """An RGB-like (Z, Y, X, 3) image layer (e.g. three MRI sequences) trains with the model picked in the panel."""
    viewer = panel._viewer
    grey = np.asarray(viewer.layers["sample CT"].data, np.float32)
    channels = viewer.add_image(np.stack([grey, grey * 0.5, np.flipud(grey)], axis=-1), name="three sequences",
                                rgb=False, channel_axis=None)
    panel.image_combo.select_layer(channels)
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("litemedsam"))
    panel.steps_spin.setValue(1)
    panel.output_edit.setText(str(panel.output_edit.text()) + "-channels")
    assert panel.start_training()
    qtbot.waitUntil(lambda: panel.result is not None and not panel.running, timeout=WORKER_TIMEOUT_MS)
    result = panel.result
    assert result.adapter_dir is not None and result.steps == 1
    info = read_adapter_info(result.adapter_dir)
    assert info.base_model_name == "litemedsam" and len(info.windows[0]["channels"]) == 3
    assert panel._model is None  # the chosen model is the panel's own, not the Segment panel's


AORTA = 52  # small on the sample CT: a box around it is decoded on a zoomed crop


def test_a_box_mode_adapter_from_the_panel_decodes_small_boxes_zoomed_in_the_segment_widget(
        panel, segment_widget, qtbot, monkeypatch):
    """Box mode learns each small object on its zoomed crop; once the panel activates that adapter, a box drawn
    around the aorta in the Segment widget is decoded on the same crop, the liver's on the whole slice."""
    from napari_sam_ft.engine import zoom
    from napari_sam_ft.engine.prompts import box_from_mask

    from .test_segment_widget import box_preview, reference

    viewer = panel._viewer
    full = np.asarray(viewer.layers["sample CT reference"].data)
    painted = np.zeros(full.shape, np.int32)
    for z in ANNOTATED:
        painted[z] = np.where(np.isin(full[z], [LIVER, AORTA]), full[z], 0)
    image = viewer.layers["sample CT"]
    labels = viewer.add_labels(painted, name="liver and aorta", scale=image.scale, translate=image.translate)
    panel.labels_combo.select_layer(labels)
    panel.prompt_combo.setCurrentIndex(panel.prompt_combo.findData("box"))
    panel.extra_settings = {**panel.extra_settings, "zoom_views_per_object": 1}
    panel.train_button.click()
    qtbot.waitUntil(lambda: panel.result is not None and not panel.running, timeout=WORKER_TIMEOUT_MS)
    result = panel.result
    assert read_adapter_info(result.adapter_dir).zooms_small_boxes

    panel.use_button.click()
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert segment_widget.controls.adapter_combo.currentText() == str(result.adapter_dir)
    crops = []
    cropped_predictor = zoom.cropped_predictor
    monkeypatch.setattr(zoom, "cropped_predictor",
                        lambda predictor, crop: crops.append(crop) or cropped_predictor(predictor, crop))
    try:
        box_preview(segment_widget, qtbot, LIVER)
        assert segment_widget.predictor.model.adapter_id == result.adapter_id
        assert crops == []  # too large to zoom
        segment_widget.clear_prompts()
        qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
        aorta = reference(viewer, AORTA)
        preview = box_preview(segment_widget, qtbot, AORTA)
        assert crops == [zoom.zoom_crop(box_from_mask(aorta), aorta.shape)]
        assert (preview & aorta).any()
    finally:
        segment_widget.set_adapter(None)  # leave the shared model without the adapter for later tests
        qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
