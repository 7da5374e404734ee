"""One click on an organ in a real viewer, with the box-trained LiteMedSAM: the preview is the organ."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_sam_ft.engine.prompts import interior_point, point_to_napari_zyx
from napari_sam_ft.metrics import dice

from .helpers import LIVER, SLICE
from .test_segment_widget import WORKER_TIMEOUT_MS, click, reference

pytestmark = pytest.mark.gui


def test_one_click_on_the_liver_previews_the_liver_and_a_negative_click_outside_shrinks_nothing(segment_widget,
                                                                                              qtbot):
    viewer = segment_widget._viewer
    points, _boxes, preview = segment_widget.prompt_layers()
    liver = reference(viewer, LIVER)
    click(points, tuple(point_to_napari_zyx(SLICE, interior_point(liver))))
    qtbot.waitUntil(lambda: segment_widget.idle and (np.asarray(preview.data[SLICE]) > 0).any(),
                    timeout=WORKER_TIMEOUT_MS)
    first = np.asarray(preview.data[SLICE]) > 0
    assert dice(first, liver) >= 0.8, dice(first, liver)
    assert "window" in segment_widget.controls.status_label.text()

    # Shift-click on body tissue well away from the mask: a negative click outside removes nothing inside.
    body = np.asarray(viewer.layers["sample CT"].data[SLICE]) > -300
    away = np.argwhere(body & ~ndimage.binary_dilation(first, iterations=5))
    row, col = away[len(away) // 2]
    click(points, (SLICE, float(row), float(col)), modifiers=["Shift"])
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    after = np.asarray(preview.data[SLICE]) > 0
    assert not (first & ~after).any()


def test_a_click_searches_its_box_off_the_gui_thread_and_the_newest_click_decides(segment_widget, qtbot, monkeypatch):
    """The box search of a click (about a second on a CPU) must not freeze the viewer; clicks made while it
    runs are not lost: the preview follows the last one."""
    import threading

    from napari_sam_ft._widgets import segment as segment_module

    threads_used = []
    real_predict_object = segment_module.predict_object

    def recording(*args, **kwargs):
        threads_used.append(threading.current_thread() is threading.main_thread())
        return real_predict_object(*args, **kwargs)

    monkeypatch.setattr(segment_module, "predict_object", recording)
    viewer = segment_widget._viewer
    points, _boxes, preview = segment_widget.prompt_layers()
    liver = reference(viewer, LIVER)
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    click(points, tuple(point_to_napari_zyx(SLICE, interior_point(liver))))
    # A second, negative click far from the liver while the first search may still run.
    body = np.asarray(viewer.layers["sample CT"].data[SLICE]) > -300
    away = np.argwhere(body & ~ndimage.binary_dilation(liver, iterations=8))
    row, col = away[len(away) // 2]
    click(points, (SLICE, float(row), float(col)), modifiers=["Shift"])
    qtbot.waitUntil(lambda: segment_widget.idle, timeout=WORKER_TIMEOUT_MS)
    assert threads_used and not any(threads_used), threads_used
    final = np.asarray(preview.data[SLICE]) > 0
    assert dice(final, liver) >= 0.8, dice(final, liver)
