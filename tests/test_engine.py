"""The predictor, embedding cache, propagation and automatic segmentation on the sample CT, with real forward passes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam_ft.engine.automatic import AutomaticSettings, match_instances_to_classes, segment_volume
from napari_sam_ft.engine.cache import EmbeddingCache
from napari_sam_ft.engine.predictor import Cancelled, VolumePredictor
from napari_sam_ft.engine.prompts import box_from_mask, interior_point
from napari_sam_ft.engine.propagate import propagate_mask
from napari_sam_ft.metrics import dice

SPLEEN, KIDNEY_RIGHT, LIVER = 1, 2, 5
SLICE = 15


def test_a_second_click_on_the_same_slice_runs_no_encoder_pass(litemedsam, ct_sample):
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache())
    reference = ct_sample.labels.array[SLICE] == SPLEEN
    predictor.set_slice(SLICE)
    assert predictor.encoder_calls == 1
    first = predictor.predict(point_coords=interior_point(reference)[None], point_labels=[1], multimask_output=True)
    second = predictor.predict(box=box_from_mask(reference))
    predictor.predict(box=box_from_mask(reference), mask_input=second.low_res_logits)
    assert predictor.encoder_calls == 1
    assert first.mask.shape == reference.shape
    assert dice(second.mask, reference) > 0.9
    assert 0.0 < second.score <= 1.5


def test_box_prompts_beat_the_naive_loop_on_the_reference_organs(ct_predictor, ct_sample):
    labels = ct_sample.labels.array
    floors = {SPLEEN: 0.93, LIVER: 0.86, KIDNEY_RIGHT: 0.86}
    for class_id, floor in floors.items():
        slices = np.flatnonzero((labels == class_id).any(axis=(1, 2)))
        prediction = np.zeros(labels.shape, bool)
        for index in slices:
            masks, scores = ct_predictor.predict_boxes(box_from_mask(labels[index] == class_id)[None], index)
            prediction[index] = masks[0]
        assert dice(prediction, labels == class_id) >= floor, class_id


def test_several_objects_decode_in_one_batch_and_match_single_prompts(ct_predictor, ct_sample):
    reference = ct_sample.labels.array[SLICE]
    boxes = np.stack([box_from_mask(reference == class_id) for class_id in (SPLEEN, LIVER)])
    masks, scores = ct_predictor.predict_boxes(boxes, SLICE)
    assert masks.shape == (2, *reference.shape) and scores.shape == (2,)
    single = ct_predictor.predict(box=boxes[1], slice_index=SLICE).mask
    assert dice(masks[1], single) > 0.99


def test_the_cache_is_keyed_by_window_and_bounded_in_memory(litemedsam, ct_sample):
    cache = EmbeddingCache(memory_budget_bytes=3 * 256 * 64 * 64 * 2)
    soft = VolumePredictor(litemedsam, ct_sample.image, window="soft_tissue", cache=cache)
    bone = VolumePredictor(litemedsam, ct_sample.image, window="bone", cache=cache)
    assert soft.cache_key != bone.cache_key
    soft.encode_slices([0, 1, 2, 3])
    assert len(cache) == 3 and cache.memory_bytes <= cache.memory_budget_bytes
    assert not bone.is_encoded(3)


def test_precomputing_reports_progress_and_can_be_cancelled(litemedsam, ct_sample):
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache(), batch_size=2)
    seen = []
    with pytest.raises(Cancelled):
        predictor.encode_volume(progress=lambda done, total: seen.append((done, total)),
                                should_cancel=lambda: len(seen) > 2)
    assert seen[0] == (0, 30) and seen[-1] == (4, 30)
    assert predictor.is_encoded(3) and not predictor.is_encoded(4)


def test_out_of_range_slices_are_named():
    from napari_sam_ft.volume import Volume

    predictor = VolumePredictor.__new__(VolumePredictor)
    predictor.volume = Volume(np.zeros((4, 5, 5), np.float32))
    with pytest.raises(IndexError, match="slice index 7 is out of range 0..3"):
        predictor._check_slice(7)


def test_propagation_from_one_slice_reaches_most_of_what_boxes_on_every_slice_give(ct_predictor, ct_sample):
    labels = ct_sample.labels.array
    for class_id in (SPLEEN, LIVER, KIDNEY_RIGHT):
        reference = labels == class_id
        slices = np.flatnonzero(reference.any(axis=(1, 2)))
        per_slice_boxes = np.zeros(reference.shape, bool)
        for index in slices:
            per_slice_boxes[index] = ct_predictor.predict(box=box_from_mask(reference[index]), slice_index=index).mask
        middle = int(slices[len(slices) // 2])
        start = ct_predictor.predict(box=box_from_mask(reference[middle]), slice_index=middle).mask
        propagated = propagate_mask(ct_predictor, {middle: start})
        assert propagated.any(axis=(1, 2)).sum() >= 0.8 * len(slices)
        assert dice(propagated, reference) >= 0.8 * dice(per_slice_boxes, reference), class_id


def test_propagation_fills_between_key_slices_and_needs_a_mask(ct_predictor, ct_sample):
    reference = ct_sample.labels.array == LIVER
    keys = {10: reference[10], 20: reference[20]}
    propagated = propagate_mask(ct_predictor, keys, slice_range=(10, 20))
    assert propagated[11:20].any(axis=(1, 2)).all()
    assert not propagated[:10].any() and not propagated[21:].any()
    assert dice(propagated[10:21], reference[10:21]) > 0.85
    with pytest.raises(ValueError, match="at least one slice"):
        propagate_mask(ct_predictor, {5: np.zeros(reference.shape[1:], bool)})


def test_automatic_segmentation_finds_the_big_organs_and_skips_air(ct_predictor, ct_sample):
    slices = range(12, 18)
    instances = segment_volume(ct_predictor, slice_indices=slices)
    assert instances.dtype == np.int32 and instances[:12].max() == 0
    assert 3 <= len(np.unique(instances)) - 1 <= 60
    matched = match_instances_to_classes(instances, ct_sample.labels.array)
    reference = ct_sample.labels.array[12:18]
    assert dice(matched[12:18] == LIVER, reference == LIVER) > 0.6
    found = [class_id for class_id in (SPLEEN, KIDNEY_RIGHT, 3, 6)
             if dice(matched[12:18] == class_id, reference == class_id) > 0.5]
    assert len(found) >= 2, found


def test_automatic_segmentation_of_air_is_empty_and_costs_no_encoding(litemedsam, ct_sample):
    air = ct_sample.image.with_array(np.full(ct_sample.image.shape, -1000, np.int16))
    predictor = VolumePredictor(litemedsam, air, window="soft_tissue", cache=EmbeddingCache())
    assert segment_volume(predictor, slice_indices=range(3)).max() == 0
    assert predictor.encoder_calls == 0


def test_automatic_segmentation_can_be_cancelled(ct_predictor):
    with pytest.raises(Cancelled):
        segment_volume(ct_predictor, slice_indices=range(12, 18), should_cancel=lambda: True,
                       settings=AutomaticSettings())
