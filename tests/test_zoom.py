"""Small objects are decoded on a zoomed crop (engine.zoom): the crop's geometry, and the gain on a real 1 mm T1
(../shared/cases mni152) checked against the reference labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam_ft.engine.prompts import box_from_mask, user_objects_on_slice
from napari_sam_ft.engine.zoom import ZoomSettings, cropped_predictor, decode_boxes, predict_box, zoom_crop
from napari_sam_ft.metrics import dice

AMYGDALA, PALLIDUM, HIPPOCAMPUS = 1, 2, 3


def test_the_crop_is_a_square_around_the_boxes_inside_the_slice():
    settings = ZoomSettings(context=2.0, min_side=32, max_fraction=0.6)
    crop = zoom_crop(np.array([100, 50, 120, 60], np.float32), (217, 181), settings)
    assert crop.shape == (40, 40)
    assert crop.left <= 100 and crop.right >= 120 and crop.top <= 50 and crop.bottom >= 60
    # At the slice's edge the square shifts inside instead of shrinking.
    edge = zoom_crop(np.array([0, 0, 6, 4], np.float32), (217, 181), settings)
    assert (edge.top, edge.left, edge.shape) == (0, 0, (32, 32))
    # Two boxes of one object: one crop holds both.
    both = zoom_crop(np.array([[10, 10, 20, 20], [8, 8, 22, 22]], np.float32), (217, 181), settings)
    assert both.left <= 8 and both.right >= 22
    # A box that is not small: no crop, the whole slice is decoded.
    assert zoom_crop(np.array([20, 20, 90, 90], np.float32), (217, 181), settings) is None
    values = torch.ones(1, 1, *crop.shape)
    pasted = crop.paste(values, (217, 181), fill=-20.0)
    assert pasted.shape == (1, 1, 217, 181) and float(pasted.sum()) == pytest.approx(40 * 40 - 20.0 * (217 * 181 - 1600))
    assert np.allclose(crop.boxes_into(np.array([100, 50, 120, 60], np.float32)),
                       [[100 - crop.left, 50 - crop.top, 120 - crop.left, 60 - crop.top]])


def _objects(labels: np.ndarray, class_id: int, count: int):
    """(slice, reference mask) of the class's objects on ``count`` slices spread through its extent."""
    indices = np.flatnonzero((labels == class_id).any(axis=(1, 2)))
    chosen = indices[np.linspace(len(indices) // 5, len(indices) - 1 - len(indices) // 5, count).round().astype(int)]
    return [(int(index), mask) for index in chosen for _, mask in user_objects_on_slice(labels[index], [class_id])]


def test_small_brain_structures_segment_far_better_zoomed_than_on_the_whole_slice(mni152):
    predictor, labels = mni152
    whole, zoomed, references = [], [], []
    for class_id in (AMYGDALA, PALLIDUM, HIPPOCAMPUS):
        for index, reference in _objects(labels, class_id, 3):
            box = box_from_mask(reference)
            logits, _, _ = predictor.decode(index, None, None, box[None], None, False)
            whole.append((logits[0, 0] > 0).numpy())
            zoomed.append(predict_box(predictor, index, box).mask)
            references.append(reference)
    whole_dice = float(np.mean([dice(mask, reference) for mask, reference in zip(whole, references)]))
    zoomed_dice = float(np.mean([dice(mask, reference) for mask, reference in zip(zoomed, references)]))
    assert zoomed_dice >= 0.65 and zoomed_dice > whole_dice + 0.15, (whole_dice, zoomed_dice)
    # The zoomed mask lies where the structure is, on the slice's own grid: it overlaps the reference and stays
    # near its box (a shifted paste would miss both).
    for mask, reference in zip(zoomed, references):
        near = np.zeros_like(reference)
        x0, y0, x1, y1 = (int(value) for value in box_from_mask(reference))
        near[max(y0 - 4, 0):y1 + 4, max(x0 - 4, 0):x1 + 4] = True
        assert (mask & reference).any() and not (mask & ~near).any()


def test_the_crop_is_encoded_once_and_well_filled_boxes_are_not_zoomed(mni152):
    predictor, labels = mni152
    index, reference = _objects(labels, HIPPOCAMPUS, 1)[0]
    box = box_from_mask(reference)
    logits, _, _ = predictor.decode(index, None, None, box[None], None, False)
    assert (logits[0, 0] > 0).sum() < 0.5 * (box[2] - box[0]) * (box[3] - box[1])  # underfilled: it will zoom
    first = predict_box(predictor, index, box)
    crop = zoom_crop(box[None], predictor.slice_shape)
    zoomed = cropped_predictor(predictor, crop)
    assert zoomed.cache_key != predictor.cache_key  # the crop's embedding is its own cache entry
    assert zoomed.is_encoded(index)
    entries = len(predictor.cache)
    again = predict_box(predictor, index, box)
    assert np.array_equal(again.mask, first.mask) and len(predictor.cache) == entries  # no new encoder pass
    # The whole brain's box: the mask fills it, nothing is zoomed, the result is the whole-slice decode.
    brain = box_from_mask(np.asarray(predictor.volume.array[index]) > np.percentile(predictor.volume.array[index], 60))
    masks, _, low_res = decode_boxes(predictor, index, brain)
    logits, _, whole_low_res = predictor.decode(index, None, None, brain[None], None, False)
    assert np.array_equal(masks[0], (logits[0, 0] > 0).numpy()) and torch.equal(low_res, whole_low_res)
