"""Objects, not classes: a simulated user prompts each separate piece of a label (the left and the right
hippocampus of ../shared/cases mni152 are one AAL label), and propagation grows each piece on its own."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_sam_ft.engine.click_search import predict_object
from napari_sam_ft.engine.prompts import box_from_mask, objects_on_slice, user_objects_on_slice
from napari_sam_ft.metrics import dice

HIPPOCAMPUS = 3


def test_objects_are_the_connected_pieces_of_each_class_without_specks():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:15] = 2  # left piece, 100 px
    labels[5:15, 25:33] = 2  # right piece, 80 px
    labels[30, 30] = 2  # a one-pixel speck
    labels[20:23, 5:8] = 2  # 9 px: below a tenth of the largest piece
    labels[30:35, 5:10] = 4
    every_piece = objects_on_slice(labels, [2, 4])
    assert [class_id for class_id, _ in every_piece] == [2, 2, 2, 2, 4]
    prompted = user_objects_on_slice(labels, [2, 4])
    assert [(class_id, int(mask.sum())) for class_id, mask in prompted] == [(2, 100), (2, 80), (4, 25)]
    assert not user_objects_on_slice(labels, [7])


def _two_sided_slice(labels: np.ndarray) -> int:
    """The slice where the hippocampus is largest among those where it is two similar pieces (left, right)."""
    best, best_area = None, 0
    for index in np.flatnonzero((labels == HIPPOCAMPUS).any(axis=(1, 2))):
        pieces = user_objects_on_slice(labels[index], [HIPPOCAMPUS])
        area = int((labels[index] == HIPPOCAMPUS).sum())
        if len(pieces) == 2 and area > best_area:
            best, best_area = int(index), area
    assert best is not None, "no slice holds a left and a right hippocampus"
    return best


def test_evaluate_boxes_each_hippocampus_apart_which_beats_one_box_around_both(mni152):
    from napari_sam_ft.evaluate import segment_with_reference_prompts

    predictor, labels = mni152
    index = _two_sided_slice(labels)
    reference = labels[index] == HIPPOCAMPUS
    per_object = segment_with_reference_prompts(predictor, labels, "box", [index], [HIPPOCAMPUS])[HIPPOCAMPUS][index]
    one_box = predict_object(predictor, index, None, None, box_from_mask(reference)).mask
    left_right = [mask for _, mask in user_objects_on_slice(labels[index], [HIPPOCAMPUS])]
    assert all((per_object & piece).any() for piece in left_right)  # both sides are found
    assert dice(per_object, reference) >= 0.5, dice(per_object, reference)
    assert dice(per_object, reference) > dice(one_box, reference) + 0.1, (dice(per_object, reference),
                                                                          dice(one_box, reference))


def test_propagation_grows_the_left_and_the_right_hippocampus_each_on_its_own(mni152):
    from napari_sam_ft.engine.propagate import propagate_objects

    predictor, labels = mni152
    key = _two_sided_slice(labels)
    key_mask = np.zeros(predictor.slice_shape, bool)
    for _, piece in user_objects_on_slice(labels[key], [HIPPOCAMPUS]):
        key_mask |= predict_object(predictor, key, None, None, box_from_mask(piece)).mask
    report, scores = {}, {}
    grown = propagate_objects(predictor, {key: key_mask}, slice_range=(key - 3, key + 3), report=report,
                              scores=scores)
    assert len(report["objects"]) == 2
    assert report["below"]["reached"] == min(entry["below"]["reached"] for entry in report["objects"])
    assert report["above"]["reached"] == max(entry["above"]["reached"] for entry in report["objects"])
    assert np.array_equal(grown[key], key_mask)
    neighbour = key + 1 if report["above"]["reached"] > key else key - 1
    assert neighbour in scores
    for _, piece in user_objects_on_slice(labels[key], [HIPPOCAMPUS]):  # both sides reach the neighbour
        assert (grown[neighbour] & ndimage.binary_dilation(piece, iterations=3)).any()
    reference = labels[neighbour] == HIPPOCAMPUS
    assert dice(grown[neighbour], reference) >= 0.3, dice(grown[neighbour], reference)
