"""The session panel in a real viewer: autosave on paint, the restore prompt, save and open a session."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from napari_sam_ft._widgets._layers import BOXES_NAME
from napari_sam_ft._widgets.session_panel import CHOICES_KEY, SessionPanel
from napari_sam_ft.session import DAMAGED_SUFFIX, read_autosave_info, restore_autosave
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


def autosave_from_a_crashed_napari(image_path, autosave_folder, layer_name="organs") -> Path:
    """Labels autosaved for the image by another napari-sam-ft process that then died: its autosave file."""
    script = textwrap.dedent("""
        import sys, numpy as np
        from napari_sam_ft.session import Autosaver
        labels = np.zeros((30, 101, 122), np.uint8)
        labels[15, 40:50, 40:50] = 42
        autosaver = Autosaver(sys.argv[1], lambda: labels, every_edits=2, layer_name=sys.argv[2])
        autosaver.record_edit(2)
        print(autosaver.path)
    """)
    finished = subprocess.run([sys.executable, "-c", script, str(image_path), layer_name], capture_output=True,
                              text=True, timeout=120, check=True,
                              env={**os.environ, "NAPARI_SAM_FT_AUTOSAVE": str(autosave_folder)})
    return Path(finished.stdout.strip().splitlines()[-1])


def test_painting_autosaves_and_keeps_autosaving_while_an_earlier_autosave_is_offered(ct_viewer, qtbot,
                                                                                       autosave_folder):
    image_path = sample_paths("ct")[0]
    earlier = autosave_from_a_crashed_napari(image_path, autosave_folder)
    earlier_bytes = earlier.read_bytes()
    panel = _panel(ct_viewer)
    assert panel.restore_frame.isVisibleTo(panel) and "2 edits" in panel.restore_message.text()
    assert "organs" in panel.restore_message.text()
    labels = panel.labels_layer
    assert labels is not None and labels.name == "sample CT reference"
    assert "every 2 edits" in panel.autosave_label.text()  # not paused by the open question

    labels.paint((SLICE, 80, 80), 7)
    labels.paint((SLICE, 90, 90), 7)
    qtbot.waitUntil(lambda: "Autosaved" in panel.autosave_label.text(), timeout=10000)
    ours = panel.autosaver.path
    assert ours != earlier and ours.exists() and earlier.read_bytes() == earlier_bytes  # never overwritten
    assert np.array_equal(restore_autosave(read_autosave_info(ours)), np.asarray(labels.data))

    panel.restore_button.click()
    qtbot.waitUntil(lambda: panel.idle and ct_viewer.layers[-1].name.startswith("organs (restored"), timeout=10000)
    restored = ct_viewer.layers[-1]
    assert restored.data[SLICE, 45, 45] == 42 and int(restored.data.max()) == 42
    assert not panel.restore_frame.isVisibleTo(panel)
    assert panel.labels_layer is restored and panel.autosaver is not None
    # Once the restored layer's own autosave is written, the earlier file goes.
    qtbot.waitUntil(lambda: not earlier.exists(), timeout=10000)
    assert read_autosave_info(panel.autosaver.path).layer_name == restored.name


def test_a_damaged_autosave_is_reported_and_kept_aside(ct_viewer, qtbot, autosave_folder, notifications):
    image_path = sample_paths("ct")[0]
    earlier = autosave_from_a_crashed_napari(image_path, autosave_folder)
    earlier.write_bytes(b"PK\x03\x04 cut short")
    panel = _panel(ct_viewer)
    kept = earlier.with_name(earlier.name + DAMAGED_SUFFIX)
    assert not panel.restore_frame.isVisibleTo(panel) and kept.exists() and not earlier.exists()
    assert any("damaged" in str(note.message) and str(kept) in str(note.message) for note in notifications)


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
    qtbot.waitUntil(lambda: panel.autosaver.path.exists(), timeout=10000)
    autosave = panel.autosaver.path
    reference = np.array(labels.data)

    assert panel.save(tmp_path / "organs.session.json") is not None
    assert not panel.save_button.isEnabled()  # the write runs in a thread
    qtbot.waitUntil(lambda: panel.idle, timeout=30000)
    path = panel.last_saved
    assert path is not None and (tmp_path / "organs.labels.nii.gz").exists()
    assert not autosave.exists()  # saved: nothing left to recover

    ct_viewer.layers.remove(labels)
    panel.reviewed_slices = set()
    panel.open(path)
    qtbot.waitUntil(lambda: panel.idle, timeout=30000)
    image_layer, opened_labels = panel.last_opened
    assert image_layer is image  # the open image is reused, not loaded twice
    assert np.array_equal(opened_labels.data, reference)
    assert panel.reviewed_slices == {SLICE} and panel.labels_layer is opened_labels
    boxes = ct_viewer.layers[BOXES_NAME]
    assert len(boxes.data) == 2 and np.allclose(boxes.data[1], boxes.data[0])
    assert image.metadata[CHOICES_KEY]["window"] == "soft_tissue"


def test_the_panel_is_a_plugin_widget_of_the_manifest(ct_viewer):
    _, panel = ct_viewer.window.add_plugin_dock_widget("napari-sam-ft", "Session")
    assert isinstance(panel, SessionPanel) and panel.image_layer is not None
