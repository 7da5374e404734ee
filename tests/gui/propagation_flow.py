"""Checking a propagation as a user does, in a fresh napari process: box one slice, propagate a few slices, go to
the weakest slice, paint a correction there, re-propagate. Run by ``test_propagation_flow.py`` as a subprocess.

    xvfb-run -a python tests/gui/propagation_flow.py IMAGE LABELS LABEL_ID SLICE REACH

The last stdout line is a JSON report: the per-slice predicted IoU shown, the weakest slice and where the viewer
went, whether the corrected slice is bit-identical after re-propagating, which slices re-propagation changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from user_flow import ENCODE_TIMEOUT_S, plugin_menu_actions, wait_until  # noqa: E402

SEGMENT_TITLE = "Segment"


def paint_correction(preview, slice_index: int, truth, value: int) -> None:
    """Brush strokes as the paint tool makes them: fill a few missed spots of ``truth``, erase a few wrong ones."""
    import numpy as np

    preview.brush_size = 3
    current = np.asarray(preview.data[slice_index]) > 0
    for wanted, label in ((truth & ~current, value), (current & ~truth, 0)):
        spots = np.argwhere(wanted)
        for row, col in spots[:: max(1, len(spots) // 12)][:12]:
            preview.paint((slice_index, int(row), int(col)), label)


def main(image_path: str, labels_path: str, label_id: int, key_slice: int, reach: int) -> dict:
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    app = QApplication.instance()
    plugin_menu_actions(viewer)[SEGMENT_TITLE].trigger()  # as the user docks it
    app.processEvents()
    image = viewer.open(image_path, plugin="napari-sam-ft")[0]
    reference = viewer.open(labels_path, plugin="napari-sam-ft")[0]
    app.processEvents()

    from napari_sam_ft._widgets._layers import PREVIEW_VALUE, current_slice_index
    from napari_sam_ft._widgets.segment import SegmentWidget
    from napari_sam_ft.engine.prompts import box_from_mask, box_to_rectangle_zyx

    segment = next(widget for widget in viewer.window._qt_window.findChildren(SegmentWidget))
    segment.controls.image_combo.select_layer(image)
    truth = np.asarray(reference.data) == label_id
    viewer.dims.set_current_step(0, key_slice)
    wait_until(app, lambda: segment.prompt_layers(notify=False) is not None, 30, "the prompt layers")
    _points, boxes, preview = segment.prompt_layers()
    boxes.add_rectangles(box_to_rectangle_zyx(key_slice, box_from_mask(truth[key_slice])))
    wait_until(app, lambda: segment.idle and np.asarray(preview.data[key_slice]).any(), ENCODE_TIMEOUT_S, "the box")

    segment.controls.range_spin.setValue(reach)
    segment.controls.propagate_button.click()
    wait_until(app, lambda: segment.idle and segment.review.active, ENCODE_TIMEOUT_S, "the propagation")
    propagated = np.asarray(preview.data).copy()
    shown_iou = segment.controls.propagation_label.text()

    segment.controls.weakest_button.click()
    app.processEvents()
    weakest = segment.review.weakest_slice()
    at = current_slice_index(viewer, image)
    paint_correction(preview, at, truth[at], PREVIEW_VALUE)
    corrected = np.asarray(preview.data[at]).copy()

    segment.controls.repropagate_button.click()
    wait_until(app, lambda: segment.idle, ENCODE_TIMEOUT_S, "the re-propagation")
    after = np.asarray(preview.data)
    changed = [int(z) for z in range(after.shape[0]) if not np.array_equal(after[z], propagated[z])]
    report = {"key_slice": key_slice, "shown_iou": shown_iou,
              "scores": {str(z): score for z, score in segment.review.scores.items()},
              "weakest": weakest, "viewer_slice": at, "painted": bool(not np.array_equal(corrected, propagated[at])),
              "corrected_identical": bool(np.array_equal(after[at], corrected)),
              "key_identical": bool(np.array_equal(after[key_slice], propagated[key_slice])),
              "changed": changed, "task": segment.controls.task_label.text()}
    viewer.close()
    return report


if __name__ == "__main__":
    arguments = sys.argv[1:]
    print(json.dumps(main(arguments[0], arguments[1], int(arguments[2]), int(arguments[3]), int(arguments[4]))))
