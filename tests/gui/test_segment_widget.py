"""The segment widget in a real viewer, with real LiteMedSAM forward passes on the sample CT."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from napari.utils._proxies import ReadOnlyWrapper
from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

from napari_sam_ft._layer_data import GEOMETRY_KEY
from napari_sam_ft._widgets._layers import NEGATIVE, POSITIVE
from napari_sam_ft._widgets.segment import SegmentWidget
from napari_sam_ft.engine.prompts import box_from_mask, interior_point, point_to_napari_zyx
from napari_sam_ft.metrics import dice

from .helpers import LIVER, SLICE, SPLEEN, rectangle

WORKER_TIMEOUT_MS = 120_000
pytestmark = pytest.mark.gui


@dataclass
class MouseEvent:
    """The fields napari's mouse callbacks read from a vispy mouse event."""

    type: str
    position: tuple  # world coordinates
    modifiers: list = field(default_factory=list)
    is_dragging: bool = False
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))
    view_direction: list | None = None
    up_direction: list | None = None
    dims_displayed: list = field(default_factory=lambda: [1, 2])


def click(layer, zyx, modifiers=()) -> None:
    """A mouse press and release on ``layer`` at data position ``zyx``, through napari's callbacks."""
    world = tuple(layer.data_to_world(np.asarray(zyx, dtype=float)))
    for kind, callbacks in (("mouse_press", mouse_press_callbacks), ("mouse_release", mouse_release_callbacks)):
        callbacks(layer, ReadOnlyWrapper(MouseEvent(kind, world, list(modifiers)), exceptions=("handled",)))


def reference(viewer, label: int, slice_index: int = SLICE) -> np.ndarray:
    return np.asarray(viewer.layers["sample CT reference"].data[slice_index]) == label


def box_preview(widget, qtbot, label: int, slice_index: int = SLICE) -> np.ndarray:
    """Draw the reference box of ``label``, wait for the slice to encode, return the preview slice."""
    points, boxes, preview = widget.prompt_layers()
    boxes.add_rectangles(rectangle(slice_index, box_from_mask(reference(widget._viewer, label, slice_index))))
    qtbot.waitUntil(lambda: widget.idle, timeout=WORKER_TIMEOUT_MS)
    return np.asarray(preview.data[slice_index]) > 0


def test_widget_is_contributed_by_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sam-ft", "ct")
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-sam-ft", "Segment")
    assert isinstance(widget, SegmentWidget)
    assert widget.image_layer is viewer.layers["sample CT"]
    image = viewer.layers["sample CT"]
    assert tuple(image.scale) == (3.0, 3.0, 3.0) and image.data.shape == (30, 101, 122)
    # LiteMedSAM was trained on boxes: the widget starts with the boxes layer active, in rectangle mode.
    points, boxes, _preview = widget.prompt_layers()
    assert viewer.layers.selection.active.name == boxes.name and boxes.mode == "add_rectangle"
    widget.controls.model_combo.setCurrentText("vit_b")
    assert widget.best_prompt_layer is points  # SAM is point-trained


def test_box_and_clicks_give_an_accurate_preview_without_re_encoding(segment_widget, qtbot):
    viewer = segment_widget._viewer
    points, boxes, preview = segment_widget.prompt_layers()
    liver = reference(viewer, LIVER)
    box_only = box_preview(segment_widget, qtbot, LIVER)
    assert dice(box_only, liver) >= 0.85
    predictor = segment_widget.predictor
    encoder_calls = predictor.encoder_calls

    # A left click adds a positive point; a Shift-click a negative one outside the liver.
    click(points, tuple(point_to_napari_zyx(SLICE, interior_point(liver))))
    rows, cols = np.nonzero(reference(viewer, SPLEEN))
    click(points, (SLICE, rows.mean(), cols.mean()), modifiers=["Shift"])
    assert list(points.features["prompt"].astype(str)) == [POSITIVE, NEGATIVE]
    assert not liver[int(round(rows.mean())), int(round(cols.mean()))]

    with_points = np.asarray(preview.data[SLICE]) > 0
    assert dice(with_points, liver) >= 0.85
    assert predictor.encoder_calls == encoder_calls  # clicks only decode the cached embedding
    assert segment_widget.last_click_to_preview_ms < 5000
    assert "cpu" in segment_widget.controls.status_label.text()
    assert not (np.asarray(preview.data[SLICE - 1]) > 0).any()  # other slices untouched


def test_commit_respects_other_labels_and_undo_restores_them_exactly(segment_widget, qtbot):
    viewer = segment_widget._viewer
    spleen = reference(viewer, SPLEEN)
    # The user's labels: the reference without the spleen, plus a stroke of label 7 across the spleen.
    user_labels = np.asarray(viewer.layers["sample CT reference"].data).astype(np.int32)
    user_labels[user_labels == SPLEEN] = 0
    rows, cols = np.nonzero(spleen)
    user_labels[SLICE, int(rows.mean()), cols.min():cols.max() + 1] = 7
    layer = viewer.add_labels(user_labels.copy(), name="my labels", scale=(3, 3, 3))
    segment_widget.controls.labels_combo.select_layer(layer)
    before = np.array(layer.data, copy=True)

    preview_mask = box_preview(segment_widget, qtbot, SPLEEN)
    assert dice(preview_mask, spleen) >= 0.85
    segment_widget.controls.label_spin.setValue(SPLEEN)
    segment_widget.commit()
    after = np.asarray(layer.data)
    assert (after[SLICE][preview_mask & (before[SLICE] == 0)] == SPLEEN).all()
    changed = after != before
    assert changed.any() and (before[changed] == 0).all()  # only background was painted
    assert (after[before == 7] == 7).all()
    assert not (np.asarray(segment_widget.prompt_layers()[2].data) > 0).any()  # preview cleared after commit

    layer.undo()
    np.testing.assert_array_equal(layer.data, before)

    # With "overwrite other labels" the stroke of 7 inside the spleen is replaced; Ctrl-Z still restores all.
    box_preview(segment_widget, qtbot, SPLEEN)
    segment_widget.controls.overwrite_check.setChecked(True)
    segment_widget.commit()
    assert ((np.asarray(layer.data) == 7).sum()) < (before == 7).sum()
    layer.undo()
    np.testing.assert_array_equal(layer.data, before)


def test_keys_segment_and_clear_while_the_points_layer_is_active(segment_widget, qtbot):
    viewer = segment_widget._viewer
    points, boxes, preview = segment_widget.prompt_layers()
    box_preview(segment_widget, qtbot, LIVER)
    preview.data[:] = 0
    viewer.layers.selection.active = points
    points.mode = "add"
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key("s")
    handler.release_key("s")
    assert points.mode == "add"  # our "s" wins over the points layer's "s" = select mode
    assert (np.asarray(preview.data[SLICE]) > 0).any()
    handler.press_key("Shift-C")
    handler.release_key("Shift-C")
    assert len(boxes.data) == 0 and len(points.data) == 0 and not np.asarray(preview.data).any()


def test_propagation_fills_neighbouring_slices_into_the_preview(segment_widget, qtbot):
    viewer = segment_widget._viewer
    box_preview(segment_widget, qtbot, SPLEEN)
    segment_widget.controls.range_spin.setValue(2)  # encode 4 more slices, not the whole volume
    segment_widget.propagate()
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    preview = np.asarray(segment_widget.prompt_layers()[2].data) > 0
    for z in (SLICE - 2, SLICE - 1, SLICE + 1, SLICE + 2):
        assert dice(preview[z], reference(viewer, SPLEEN, z)) >= 0.7, z
    assert not preview[SLICE - 3].any() and not preview[SLICE + 3].any()  # outside the chosen range
    assert "propagate done" in segment_widget.controls.task_label.text()

    # Committing the propagated object is one edit: Ctrl-Z (with the points layer active) removes all of it.
    segment_widget.controls.label_spin.setValue(SPLEEN)
    segment_widget.commit()
    labels = segment_widget.target_labels_layer(create=False)
    assert labels.name == "sample CT labels"
    committed = np.asarray(labels.data) == SPLEEN
    np.testing.assert_array_equal(committed.any(axis=(1, 2)), preview.any(axis=(1, 2)))
    viewer.layers.selection.active = segment_widget.prompt_layers()[0]
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key("Control-Z")
    handler.release_key("Control-Z")
    assert not np.asarray(labels.data).any()


def test_auto_segment_slice_adds_a_new_layer(segment_widget, qtbot):
    viewer = segment_widget._viewer
    names_before = [layer.name for layer in viewer.layers]
    reference_before = np.array(viewer.layers["sample CT reference"].data, copy=True)
    assert not segment_widget.controls.grid_spin.isEnabled()  # LiteMedSAM is prompted with a box grid
    segment_widget.auto_segment(whole_volume=False)
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    added = [layer for layer in viewer.layers if layer.name not in names_before]
    assert [layer.name for layer in added] == [f"sample CT auto-segmentation slice {SLICE}"]
    labels = np.asarray(added[0].data)
    assert len(np.unique(labels[SLICE])) > 3  # background and several organs
    assert labels.shape == (30, 101, 122) and not np.delete(labels, SLICE, axis=0).any()
    assert tuple(added[0].scale) == tuple(viewer.layers["sample CT"].scale)
    assert GEOMETRY_KEY in added[0].metadata  # saves in the scan's affine
    np.testing.assert_array_equal(viewer.layers["sample CT reference"].data, reference_before)


def test_cancelled_auto_segment_leaves_no_partial_layer(segment_widget, qtbot):
    viewer = segment_widget._viewer
    names_before = [layer.name for layer in viewer.layers]
    segment_widget.auto_segment(whole_volume=True)
    assert segment_widget.controls.cancel_button.isEnabled()
    segment_widget.controls.cancel_button.click()
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == names_before
    assert segment_widget.tasks.last_outcome.cancelled
    assert "cancelled" in segment_widget.controls.task_label.text()
    assert segment_widget.controls.auto_volume_button.isEnabled()


def test_wrong_checkpoint_is_a_notification_and_the_widget_stays_usable(ct_viewer, qtbot, notifications, tmp_path):
    bogus = tmp_path / "not_a_checkpoint.pth"
    bogus.write_text("these are not weights")
    widget = SegmentWidget(ct_viewer)
    ct_viewer.window.add_dock_widget(widget)
    widget.controls.model_combo.setCurrentText("vit_b")
    widget.controls.checkpoint_edit.setText(str(bogus))
    widget.encode_volume()
    qtbot.waitUntil(lambda: widget.idle, timeout=WORKER_TIMEOUT_MS)
    errors = [str(note.message) for note in notifications if "not_a_checkpoint.pth" in str(note.message)]
    assert errors and "weights-only checkpoint" in errors[0]
    assert widget.controls.encode_button.isEnabled() and widget.tasks.last_outcome.error is not None


def test_a_4d_image_layer_is_refused_with_a_notification(make_napari_viewer, qtbot, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((2, 5, 16, 16)), name="time series")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.encode_volume()
    assert widget.idle
    assert any("4D" in str(note.message) and "time series" in str(note.message) for note in notifications)


def test_an_unusable_adapter_is_reported_and_the_base_model_stays(segment_widget, qtbot, notifications):
    adapter_dir = "/nonexistent/adapter"
    segment_widget.set_adapter(adapter_dir)
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    combo = segment_widget.controls.adapter_combo
    assert combo.findText(adapter_dir) >= 0
    # A missing folder (or missing fine-tuning support) is reported, and the base model stays usable.
    assert notifications and combo.currentText() == "none"
    segment_widget.set_adapter(None)
    assert combo.currentText() == "none"


def test_precomputing_embeddings_reports_progress_and_can_be_cancelled(segment_widget, qtbot):
    controls = segment_widget.controls
    segment_widget.encode_volume()
    assert controls.cancel_button.isEnabled() and not controls.encode_button.isEnabled()
    qtbot.waitUntil(lambda: controls.progress_bar.maximum() > 1 and controls.progress_bar.value() >= 1,
                    timeout=WORKER_TIMEOUT_MS)  # at least one batch encoded
    controls.cancel_button.click()
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert segment_widget.tasks.last_outcome.cancelled
    status = segment_widget.predictor.status()
    assert 1 <= status["cached_slices"] < status["num_slices"]
    assert f"cache {status['cached_slices']}/30 slices" in controls.status_label.text()
    assert controls.encode_button.isEnabled() and not controls.cancel_button.isEnabled()


@pytest.fixture
def fresh_widget(ct_viewer, qtbot, tmp_path):
    """A segment widget with its own session and an empty cache: its first click loads the model and encodes."""
    from napari_sam_ft._widgets._session import SegmentSession
    from napari_sam_ft.engine.cache import EmbeddingCache

    widget = SegmentWidget(ct_viewer, session=SegmentSession(EmbeddingCache(disk_dir=tmp_path / "cache")))
    ct_viewer.window.add_dock_widget(widget, name="Segment (fresh)")
    qtbot.waitUntil(lambda: widget.prompt_layers() is not None, timeout=5000)
    yield widget
    widget.cancel()
    qtbot.waitUntil(lambda: widget.idle, timeout=WORKER_TIMEOUT_MS)


def test_cancel_stops_the_encode_of_the_first_clicked_slice(fresh_widget, qtbot):
    _points, boxes, preview = fresh_widget.prompt_layers()
    boxes.add_rectangles(rectangle(SLICE, box_from_mask(reference(fresh_widget._viewer, LIVER))))
    assert fresh_widget._slice_task is not None and fresh_widget.controls.cancel_button.isEnabled()
    fresh_widget.controls.cancel_button.click()  # while the model loads and the slice waits to be encoded
    qtbot.waitUntil(lambda: fresh_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert "cancelled" in fresh_widget.controls.task_label.text()
    assert not np.asarray(preview.data[SLICE]).any()
    assert not fresh_widget.predictor.is_encoded(SLICE) and fresh_widget.predictor.encoder_calls == 0
    assert not fresh_widget.controls.cancel_button.isEnabled()

    fresh_widget.segment_current_slice()  # the user asks again: it encodes and segments
    qtbot.waitUntil(lambda: fresh_widget.idle and np.asarray(preview.data[SLICE]).any(), timeout=WORKER_TIMEOUT_MS)
    assert dice(np.asarray(preview.data[SLICE]) > 0, reference(fresh_widget._viewer, LIVER)) > 0.85


def test_switching_the_adapter_cancels_the_running_encode_then_applies_it(fresh_widget, qtbot, tmp_path):
    from lora_adapter import make_lora_adapter

    controls = fresh_widget.controls
    fresh_widget.encode_volume()
    qtbot.waitUntil(lambda: controls.progress_bar.maximum() > 1 and controls.progress_bar.value() >= 1,
                    timeout=WORKER_TIMEOUT_MS)  # the model is loaded and the first batch stored
    model = fresh_widget._session.model
    base_key = fresh_widget.predictor.cache_key
    info = make_lora_adapter(model, tmp_path / "adapter")
    fresh_widget.set_adapter(str(info.adapter_dir))
    qtbot.waitUntil(lambda: fresh_widget.idle and fresh_widget.predictor is not None, timeout=WORKER_TIMEOUT_MS)
    assert model.adapter_id == info.adapter_id and fresh_widget.tasks.last_outcome.name == "apply adapter"
    predictor = fresh_widget.predictor
    cache = predictor.cache
    assert 1 <= len(cache.cached_slices(base_key, 30)) < 30  # the base encode stopped early
    assert cache.cached_slices(predictor.cache_key, 30) == []  # and filed nothing under the adapter's key
