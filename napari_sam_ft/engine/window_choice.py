"""The automatic CT window, chosen per prompt from the intensities under it.

One window per scan loses somewhere: a soft-tissue window (W 400 / L 40) is best for abdominal organs but
flattens a lung lesion and the lungs themselves into black, and a wide window washes out the organs.
Measured on ../shared/cases and the sample with box prompts (``napari-sam-ft bench cases``): a box that
holds air (over 15 % below -400 HU) around an air-filled middle (a lung, bowel gas) is segmented best in a
wide window (-1050..550 HU, about the 0.5-99.5 % percentiles of a chest CT); a box whose air surrounds a
solid middle (a lesion in the lung, a vertebra beside it) in a wider, flatter one (-1024..1600 HU: lung1's
lesion 0.864 -> 0.902, ctchest's vertebrae 0.726 -> 0.743, the lungs unchanged); any other box in the
soft-tissue window. The embedding cache is keyed by window, so each slice is encoded once per window it is
used with.

Only a predictor whose window is "auto" on a CT gets a window per prompt; an explicit ``--window`` and
MRI keep the predictor's one window.
"""

from __future__ import annotations

import copy
import weakref

import numpy as np

from ..io.windowing import CT_WINDOW_PRESETS, Window, looks_like_ct
from .predictor import VolumePredictor

AIR_HU = -400.0  # below this a pixel is air or lung
AIR_FRACTION = 0.15  # a box with more air than this is segmented in the wide window (a liver box at the
# body's edge holds up to 11 % air outside the body; boxes around lung lesions hold 18-26 % lung)
AIR_FILLED_CENTRE = 0.5  # a box whose middle half (in each direction) is more air than this holds an air-filled
# structure (lungs: 0.7-1.0); a lesion in the lung has a solid middle (under 0.1)
WIDE_CT_WINDOW = Window(-1050.0, 550.0, "wide")
SOLID_IN_AIR_WINDOW = Window(-1024.0, 1600.0, "solid_in_air")
SOFT_TISSUE_LEVEL, SOFT_TISSUE_WIDTH = CT_WINDOW_PRESETS["soft_tissue"]
SOFT_TISSUE_WINDOW = Window(SOFT_TISSUE_LEVEL - SOFT_TISSUE_WIDTH / 2, SOFT_TISSUE_LEVEL + SOFT_TISSUE_WIDTH / 2,
                            "soft_tissue")
_IS_CT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Volume -> looks like CT (read once per volume)


def chooses_window_per_prompt(predictor: VolumePredictor) -> bool:
    """True for a single-channel CT whose window was left on "auto", with no adapter or one that learnt its boxes
    so (``finetune.data.windowed_per_prompt``); other adapters keep the one window they were trained in."""
    if not getattr(predictor, "window_is_automatic", False):
        return False
    adapter = predictor.model.adapter
    if adapter is not None and not adapter.info.windows_per_prompt:
        return False
    volume = predictor.volume
    if volume not in _IS_CT:
        _IS_CT[volume] = bool(volume.num_channels == 1 and looks_like_ct(volume.array))
    return _IS_CT[volume]


def window_for_box(raw_slice: np.ndarray, box_xyxy) -> Window:
    """The CT window for a box on a (H, W) slice of Hounsfield units: soft tissue unless the box holds air;
    then wide around an air-filled middle, flatter still around a solid one."""
    height, width = raw_slice.shape[:2]
    x0, y0, x1, y1 = (float(value) for value in box_xyxy)
    row_start, row_stop = int(np.clip(np.floor(y0), 0, height - 1)), int(np.clip(np.ceil(y1), 1, height))
    col_start, col_stop = int(np.clip(np.floor(x0), 0, width - 1)), int(np.clip(np.ceil(x1), 1, width))
    is_air = np.asarray(raw_slice[row_start:row_stop, col_start:col_stop], dtype=np.float32) < AIR_HU
    if not is_air.size or float(is_air.mean()) <= AIR_FRACTION:
        return SOFT_TISSUE_WINDOW
    rows, cols = is_air.shape
    middle = is_air[rows // 4: rows - rows // 4, cols // 4: cols - cols // 4]  # never empty: rows // 4 < rows / 2
    return WIDE_CT_WINDOW if float(middle.mean()) > AIR_FILLED_CENTRE else SOLID_IN_AIR_WINDOW


def with_window(predictor: VolumePredictor, window: Window) -> VolumePredictor:
    """A predictor for the same model, volume and cache with another window (made once, then reused)."""
    if window.key == predictor.window.key:
        return predictor
    siblings = predictor.__dict__.setdefault("_window_siblings", {})
    sibling = siblings.get(window.key)
    if sibling is None:
        sibling = copy.copy(predictor)  # shares model, cache, volume hash and the fast decoder's weights
        sibling.window = window
        sibling._window_siblings = siblings
        sibling._current_slice = None
        siblings[window.key] = sibling
        siblings.setdefault(predictor.window.key, predictor)
    return sibling


def predictor_for_box(predictor: VolumePredictor, slice_index: int, box_xyxy) -> VolumePredictor:
    """The predictor to segment ``box_xyxy`` on ``slice_index`` with: its window chosen from under the box."""
    used = predictor.__dict__.setdefault("_windows_used", set())  # before any sibling copies the dict: shared
    if box_xyxy is None or not chooses_window_per_prompt(predictor):
        chosen = predictor
    else:
        chosen = with_window(predictor, window_for_box(predictor.volume.array[slice_index], box_xyxy))
    used.add(chosen.window.name)
    return chosen


def windows_used(predictor: VolumePredictor) -> list[str]:
    """The names of the windows prompts were segmented with so far (for evaluate's report and the status line)."""
    return sorted(getattr(predictor, "_windows_used", None) or {predictor.window.name})


def encoder_passes(predictor: VolumePredictor) -> int:
    """Image-encoder passes of this predictor and the per-window siblings it made."""
    siblings = getattr(predictor, "_window_siblings", None) or {predictor.window.key: predictor}
    return sum(sibling.encoder_calls for sibling in siblings.values())
