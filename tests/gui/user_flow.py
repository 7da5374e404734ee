"""What a new user does, in a fresh interpreter: start napari, dock every widget from the Plugins menu, open a
scan with the plugin's reader, draw a box, then refine with a click. Run by ``test_user_flow.py`` as a
subprocess, so a crash (e.g. a segmentation fault) is a failed test with its stderr, not a dead pytest.

    xvfb-run -a python tests/gui/user_flow.py IMAGE LABELS LABEL_ID [SLICE]

Nothing of torch or napari-sam-ft is imported before the viewer exists. The last stdout line is a JSON report:
docked widget titles, the box preview's Dice on the prompted slice, click-to-preview milliseconds, and whether
triton / torch._dynamo ended up imported.
"""

from __future__ import annotations

import json
import sys
import time

PLUGIN_MENU_TITLE = "SAM fine-tune for 3D CT and MRI"  # napari.yaml display_name
ENCODE_TIMEOUT_S = 240.0


def wait_until(app, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.01)


def plugin_menu_actions(viewer) -> dict:
    """The plugin's actions under the viewer's Plugins menu, by title (what a user clicks)."""
    for top in viewer.window._qt_window.menuBar().actions():
        if top.text().replace("&", "") != "Plugins":
            continue
        for entry in top.menu().actions():
            if entry.text() == PLUGIN_MENU_TITLE and entry.menu() is not None:
                return {action.text(): action for action in entry.menu().actions()}
    raise LookupError(f"no {PLUGIN_MENU_TITLE!r} submenu under Plugins")


def main(image_path: str, labels_path: str, label_id: int, slice_index: int | None) -> dict:
    assert not any(name == "torch" or name.startswith(("torch.", "napari_sam_ft")) for name in sys.modules), \
        "the flow must start with nothing of torch or napari-sam-ft imported"
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer()
    app = QApplication.instance()
    app.processEvents()

    actions = plugin_menu_actions(viewer)
    for action in actions.values():  # every widget the plugin contributes, as the user clicks them
        action.trigger()
        app.processEvents()
    docked = sorted(viewer.window.dock_widgets.keys())

    image = viewer.open(image_path, plugin="napari-sam-ft")[0]
    reference = viewer.open(labels_path, plugin="napari-sam-ft")[0]
    app.processEvents()

    from napari_sam_ft._widgets.segment import SegmentWidget
    from napari_sam_ft.engine.prompts import box_from_mask, interior_point, point_to_napari_zyx, \
        box_to_rectangle_zyx
    from napari_sam_ft.metrics import dice

    segment = next(widget for widget in viewer.window._qt_window.findChildren(SegmentWidget))
    segment.controls.image_combo.select_layer(image)
    reference_mask = np.asarray(reference.data) == label_id
    if slice_index is None:  # the slice where the object is largest
        slice_index = int(np.argmax(reference_mask.reshape(reference_mask.shape[0], -1).sum(axis=1)))
    truth = reference_mask[slice_index]
    viewer.dims.set_current_step(0, slice_index)
    wait_until(app, lambda: segment.prompt_layers(notify=False) is not None, 30, "the prompt layers")
    points, boxes, preview = segment.prompt_layers()

    started = time.perf_counter()
    boxes.add_rectangles(box_to_rectangle_zyx(slice_index, box_from_mask(truth)))
    wait_until(app, lambda: segment.idle and np.asarray(preview.data[slice_index]).any(), ENCODE_TIMEOUT_S,
               "the box preview")
    box_seconds = time.perf_counter() - started
    box_dice = float(dice(np.asarray(preview.data[slice_index]) > 0, truth))

    # A refining click on a slice that is encoded now: decoded on the GUI thread, no worker.
    points.add(point_to_napari_zyx(slice_index, interior_point(truth)))
    app.processEvents()
    click_dice = float(dice(np.asarray(preview.data[slice_index]) > 0, truth))
    report = {"docked": docked, "slice": slice_index, "box_dice": box_dice, "box_seconds": box_seconds,
              "click_dice": click_dice, "click_to_preview_ms": segment.last_click_to_preview_ms,
              "triton_imported": sys.modules.get("triton") is not None,
              "dynamo_imported": "torch._dynamo" in sys.modules}
    viewer.close()
    return report


if __name__ == "__main__":
    arguments = sys.argv[1:]
    result = main(arguments[0], arguments[1], int(arguments[2]), int(arguments[3]) if len(arguments) > 3 else None)
    print(json.dumps(result))
