"""Shared constants and prompt helpers of the widget tests."""

from __future__ import annotations

import numpy as np

# Central CT slice and two organs the reference labels hold there (see napari_sam_ft/data/class_names.json).
SLICE = 15
SPLEEN, LIVER = 1, 5


def rectangle(slice_index: int, box_xyxy) -> np.ndarray:
    """A napari Shapes rectangle (4, 3) in (z, y, x) for a SAM (x_min, y_min, x_max, y_max) box."""
    from napari_sam_ft.engine.prompts import box_to_rectangle_zyx

    return box_to_rectangle_zyx(slice_index, box_xyxy)

