"""The session panel in a real viewer: autosave on paint, the restore prompt, save and open a session."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam_ft._widgets._layers import BOXES_NAME
from napari_sam_ft._widgets.session_panel import CHOICES_KEY, SessionPanel
from napari_sam_ft.session import autosave_path, find_recoverable_autosave
from napari_sam_ft.sample import sample_paths

from .helpers import SLICE, rectangle


@pytest.fixture(autouse=True)
def autosave_folder(tmp_path, monkeypatch):
    folder = tmp_path / "autosave"
    monkeypatch.setenv("NAPARI_SAM_FT_AUTOSAVE", str(folder))
    return folder


def _panel(viewer, every_edits=2) -> SessionPanel:
    panel = SessionPanel(viewer, every_edits=every_edits)
    viewer.window.add_dock_widget(panel, name="Session")
    return panel


def test_painting_autosaves_and_a_new_panel_offers_to_restore_it(ct_viewer, qtbot):
    image_path = sample_paths("ct")[0]
    panel = _panel(ct_viewer)
    labels = panel.labels_layer
    assert labels is not None and labels.name == "sample CT reference"
    assert not panel.restore_frame.isVisibleTo(panel) and "every 2 edits" in panel.autosave_label.text()
    labels.paint((SLICE, 40, 40), 42)
    assert not autosave_path(image_path).exists()
    labels.paint((SLICE, 60, 60), 42)
    qtbot.waitUntil(lambda: autosave_path(image_path).exists() and "Autosaved" in panel.autosave_label.text(),
                    timeout=10000)
    painted = np.array(labels.data)

    # The viewer "crashed": a new panel on the same image finds the autosave and pauses autosaving until asked.
    with qtbot.waitSignal(panel.destroyed, timeout=5000):
        ct_viewer.window.remove_dock_widget(panel)
        panel.deleteLater()
    second = _panel(ct_viewer)
    assert second.restore_frame.isVisibleTo(second) and "2 edits" in second.restore_message.text()
    assert second.autosaver is None and "paused" in second.autosave_label.text()
    second.restore_button.click()
    restored = ct_viewer.layers[-1]
    assert restored.name.startswith("sample CT reference (restored")
    assert np.array_equal(restored.data, painted) and (restored.data[SLICE, 40, 40] == 42)
    assert not second.restore_frame.isVisibleTo(second)
    assert second.labels_layer is restored and second.autosaver is not None


def test_save_and_open_a_session_restores_labels_prompts_and_reviewed_slices(ct_viewer, qtbot, tmp_path):
    panel = _panel(ct_viewer, every_edits=1)
    image = panel.image_layer
    image.metadata[CHOICES_KEY] = {"model_name": "litemedsam", "window": "soft_tissue", "adapter_dir": None}
    ct_viewer.add_shapes([rectangle(SLICE, (20, 30, 70, 80))], shape_type="rectangle", name=BOXES_NAME,
                         scale=image.scale, translate=image.translate)
    panel.toggle_reviewed()
    assert panel.reviewed_slices == {SLICE} and "1 of 30" in panel.reviewed_label.text()
    labels = panel.labels_layer
    labels.paint((SLICE, 50, 50), 7)  # every edit autosaves here
    qtbot.waitUntil(lambda: find_recoverable_autosave(sample_paths("ct")[0]) is not None, timeout=10000)
    reference = np.array(labels.data)

    path = panel.save(tmp_path / "organs.session.json")
    assert path is not None and (tmp_path / "organs.labels.nii.gz").exists()
    assert find_recoverable_autosave(sample_paths("ct")[0]) is None  # saved: nothing left to recover

    ct_viewer.layers.remove(labels)
    panel.reviewed_slices = set()
    image_layer, opened_labels = panel.open(path)
    assert image_layer is image  # the open image is reused, not loaded twice
    assert np.array_equal(opened_labels.data, reference)
    assert panel.reviewed_slices == {SLICE} and panel.labels_layer is opened_labels
    boxes = ct_viewer.layers[BOXES_NAME]
    assert len(boxes.data) == 2 and np.allclose(boxes.data[1], boxes.data[0])
    assert image.metadata[CHOICES_KEY]["window"] == "soft_tissue"


def test_the_panel_is_a_plugin_widget_of_the_manifest(ct_viewer):
    _, panel = ct_viewer.window.add_plugin_dock_widget("napari-sam-ft", "Session")
    assert isinstance(panel, SessionPanel) and panel.image_layer is not None
