"""Clicks for box-trained models (LiteMedSAM, MedSAM): a click becomes the box that segments what it is on.

LiteMedSAM and MedSAM were trained on boxes only; a point prompt gives them a few stray pixels. So a
positive click searches boxes instead. Candidate boxes come from three places, all before any decoder pass:

- the image: the connected region around the click whose intensity stays within a tolerance of the
  click's (a few tolerances, each also cut at narrow necks, so both lungs joined by the trachea split);
  lungs, bone and lesions in air come out of this whole;
- the image embedding the encoder cached: the connected region whose feature vectors are similar to the
  clicked one (a few cosine thresholds);
- squares of a few sizes centred on the click (low-contrast structures, as in MR).

The boxes are decoded in one batched pass (per CT window). Each mask is cut to its connected part that holds
the click, and scored by the decoder's predicted IoU, how central the click lies in it (a user clicks inside
what they mean, not at its edge; a mask that merely touches the click is something else) and, for the most
promising few, how stable it is when its own box (plus a margin) is decoded again. The best is returned in
that refitted form, as tight boxes are what the models were trained on. Measured on ../shared/cases and the
samples (``napari-sam-ft bench cases``); ``ClickSearchSettings`` holds every constant.

Several clicks combine at the mask level: every positive click adds the structure it lies on, and each
negative click removes the structure it lies on (searched so that it holds no positive click). A box
with clicks starts from the box's mask. Point-trained models (SAM, MobileSAM) do not come here: they
take points natively (``uses_click_search``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .predictor import Prediction, VolumePredictor
from .prompts import box_from_mask
from .window_choice import predictor_for_box
from .zoom import predict_box


@dataclass(frozen=True)
class ClickSearchSettings:
    # Intensity regions: tolerances as fractions of the slice's 1-99 % intensity range (smoothed slice).
    intensity_tolerances: tuple[float, ...] = (0.01, 0.02, 0.04, 0.07, 0.12, 0.2)
    smoothing_sigma: float = 1.0  # pixels
    neck_radius_fraction: float = 0.02  # of the slice's longest side: necks narrower than twice this are cut
    # Embedding regions: cosine similarity to the clicked feature vector.
    similarity_thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8)
    # Centred squares: sides as fractions of the slice's longest side.
    centred_box_fractions: tuple[float, ...] = (0.015, 0.03, 0.045, 0.06, 0.09, 0.12, 0.18, 0.25, 0.4)
    duplicate_box_iou: float = 0.9  # boxes this alike are decoded once
    # Score = predicted IoU x centrality ** centrality_power x stability ** stability_power, where centrality is
    # the click's distance to the mask's border over the mask's largest such distance, and stability the IoU of
    # the mask with the mask of its refitted box. Masks whose centrality is below ``minimum_centrality`` are
    # passed over while any other holds the click.
    centrality_power: float = 0.5
    stability_power: float = 2.0
    minimum_centrality: float = 0.5
    refitted_candidates: int = 6  # the best this many by IoU x centrality are refitted to measure stability
    # Of the masks scoring within this share of the best, the smallest is taken: a click names the most specific
    # structure it lies in (the aorta, not the body around it), as SAM's "part" before its "whole". A part is at
    # most this share of the best mask's area; masks closer in size are the same structure boxed a little
    # differently, and the best of them is kept (the sample's spleen: a 212 px mask scoring 0.796 beat the
    # best, 368 px scoring 0.829, and lost a fifth of the spleen).
    specificity: float = 0.95
    part_area_fraction: float = 0.5
    refit_margin_fraction: float = 0.1  # the refitted box: the mask's box grown by this share of its size
    refit_margin_pixels: float = 1.0  # plus this


DEFAULT_SETTINGS = ClickSearchSettings()


def uses_click_search(predictor: VolumePredictor) -> bool:
    """Whether clicks go through the box search: the model was trained on boxes (its ModelSpec says so)."""
    return predictor.model.spec.automatic_prompt == "box"


def candidate_boxes(click_xy, slice_shape: tuple[int, int], settings: ClickSearchSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """(K, 4) xyxy squares centred on the click, smallest first, clipped to the slice."""
    height, width = slice_shape
    x, y = float(click_xy[0]), float(click_xy[1])
    boxes = []
    for fraction in settings.centred_box_fractions:
        half = max(fraction * max(height, width), 2.0) / 2
        boxes.append((max(x - half, 0.0), max(y - half, 0.0), min(x + half, width), min(y + half, height)))
    return np.asarray(boxes, np.float32)


def _pixel(point_xy, slice_shape: tuple[int, int]) -> tuple[int, int]:
    height, width = slice_shape
    return (min(max(int(np.floor(point_xy[1])), 0), height - 1), min(max(int(np.floor(point_xy[0])), 0), width - 1))


def _part_holding(mask: np.ndarray, pixel) -> np.ndarray | None:
    """The connected part of ``mask`` that holds ``pixel``, or None if the pixel is outside it."""
    if not mask[pixel]:
        return None
    components, _ = ndimage.label(mask)
    return components == components[pixel]


def _without_necks(region: np.ndarray, pixel, radius: int) -> np.ndarray | None:
    """``region`` cut at necks narrower than 2 x ``radius``: the eroded part nearest the pixel, grown back inside it."""
    core = ndimage.binary_erosion(region, iterations=radius)
    components, count = ndimage.label(core)
    if count == 0:
        return None
    label = components[pixel]
    if label == 0:  # the click lies in a neck or near the border: the nearest part
        _, (rows, cols) = ndimage.distance_transform_edt(components == 0, return_indices=True)
        label = components[rows[pixel], cols[pixel]]
    return ndimage.binary_dilation(components == label, iterations=radius) & region


def _normalised_slice(predictor: VolumePredictor, slice_index: int, settings: ClickSearchSettings) -> np.ndarray:
    """The raw slice (its brightest channel) scaled by its 1-99 % range and smoothed: (H, W) float32."""
    raw = np.asarray(predictor.volume.array[slice_index], np.float32)
    if raw.ndim == 3:
        raw = raw.max(axis=-1)
    low, high = np.percentile(raw, [1, 99])
    return ndimage.gaussian_filter((raw - low) / max(float(high - low), 1e-6), settings.smoothing_sigma)


def intensity_regions(image: np.ndarray, pixel, settings: ClickSearchSettings = DEFAULT_SETTINGS) -> list[np.ndarray]:
    """Connected regions around ``pixel`` of a normalised slice within each intensity tolerance of the
    click's (its 3 x 3 median), each also cut at narrow necks."""
    row, col = pixel
    seed = float(np.median(image[max(row - 1, 0):row + 2, max(col - 1, 0):col + 2]))
    radius = max(1, int(round(settings.neck_radius_fraction * max(image.shape))))
    regions = []
    for tolerance in settings.intensity_tolerances:
        region = _part_holding(np.abs(image - seed) <= tolerance, pixel)
        if region is None:
            continue
        regions.append(region)
        cut = _without_necks(region, pixel, radius)
        if cut is not None and cut.sum() < region.sum():
            regions.append(cut)
    return regions


def similarity_regions(predictor: VolumePredictor, slice_index: int, pixel,
                       settings: ClickSearchSettings = DEFAULT_SETTINGS) -> list[np.ndarray]:
    """Connected regions around ``pixel`` whose image-embedding vectors have at least each cosine similarity
    to the clicked one, on the slice grid."""
    height, width = predictor.slice_shape
    preprocessing = predictor.model.preprocessing
    embedding = predictor.embedding(slice_index)[0]  # (C, g, g) over the padded model input
    new_height, new_width = preprocessing.resized_shape(height, width)
    cell = preprocessing.input_size / embedding.shape[-1]
    grid_height, grid_width = int(np.ceil(new_height / cell)), int(np.ceil(new_width / cell))
    features = F.normalize(embedding[:, :grid_height, :grid_width].float(), dim=0)
    row = min(int(pixel[0] * new_height / height / cell), grid_height - 1)
    col = min(int(pixel[1] * new_width / width / cell), grid_width - 1)
    similarity = torch.einsum("chw,c->hw", features, features[:, row, col])[None, None]
    similarity = F.interpolate(similarity, size=(int(grid_height * cell), int(grid_width * cell)), mode="bilinear",
                               align_corners=False)[..., :new_height, :new_width]
    similarity = F.interpolate(similarity.contiguous(), size=(height, width), mode="bilinear",
                               align_corners=False)[0, 0].numpy()
    regions = []
    for threshold in settings.similarity_thresholds:
        region = _part_holding(similarity >= threshold, pixel)
        if region is not None:
            regions.append(region)
    return regions


def _distinct_boxes(boxes: list[np.ndarray], duplicate_iou: float) -> np.ndarray:
    """``boxes`` without near-duplicates (the first of each group kept)."""
    kept: list[np.ndarray] = []
    for box in boxes:
        if all(_box_iou(box, other) < duplicate_iou for other in kept):
            kept.append(box)
    return np.stack(kept).astype(np.float32)


def _box_iou(first: np.ndarray, second: np.ndarray) -> float:
    width = max(0.0, min(first[2], second[2]) - max(first[0], second[0]))
    height = max(0.0, min(first[3], second[3]) - max(first[1], second[1]))
    overlap = width * height
    union = (first[2] - first[0]) * (first[3] - first[1]) + (second[2] - second[0]) * (second[3] - second[1]) - overlap
    return float(overlap / max(union, 1e-6))


def _centrality(mask: np.ndarray, pixel) -> float:
    """The pixel's distance to the mask's border over the largest such distance in the mask (0 outside it)."""
    if not mask[pixel]:
        return 0.0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    crop = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    distance = ndimage.distance_transform_edt(crop)
    return float(distance[pixel[0] - rows[0] + 1, pixel[1] - cols[0] + 1] / distance.max())


def _decode_boxes(predictor: VolumePredictor, slice_index: int, boxes: np.ndarray):
    """Each box decoded in the window chosen for it (one batched pass per window): (K, H, W) bool, (K,) IoU,
    (K, 1, h, w) low-res logits."""
    groups: dict[int, tuple[VolumePredictor, list[int]]] = {}
    for index, box in enumerate(boxes):
        chosen = predictor_for_box(predictor, slice_index, box)
        groups.setdefault(id(chosen), (chosen, []))[1].append(index)
    masks = np.zeros((len(boxes), *predictor.slice_shape), bool)
    scores = np.zeros(len(boxes), np.float32)
    low_res: list[torch.Tensor | None] = [None] * len(boxes)
    for chosen, indices in groups.values():
        logits, iou, low = chosen.decode(slice_index, None, None, boxes[indices], None, multimask_output=False)
        masks[indices] = (logits[:, 0] > 0).cpu().numpy()
        scores[indices] = iou[:, 0].cpu().numpy()
        for position, index in enumerate(indices):
            low_res[index] = low[position]
    return masks, scores, low_res


def _refit_box(mask: np.ndarray, settings: ClickSearchSettings) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0])
    return box_from_mask(mask, margin=settings.refit_margin_pixels + settings.refit_margin_fraction * extent)


def search_click(predictor: VolumePredictor, slice_index: int, click_xy, avoid_xy=(),
                 settings: ClickSearchSettings = DEFAULT_SETTINGS) -> Prediction | None:
    """The structure under one click: (H, W) mask, predicted IoU and low-res logits, or None if none holds it.

    Candidates whose mask holds any point of ``avoid_xy`` (the other sign's clicks) are passed over.
    """
    shape = predictor.slice_shape
    pixel = _pixel(click_xy, shape)
    avoid = [_pixel(point, shape) for point in avoid_xy]
    regions = (intensity_regions(_normalised_slice(predictor, slice_index, settings), pixel, settings)
               + similarity_regions(predictor, slice_index, pixel, settings))
    boxes = _distinct_boxes([box_from_mask(region) for region in regions] + list(candidate_boxes(click_xy, shape, settings)),
                            settings.duplicate_box_iou)
    masks, scores, low_res = _decode_boxes(predictor, slice_index, boxes)
    candidates = []  # (index, the part holding the click, centrality)
    for index, mask in enumerate(masks):
        part = _part_holding(mask, pixel)
        if part is None or any(part[point] for point in avoid):
            continue
        candidates.append((index, part, _centrality(part, pixel)))
    if not candidates:
        return None
    central = [candidate for candidate in candidates if candidate[2] >= settings.minimum_centrality]
    candidates = central or candidates
    candidates.sort(key=lambda candidate: -scores[candidate[0]] * candidate[2] ** settings.centrality_power)
    candidates = candidates[:settings.refitted_candidates]
    refit_boxes = np.stack([_refit_box(part, settings) for _, part, _ in candidates])
    refit_masks, refit_scores, refit_low_res = _decode_boxes(predictor, slice_index, refit_boxes)
    scored = []  # (score, area, prediction)
    for (index, part, centrality), refit_mask, refit_score, refit_low in zip(candidates, refit_masks, refit_scores,
                                                                              refit_low_res):
        refitted = _part_holding(refit_mask, pixel)
        stability = 0.0 if refitted is None else float((refitted & part).sum() / max((refitted | part).sum(), 1))
        value = float(scores[index]) * centrality ** settings.centrality_power * stability ** settings.stability_power
        keeps_click = (refitted is not None and not any(refitted[point] for point in avoid)
                       and _centrality(refitted, pixel) >= 0.8 * centrality)
        prediction = (Prediction(refitted, float(refit_score), refit_low) if keeps_click
                      else Prediction(part, float(scores[index]), low_res[index]))
        scored.append((value, int(part.sum()), prediction))
    return most_specific(scored, settings)


def most_specific(scored: list[tuple[float, int, Prediction]], settings: ClickSearchSettings = DEFAULT_SETTINGS
                  ) -> Prediction:
    """Of (score, area, prediction) candidates, the smallest part scoring nearly as well as the best (at most
    ``part_area_fraction`` of its area, within ``specificity`` of its score), else the best."""
    best_value, best_area, best = max(scored, key=lambda entry: entry[0])
    parts = [entry for entry in scored
             if entry[0] >= settings.specificity * best_value and entry[1] <= settings.part_area_fraction * best_area]
    return min(parts, key=lambda entry: entry[1])[2] if parts else best


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
        first = predict_box(predictor, slice_index, box)
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
    from under the box, or, for clicks alone, from under each candidate box the search decodes. A small box
    is decoded on a zoomed crop (``engine.zoom``).
    Box-trained models turn clicks into boxes (``predict_clicks``); point-trained models take them as they
    are, a single click asking for SAM's three masks and keeping the best.
    """
    has_points = points_xy is not None and len(points_xy) > 0
    if not has_points and box is None:
        raise ValueError("a prompt needs a box or at least one click")
    chosen = predictor_for_box(predictor, slice_index, box)
    if not has_points:
        return predict_box(chosen, slice_index, box)
    if not uses_click_search(predictor):
        single_click = box is None and len(points_xy) == 1
        return chosen.predict(point_coords=points_xy, point_labels=point_labels, box=box,
                              multimask_output=single_click, slice_index=slice_index)
    return predict_clicks(chosen, slice_index, points_xy, point_labels, box)
