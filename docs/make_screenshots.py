"""Make the user guide's screenshots: the segment widget docked on the sample CT, with real predictions.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py

Writes docs/images/segment-preview.png (box + clicks -> preview), docs/images/segment-propagated.png
(propagated through z and committed) and docs/images/segment-3d.png (the committed organ in 3D).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGES = Path(__file__).resolve().parent / "images"
SLICE, LIVER, SPLEEN = 15, 5, 1


def wait(app, condition, timeout_s: float = 600.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        app.processEvents()
        time.sleep(0.01)
        if time.perf_counter() > deadline:
            raise TimeoutError("the widget did not finish in time")
    for _ in range(10):  # let the canvas repaint
        app.processEvents()
        time.sleep(0.01)


def rectangle(slice_index: int, box_xyxy) -> np.ndarray:
    """A napari Shapes rectangle (4, 3) in (z, y, x) for a SAM (x_min, y_min, x_max, y_max) box."""
    from napari_sam_ft.engine.prompts import box_to_rectangle_zyx

    return box_to_rectangle_zyx(slice_index, box_xyxy)


def main() -> int:
    os.environ.setdefault("NAPARI_SAM_FT_CACHE", tempfile.mkdtemp(prefix="napari-sam-ft-docs-"))
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam_ft._widgets.segment import SegmentWidget
    from napari_sam_ft.engine.prompts import box_from_mask, interior_point, point_to_napari_zyx

    IMAGES.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-sam-ft")
    viewer.window.resize(1500, 950)
    viewer.open_sample("napari-sam-ft", "ct")
    reference = viewer.layers["sample CT reference"]
    reference.visible = False
    app = QApplication.instance()
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment", area="right")
    viewer.dims.set_current_step(0, SLICE)
    wait(app, lambda: widget.prompt_layers() is not None)
    points, boxes, preview = widget.prompt_layers()

    # 1. A box around the liver and two clicks (one positive, one negative) -> the live preview.
    liver = np.asarray(reference.data[SLICE]) == LIVER
    boxes.add_rectangles(rectangle(SLICE, box_from_mask(liver)))
    wait(app, lambda: widget.idle)
    points.add([point_to_napari_zyx(SLICE, interior_point(liver))])
    spleen_rows, spleen_cols = np.nonzero(np.asarray(reference.data[SLICE]) == SPLEEN)
    points.feature_defaults["prompt"] = "negative"
    points.add([[SLICE, spleen_rows.mean(), spleen_cols.mean()]])
    widget.controls.label_spin.setValue(LIVER)
    viewer.reset_view()
    viewer.camera.zoom *= 1.15
    wait(app, lambda: widget.idle)
    viewer.screenshot(str(IMAGES / "segment-preview.png"), canvas_only=False)

    # 2. Propagate through z (the worker encodes the other slices), commit, look at another slice.
    widget.propagate()
    wait(app, lambda: widget.idle)
    widget.commit()
    viewer.dims.set_current_step(0, SLICE + 8)
    wait(app, lambda: widget.idle)
    viewer.screenshot(str(IMAGES / "segment-propagated.png"), canvas_only=False)

    # 3. The committed liver in 3D.
    viewer.dims.ndisplay = 3
    viewer.layers["sample CT"].visible = False
    viewer.reset_view()
    viewer.camera.angles = (10, -30, 70)
    viewer.camera.zoom *= 1.25
    wait(app, lambda: True)
    viewer.screenshot(str(IMAGES / "segment-3d.png"), canvas_only=False)
    viewer.close()
    for name in ("segment-preview.png", "segment-propagated.png", "segment-3d.png"):
        print(IMAGES / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
