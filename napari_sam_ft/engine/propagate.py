"""Grow a 2D mask through the volume, slice by slice, prompting each slice from its neighbour's mask.

Measured on ../shared/cases and the bundled samples (``napari-sam-ft evaluate IMAGE LABELS --prompt propagate``
against ``--prompt box``), three things decide whether growth from one key slice holds:

- The box. A box grown by a margin lets SAM fill it with the neighbour organ where the object shrinks (the
  lung apex); a tight box shrinks an object that widens or shifts a little more on every slice (the aorta,
  back muscles). A large object's slice is decoded with both boxes in one pass, and of the masks that have the
  object's intensities (below) and overlap the neighbour's mask by half or more (the object moves little
  between slices; the organ beside it does not overlap it), the one with the higher predicted IoU is kept.
  A small object (its box at most a fifth of the slice across) gets the tight box only: SAM fills its
  margin box with the tissue around it, and the mask grows a little more on every slice (mni152's
  hippocampus reached four times its size; lung1's lesion, thoracic vertebrae). The sample CT's spleen,
  over a fifth of its slice and shifting on every 3 mm slice, still needs the margin box.
- Where to stop. Past the object's end SAM still finds something in the box, with a high predicted IoU (a
  lung's box lands on the liver dome below the diaphragm at IoU 0.86). Growth stops when under 30 % of
  the new mask's pixels have the intensities most of the key slice's object has (5-95 %, raw units), as
  well as on a low predicted IoU, a vanished mask or a collapsing area. The share is low because an MR
  lesion is not uniform: on brain2 only 41 % of the next slice's reference lesion has the key slice's
  intensities, and a lung's mask on the liver dome has almost none.
- The window: each slice's CT window is chosen from under its box, as for box prompts, and a small object's
  boxes are decoded on a zoomed crop around them (``engine.zoom``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .predictor import Cancelled, CancelCheck, ProgressCallback, VolumePredictor
from .prompts import box_from_mask, user_objects_on_slice
from .window_choice import predictor_for_box
from .zoom import decode_boxes, predict_box

DEFAULT_STOP_IOU = 0.6  # LiteMedSAM's predicted IoU on a tight box is lower than on a loose one; 0.7 stopped lungs
DEFAULT_MIN_AREA_RATIO = 0.2
MIN_INSIDE_BAND = 0.3  # growth stops when less of the mask than this has the key object's intensities
MIN_OVERLAP = 0.5  # a slice's mask should overlap its neighbour's by this IoU at least
BAND_PERCENTILES = (5.0, 95.0)
SMALL_OBJECT_FRACTION = 0.2  # an object whose box's longest side is at most this share of the slice's is small


@dataclass(frozen=True)
class IntensityBand:
    """The raw intensities (HU for CT) that most of the object's pixels on its key slices have."""

    low: float
    high: float

    def inside_fraction(self, values: np.ndarray) -> float:
        """The fraction of ``values`` within the band (0 for none)."""
        return float(((values >= self.low) & (values <= self.high)).mean()) if values.size else 0.0


@dataclass
class GrownSlice:
    """One slice grown from its neighbour's mask."""

    mask: np.ndarray  # (H, W) bool
    score: float  # the decoder's predicted IoU
    inside_band: float  # fraction of the mask with the key object's intensities


def slice_intensities(predictor: VolumePredictor, slice_index: int) -> np.ndarray:
    """(H, W) float32 raw intensities of a slice (the channel mean of a multi-channel volume)."""
    raw = np.asarray(predictor.volume.array[slice_index], dtype=np.float32)
    return raw.mean(axis=-1) if raw.ndim == 3 else raw


def intensity_band(predictor: VolumePredictor, key_masks: dict[int, np.ndarray]) -> IntensityBand:
    """The 5-95 % intensity band of the object's pixels on its key slices."""
    values = np.concatenate([slice_intensities(predictor, index)[mask] for index, mask in key_masks.items()])
    low, high = np.percentile(values, BAND_PERCENTILES)
    return IntensityBand(float(low), float(high))


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


def _overlap(mask: np.ndarray, previous: np.ndarray) -> float:
    """IoU of two (H, W) bool masks."""
    union = np.logical_or(mask, previous).sum()
    return float(np.logical_and(mask, previous).sum() / union) if union else 0.0


def grow_into(predictor: VolumePredictor, slice_index: int, previous: np.ndarray, band: IntensityBand) -> GrownSlice:
    """The object on ``slice_index`` from its neighbour's (H, W) mask ``previous``.

    A small object's tight box is decoded alone. A larger object's tight box and its box with a margin are
    decoded in one pass, and the mask kept is, in this order, one with the object's intensities, one
    overlapping ``previous`` enough, the one with the higher predicted IoU.
    """
    tight = box_from_mask(previous)
    small = max(tight[2] - tight[0], tight[3] - tight[1]) <= SMALL_OBJECT_FRACTION * max(predictor.slice_shape)
    boxes = tight[None] if small else np.stack([tight, box_from_mask(previous, margin=_box_margin(previous))])
    masks, ious, _ = decode_boxes(predictor_for_box(predictor, slice_index, tight), slice_index, boxes)
    intensities = slice_intensities(predictor, slice_index)
    options = []
    for mask, iou in zip(masks, ious):
        mask = _keep_connected_to(mask, previous)
        options.append(GrownSlice(mask, float(iou), band.inside_fraction(intensities[mask])))
    return max(options, key=lambda option: (option.inside_band >= MIN_INSIDE_BAND,
                                            _overlap(option.mask, previous) >= MIN_OVERLAP, option.score))


def _stop_reason(grown: GrownSlice, previous: np.ndarray, stop_iou: float, min_area_ratio: float) -> str:
    """Why growth stops at this slice ("" if it goes on)."""
    if not grown.mask.any():
        return "the mask vanished"
    if grown.score < stop_iou:
        return f"predicted IoU {grown.score:.2f} < {stop_iou:.2f}"
    if grown.mask.sum() < min_area_ratio * previous.sum():
        return f"area fell below {min_area_ratio:.0%} of the previous slice's"
    if grown.inside_band < MIN_INSIDE_BAND:
        return f"only {grown.inside_band:.0%} of the mask has the key slices' intensities"
    return ""


def _key_slices(predictor: VolumePredictor, key_masks: dict[int, np.ndarray]) -> list[int]:
    """The slices of ``key_masks`` that hold a mask, sorted; raises if there are none."""
    keys = sorted(int(index) for index, mask in key_masks.items() if np.asarray(mask).any())
    if not keys:
        raise ValueError("propagation needs a mask on at least one slice; the key masks are all empty")
    for index in keys:
        predictor._check_slice(index)
    return keys


def _gaps(keys: list[int]) -> list[tuple[int, int]]:
    """Consecutive key slices with at least one slice between them."""
    return [(first, second) for first, second in zip(keys, keys[1:]) if second - first > 1]


def _fill_between(predictor: VolumePredictor, first: int, first_mask: np.ndarray, second: int,
                  second_mask: np.ndarray, step) -> dict[int, tuple[np.ndarray, float]]:
    """Slices strictly between two key slices, each prompted with the box interpolated between the keys' boxes
    -> {slice: (mask, predicted IoU)}."""
    first_box, second_box = box_from_mask(first_mask), box_from_mask(second_mask)
    filled = {}
    for index in range(first + 1, second):
        fraction = (index - first) / (second - first)
        box = (1 - fraction) * first_box + fraction * second_box
        prediction = predict_box(predictor_for_box(predictor, index, box), index, box)
        filled[index] = (prediction.mask, prediction.score)
        step()
    return filled


def _progress_steps(total: int, progress: ProgressCallback | None, should_cancel: CancelCheck | None):
    """A step() that checks for cancellation and reports one more slice done."""
    done = 0

    def step() -> None:
        nonlocal done
        if should_cancel is not None and should_cancel():
            raise Cancelled("propagation cancelled")
        done += 1
        if progress:
            progress(done, total)

    return step


def regrow_between_keys(predictor: VolumePredictor, key_masks: dict[int, np.ndarray], *,
                        progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                        scores: dict[int, float] | None = None) -> dict[int, np.ndarray]:
    """Re-propagation after corrections: {slice: (H, W) bool} for the slices strictly between consecutive key
    slices only.

    ``key_masks`` are the slices the user prompted, corrected or committed. An empty key mask (a slice the user
    erased) still bounds a gap, it is just not grown from. No key slice, and no slice outside the outermost keys,
    is in the result, so a caller writing the result back never touches them. ``scores`` receives each regrown
    slice's predicted IoU.
    """
    masks = {int(index): np.asarray(mask, dtype=bool) for index, mask in key_masks.items()}
    _key_slices(predictor, masks)  # raises unless some key holds a mask
    for index in masks:
        predictor._check_slice(index)
    gaps = [(first, second) for first, second in _gaps(sorted(masks)) if masks[first].any() and masks[second].any()]
    step = _progress_steps(sum(second - first - 1 for first, second in gaps), progress, should_cancel)
    regrown: dict[int, np.ndarray] = {}
    for first, second in gaps:
        for index, (mask, score) in _fill_between(predictor, first, masks[first], second, masks[second], step).items():
            regrown[index] = mask
            if scores is not None:
                scores[index] = score
    return regrown


def propagate_mask(predictor: VolumePredictor, key_masks: dict[int, np.ndarray], *,
                   stop_iou: float = DEFAULT_STOP_IOU, min_area_ratio: float = DEFAULT_MIN_AREA_RATIO,
                   slice_range: tuple[int, int] | None = None,
                   progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                   report: dict | None = None, scores: dict[int, float] | None = None) -> np.ndarray:
    """One object through the volume, from masks on one or more key slices -> (Z, H, W) bool.

    Between two key slices each slice is prompted with the box interpolated between the keys' boxes.
    Beyond the outermost keys each slice grows from its neighbour's mask (``grow_into``); growth stops when
    the predicted IoU falls below ``stop_iou``, the mask vanishes, its area falls below ``min_area_ratio``
    of the neighbour's, or under ``MIN_INSIDE_BAND`` of it has the key slices' intensities.

    ``report``, if given, receives for each side ("below", "above") the last slice reached and why growth
    stopped; ``scores`` receives each grown slice's predicted IoU (the widget shows the weakest).
    """
    num_slices = predictor.volume.num_slices
    low, high = slice_range if slice_range is not None else (0, num_slices - 1)
    keys = _key_slices(predictor, key_masks)
    result = np.zeros((num_slices, *predictor.slice_shape), dtype=bool)
    for index in keys:
        result[index] = np.asarray(key_masks[index], dtype=bool)
    band = intensity_band(predictor, {index: result[index] for index in keys})
    gaps = _gaps(keys)
    total = sum(second - first - 1 for first, second in gaps) + max(keys[0] - low, 0) + max(high - keys[-1], 0)
    step = _progress_steps(total, progress, should_cancel)

    for first, second in gaps:
        for index, (mask, score) in _fill_between(predictor, first, result[first], second, result[second],
                                                  step).items():
            result[index] = mask
            if scores is not None:
                scores[index] = score

    for side, start, stop, direction in (("below", keys[0], low - 1, -1), ("above", keys[-1], high + 1, 1)):
        previous = result[start]
        reached, reason = start, "end of the range"
        for index in range(start + direction, stop, direction):
            grown = grow_into(predictor, index, previous, band)
            step()
            reason = _stop_reason(grown, previous, stop_iou, min_area_ratio)
            if reason:
                break
            result[index] = grown.mask
            if scores is not None:
                scores[index] = grown.score
            reached, reason, previous = index, "end of the range", grown.mask
        if report is not None:
            report[side] = {"reached": int(reached), "stop": reason}
    if progress:
        progress(total, total)
    return result


def propagate_objects(predictor: VolumePredictor, key_masks: dict[int, np.ndarray], *,
                      stop_iou: float = DEFAULT_STOP_IOU, min_area_ratio: float = DEFAULT_MIN_AREA_RATIO,
                      slice_range: tuple[int, int] | None = None,
                      progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                      report: dict | None = None, scores: dict[int, float] | None = None) -> np.ndarray:
    """``propagate_mask``, with each separate piece of a single key slice's mask grown on its own.

    A label drawn on both sides of the brain (left and right hippocampus) is two objects: grown together, the
    box around both covers the brain between them. With one key slice, each connected piece that a user would
    prompt (``user_objects_on_slice``) is grown by ``propagate_mask`` and the results are joined; specks stay on
    the key slice. With several key slices the pieces cannot be told apart between keys, so the
    mask is grown as one object. ``report`` gets, per side, the farthest slice any piece reached (and why that
    piece stopped) plus each piece's own report under "objects"; ``scores`` gets each slice's weakest
    predicted IoU over the pieces.
    """
    keys = _key_slices(predictor, key_masks)
    pieces = []
    if len(keys) == 1:
        key_mask = np.asarray(key_masks[keys[0]], dtype=np.uint8)
        pieces = [piece for _, piece in user_objects_on_slice(key_mask, [1])]
    options = dict(stop_iou=stop_iou, min_area_ratio=min_area_ratio, slice_range=slice_range,
                   should_cancel=should_cancel)
    if len(pieces) <= 1:
        return propagate_mask(predictor, key_masks, progress=progress, report=report, scores=scores, **options)

    result = np.zeros((predictor.volume.num_slices, *predictor.slice_shape), dtype=bool)
    result[keys[0]] = key_masks[keys[0]]
    piece_reports = []
    for number, piece in enumerate(pieces):
        def piece_progress(done, total, number=number):
            if progress:
                progress(number * total + done, len(pieces) * total)

        piece_report, piece_scores = {}, {}
        result |= propagate_mask(predictor, {keys[0]: piece}, progress=piece_progress, report=piece_report,
                                 scores=piece_scores, **options)
        piece_reports.append(piece_report)
        if scores is not None:
            for index, score in piece_scores.items():
                scores[index] = min(score, scores.get(index, score))
    if report is not None:
        for side, farthest in (("below", min), ("above", max)):
            report[side] = dict(farthest((entry[side] for entry in piece_reports), key=lambda entry: entry["reached"]))
        report["objects"] = piece_reports
    return result
