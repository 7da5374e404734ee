"""Grow a 2D mask through the volume, slice by slice, prompting each slice from its neighbour's mask."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .predictor import Cancelled, CancelCheck, ProgressCallback, VolumePredictor
from .prompts import box_from_mask
from .window_choice import predictor_for_box

DEFAULT_STOP_IOU = 0.7
DEFAULT_MIN_AREA_RATIO = 0.2


def _box_margin(mask: np.ndarray) -> float:
    """Room for the object to grow between slices: 2 px plus 5 % of the box size."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return 2.0 + 0.05 * max(rows[-1] - rows[0], cols[-1] - cols[0])


def _keep_connected_to(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Drop components that do not touch the (dilated) previous mask: they are other organs, not this one."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    near = ndimage.binary_dilation(previous, iterations=2)
    touching = np.unique(components[near & mask])
    touching = touching[touching > 0]
    if touching.size == 0:
        return mask
    return np.isin(components, touching)


def _stop_reason(score: float, mask: np.ndarray, previous: np.ndarray, stop_iou: float,
                 min_area_ratio: float) -> str:
    """Why growth stops at this slice ("" if it goes on)."""
    if not mask.any():
        return "the mask vanished"
    if score < stop_iou:
        return f"predicted IoU {score:.2f} < {stop_iou:.2f}"
    if mask.sum() < min_area_ratio * previous.sum():
        return f"area fell below {min_area_ratio:.0%} of the previous slice's"
    return ""


def propagate_mask(predictor: VolumePredictor, key_masks: dict[int, np.ndarray], *,
                   stop_iou: float = DEFAULT_STOP_IOU, min_area_ratio: float = DEFAULT_MIN_AREA_RATIO,
                   use_mask_prompt: bool = False, slice_range: tuple[int, int] | None = None,
                   progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                   report: dict | None = None, scores: dict[int, float] | None = None) -> np.ndarray:
    """One object through the volume, from masks on one or more key slices -> (Z, H, W) bool.

    Between two key slices each slice is prompted with the box interpolated between the keys' boxes.
    Beyond the outermost keys each slice is prompted with the box of its neighbour's mask (and that
    mask's logits with ``use_mask_prompt``); growth stops when the predicted IoU falls below
    ``stop_iou``, the mask vanishes, or its area falls below ``min_area_ratio`` of the neighbour's.

    ``report``, if given, receives for each side ("below", "above") the last slice reached and why growth
    stopped; ``scores`` receives each grown slice's predicted IoU (the widget shows the weakest).
    """
    num_slices = predictor.volume.num_slices
    low, high = slice_range if slice_range is not None else (0, num_slices - 1)
    keys = sorted(int(index) for index, mask in key_masks.items() if np.asarray(mask).any())
    if not keys:
        raise ValueError("propagation needs a mask on at least one slice; the key masks are all empty")
    for index in keys:
        predictor._check_slice(index)
    result = np.zeros((num_slices, *predictor.slice_shape), dtype=bool)
    for index in keys:
        result[index] = np.asarray(key_masks[index], dtype=bool)

    between = [(first, second) for first, second in zip(keys, keys[1:]) if second - first > 1]
    total = sum(second - first - 1 for first, second in between) + max(keys[0] - low, 0) + max(high - keys[-1], 0)
    done = 0

    def step() -> None:
        nonlocal done
        if should_cancel is not None and should_cancel():
            raise Cancelled("propagation cancelled")
        done += 1
        if progress:
            progress(done, total)

    for first, second in between:
        first_box, second_box = box_from_mask(result[first]), box_from_mask(result[second])
        for index in range(first + 1, second):
            fraction = (index - first) / (second - first)
            box = (1 - fraction) * first_box + fraction * second_box
            prediction = predictor_for_box(predictor, index, box).predict(box=box, slice_index=index)
            result[index] = prediction.mask
            if scores is not None:
                scores[index] = prediction.score
            step()

    for side, start, stop, direction in (("below", keys[0], low - 1, -1), ("above", keys[-1], high + 1, 1)):
        previous = result[start]
        previous_logits = None
        reached, reason = start, "end of the range"
        for index in range(start + direction, stop, direction):
            box = box_from_mask(previous, margin=_box_margin(previous))
            chosen = predictor_for_box(predictor, index, box)
            prediction = chosen.predict(box=box, slice_index=index,
                                        mask_input=previous_logits if use_mask_prompt else None)
            mask = _keep_connected_to(prediction.mask, previous)
            step()
            reason = _stop_reason(prediction.score, mask, previous, stop_iou, min_area_ratio)
            if reason:
                break
            result[index] = mask
            if scores is not None:
                scores[index] = prediction.score
            reached, reason = index, "end of the range"
            previous, previous_logits = mask, prediction.low_res_logits
        if report is not None:
            report[side] = {"reached": int(reached), "stop": reason}
    if progress:
        progress(total, total)
    return result

