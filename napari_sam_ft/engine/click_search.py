"""Clicks for box-trained models (LiteMedSAM, MedSAM): a click becomes the box that segments what it is on.

LiteMedSAM and MedSAM were trained on boxes only; a point prompt gives them a few stray pixels. So a
positive click searches boxes instead: square and oblong boxes of growing size centred on the click are
decoded in one batched pass; among the masks that hold the click and lie inside their box (not cut by its
edges), the smallest box whose mask the next larger box repeats (the structure's size is reached) names
the structure. The box fitted to that mask, with a margin, is then decoded again until the mask stops
growing, as tight boxes are what the models were trained on.

Several clicks combine at the mask level: every positive click adds the structure it lies on, and each
negative click removes the structure it lies on (searched so that it holds no positive click). A box
with clicks starts from the box's mask. Point-trained models (SAM, MobileSAM) do not come here: they
take points natively (``uses_click_search``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .predictor import Prediction, VolumePredictor
from .prompts import box_from_mask
from .window_choice import predictor_for_box


@dataclass(frozen=True)
class ClickSearchSettings:
    smallest_box: float = 6.0  # pixels: the side of the smallest square searched
    largest_box_fraction: float = 0.9  # of the slice's longest side
    box_sizes: int = 12  # sides between the two, geometrically spaced
    aspect_ratios: tuple[float, ...] = (1.0, 0.6, 1.67)  # width / height
    edge_gap: int = 1  # pixels between a mask and its box's edges for the box to hold the whole object
    # A structure is found when the next larger box (same shape) gives nearly the same mask (this IoU).
    scale_stability: float = 0.75
    # The refitted box: the mask's box grown by this fraction of its size plus some pixels, refitted until the
    # mask changes less than ``refit_converged_iou`` (at most ``refit_rounds`` times): a click deep in a large
    # organ first finds part of it, and each round shows the model more of the organ.
    refit_margin_fraction: float = 0.15
    refit_margin_pixels: float = 1.0
    refit_rounds: int = 4
    refit_converged_iou: float = 0.9


DEFAULT_SETTINGS = ClickSearchSettings()


def uses_click_search(predictor: VolumePredictor) -> bool:
    """Whether clicks go through the box search: the model was trained on boxes (its ModelSpec says so)."""
    return predictor.model.spec.automatic_prompt == "box"


def candidate_boxes(click_xy, slice_shape: tuple[int, int], settings: ClickSearchSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """(K, 4) xyxy boxes centred on the click, smallest first, clipped to the slice."""
    height, width = slice_shape
    x, y = float(click_xy[0]), float(click_xy[1])
    largest = max(settings.largest_box_fraction * max(height, width), settings.smallest_box)
    boxes = []
    for side in np.geomspace(settings.smallest_box, largest, settings.box_sizes):
        for aspect in settings.aspect_ratios:
            half_width, half_height = side * np.sqrt(aspect) / 2, side / np.sqrt(aspect) / 2
            boxes.append((max(x - half_width, 0.0), max(y - half_height, 0.0), min(x + half_width, width),
                          min(y + half_height, height)))
    return np.asarray(boxes, np.float32)


def _holds_whole_mask(masks: torch.Tensor, boxes: np.ndarray, slice_shape: tuple[int, int], gap: int) -> torch.Tensor:
    """(K,) True where a mask keeps ``gap`` pixels from every edge of its box that is not the slice's border."""
    height, width = slice_shape
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # (K, H), (K, W)
    row_index, col_index = torch.arange(height), torch.arange(width)
    big = 10 ** 9
    top = torch.where(rows, row_index, big).amin(dim=1)
    bottom = torch.where(rows, row_index, -1).amax(dim=1) + 1
    left = torch.where(cols, col_index, big).amin(dim=1)
    right = torch.where(cols, col_index, -1).amax(dim=1) + 1
    box = torch.from_numpy(boxes)
    x0, y0, x1, y1 = box.unbind(dim=1)
    ok_left = (x0 <= 0) | (left >= torch.floor(x0) + gap)
    ok_top = (y0 <= 0) | (top >= torch.floor(y0) + gap)
    ok_right = (x1 >= width) | (right <= torch.ceil(x1) - gap)
    ok_bottom = (y1 >= height) | (bottom <= torch.ceil(y1) - gap)
    return ok_left & ok_top & ok_right & ok_bottom & rows.any(dim=1)


def _scale_stable(masks: torch.Tensor, candidates: torch.Tensor, step: int, threshold: float) -> torch.Tensor:
    """(len(candidates),) True where the next larger box of the same shape gives nearly the same mask."""
    larger = (candidates + step).clamp(max=len(masks) - 1)
    first, second = masks[candidates].flatten(1), masks[larger].flatten(1)
    intersection = (first & second).sum(1).float()
    union = (first | second).sum(1).float().clamp(min=1.0)
    return (intersection / union >= threshold) & (candidates + step < len(masks))


def _pixel(point_xy, slice_shape: tuple[int, int]) -> tuple[int, int]:
    height, width = slice_shape
    return (min(max(int(np.floor(point_xy[1])), 0), height - 1), min(max(int(np.floor(point_xy[0])), 0), width - 1))


def search_click(predictor: VolumePredictor, slice_index: int, click_xy, avoid_xy=(),
                 settings: ClickSearchSettings = DEFAULT_SETTINGS) -> Prediction | None:
    """The structure under one click: (H, W) mask, predicted IoU and low-res logits, or None if none holds it.

    Candidates whose mask holds any point of ``avoid_xy`` (the other sign's clicks) are passed over.
    """
    shape = predictor.slice_shape
    boxes = candidate_boxes(click_xy, shape, settings)
    logits, scores, _ = predictor.decode(slice_index, None, None, boxes, None, multimask_output=False)
    masks = logits[:, 0] > 0
    row, col = _pixel(click_xy, shape)
    usable = masks[:, row, col].clone()
    for point in avoid_xy:
        avoid_row, avoid_col = _pixel(point, shape)
        usable &= ~masks[:, avoid_row, avoid_col]
    whole = usable & _holds_whole_mask(masks, boxes, shape, settings.edge_gap)
    chosen = torch.nonzero(whole).flatten()
    if len(chosen) == 0:  # no box holds the whole structure: the most confident mask that holds the click
        chosen = torch.nonzero(usable).flatten()
        if len(chosen) == 0:
            return None
        best = int(chosen[torch.argmax(scores[chosen, 0])])
    else:
        stable = chosen[_scale_stable(masks, chosen, len(settings.aspect_ratios), settings.scale_stability)]
        if len(stable):
            chosen = stable
        smallest_side = int(chosen[0]) // len(settings.aspect_ratios)
        same_size = chosen[chosen // len(settings.aspect_ratios) == smallest_side]
        best = int(same_size[torch.argmax(scores[same_size, 0])])
    return _refit(predictor, slice_index, masks[best].numpy(), float(scores[best, 0]), (row, col), avoid_xy, settings)


def _refit(predictor: VolumePredictor, slice_index: int, mask: np.ndarray, score: float, click_pixel,
           avoid_xy, settings: ClickSearchSettings) -> Prediction:
    """Grow the found mask to the whole structure: decode the box fitted to the mask (plus a margin, so a part
    of an organ shows the model more of it) until the mask stops changing, still holds the click and holds
    none of ``avoid_xy``."""
    shape = predictor.slice_shape
    current = Prediction(mask, score, None)
    for _ in range(settings.refit_rounds):
        rows, cols = np.flatnonzero(current.mask.any(axis=1)), np.flatnonzero(current.mask.any(axis=0))
        margin = settings.refit_margin_pixels + settings.refit_margin_fraction * max(rows[-1] - rows[0],
                                                                                    cols[-1] - cols[0])
        refitted = predictor.predict(box=box_from_mask(current.mask, margin=margin), slice_index=slice_index)
        if not refitted.mask[click_pixel] or any(refitted.mask[_pixel(point, shape)] for point in avoid_xy):
            break
        overlap = (refitted.mask & current.mask).sum() / max((refitted.mask | current.mask).sum(), 1)
        current = refitted
        if overlap >= settings.refit_converged_iou:
            break
    if current.low_res_logits is None:
        current = Prediction(mask, score, predictor.predict(box=box_from_mask(mask), slice_index=slice_index).low_res_logits)
    return current


def _component_holding(mask: np.ndarray, pixels) -> np.ndarray:
    """The connected parts of ``mask`` that hold one of ``pixels`` (all of it if none does)."""
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    keep = {int(components[pixel]) for pixel in pixels} - {0}
    return np.isin(components, sorted(keep)) if keep else mask


def predict_clicks(predictor: VolumePredictor, slice_index: int, points_xy: np.ndarray | None,
                   point_labels: np.ndarray | None, box: np.ndarray | None = None,
                   settings: ClickSearchSettings = DEFAULT_SETTINGS) -> Prediction:
    """One object from clicks (and optionally a box) for a box-trained model -> a ``Prediction``.

    The box (if any) gives the first mask; each positive click outside the mask so far adds the structure
    it lies on; each negative click inside it removes the structure it lies on, and what is left keeps
    only the parts that hold a positive click (or lie in the box).
    """
    shape = predictor.slice_shape
    points = np.zeros((0, 2), np.float32) if points_xy is None else np.asarray(points_xy, np.float32).reshape(-1, 2)
    labels = np.ones(len(points), np.int64) if point_labels is None else np.asarray(point_labels).reshape(-1)
    positives, negatives = points[labels == 1], points[labels == 0]
    mask = np.zeros(shape, bool)
    score, low_res = 0.0, None
    if box is not None:
        first = predictor.predict(box=box, slice_index=slice_index)
        mask, score, low_res = first.mask.copy(), first.score, first.low_res_logits
    for click in positives:
        if mask[_pixel(click, shape)]:
            continue
        found = search_click(predictor, slice_index, click, settings=settings)
        if found is None:
            continue
        if not mask.any():
            score, low_res = found.score, found.low_res_logits
        mask |= found.mask
    removed_any = False
    for click in negatives:  # a negative click outside the mask changes nothing
        if not mask[_pixel(click, shape)]:
            continue
        found = search_click(predictor, slice_index, click, avoid_xy=positives, settings=settings)
        removed = found.mask if found is not None else np.zeros(shape, bool)
        removed[_pixel(click, shape)] = True
        mask &= ~removed
        removed_any = True
    if removed_any and mask.any():  # what a removal cut off from every positive click goes too
        anchors = [_pixel(click, shape) for click in positives]
        if box is not None:
            inside = np.zeros(shape, bool)
            x0, y0, x1, y1 = (int(round(value)) for value in box)
            inside[y0:y1, x0:x1] = True
            anchors += [tuple(pixel) for pixel in np.argwhere(mask & inside)[:1]]
        mask = _component_holding(mask, anchors)
    if low_res is None:
        low_res = torch.full((1, *predictor.model.sam.prompt_encoder.mask_input_size), -20.0)
    return Prediction(mask, score, low_res)


def predict_object(predictor: VolumePredictor, slice_index: int, points_xy: np.ndarray | None = None,
                   point_labels: np.ndarray | None = None, box: np.ndarray | None = None) -> Prediction:
    """One object on one slice from a user's clicks and/or box: the one way the CLI, evaluate and the widget segment.

    The window is chosen per prompt where the predictor's window is automatic (``engine.window_choice``):
    from under the box, or, for clicks alone, from under the box fitted to what the clicks found.
    Box-trained models turn clicks into boxes (``predict_clicks``); point-trained models take them as they
    are, a single click asking for SAM's three masks and keeping the best.
    """
    has_points = points_xy is not None and len(points_xy) > 0
    if not has_points and box is None:
        raise ValueError("a prompt needs a box or at least one click")
    chosen = predictor_for_box(predictor, slice_index, box)
    if not has_points:
        return chosen.predict(box=box, slice_index=slice_index)
    if not uses_click_search(predictor):
        single_click = box is None and len(points_xy) == 1
        return chosen.predict(point_coords=points_xy, point_labels=point_labels, box=box,
                              multimask_output=single_click, slice_index=slice_index)
    prediction = predict_clicks(chosen, slice_index, points_xy, point_labels, box)
    if box is None and prediction.mask.any():
        refitted = predictor_for_box(predictor, slice_index, box_from_mask(prediction.mask))
        if refitted is not chosen:  # what the click found lies in another window's range: search there
            prediction = predict_clicks(refitted, slice_index, points_xy, point_labels, box)
    return prediction
