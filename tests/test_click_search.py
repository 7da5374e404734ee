"""Clicks with the box-trained LiteMedSAM: real forward passes on the sample CT and on ../shared/cases lung1, ctchest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_sam_ft.engine.click_search import (candidate_boxes, intensity_regions, most_specific, predict_object,
                                              uses_click_search)
from napari_sam_ft.engine.prompts import box_from_mask, interior_point
from napari_sam_ft.metrics import dice

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
SPLEEN, LIVER, STOMACH, AORTA, VERTEBRA_L1 = 1, 5, 6, 52, 31
SLICE = 15
CLICK_TO_BOX = 0.85  # issue 9: a single click reaches this share of the box Dice


def _case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: these tests read the real cases in ../shared/cases beside the repository")
    return path


def _click(mask: np.ndarray) -> np.ndarray:
    return interior_point(mask)[None]


def test_only_box_trained_models_search_boxes(ct_predictor):
    from napari_sam_ft.models.registry import MODELS

    assert uses_click_search(ct_predictor)  # LiteMedSAM
    assert MODELS["medsam"].automatic_prompt == "box"
    assert all(MODELS[name].automatic_prompt == "point" for name in ("vit_b", "vit_l", "vit_h", "mobilesam"))
    boxes = candidate_boxes((50.0, 40.0), (101, 122))
    assert boxes.shape[1] == 4 and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes[:, [0, 1]].min() >= 0 and boxes[:, 2].max() <= 122 and boxes[:, 3].max() <= 101


def test_a_click_takes_a_part_only_when_it_is_a_different_smaller_structure():
    """Near-tied masks of one structure (boxed a little differently) keep the best; a part well under half the
    best mask's size that scores nearly as well (the aorta inside the body) wins."""
    # Predictions stand in as names: only which one is returned matters.
    assert most_specific([(0.829, 368, "spleen"), (0.796, 212, "spleen boxed tighter")]) == "spleen"
    assert most_specific([(0.829, 6400, "body"), (0.796, 300, "aorta")]) == "aorta"
    assert most_specific([(0.829, 6400, "body"), (0.70, 300, "aorta")]) == "body"  # too far below the best
    assert most_specific([(0.80, 6400, "body"), (0.79, 500, "aorta and wall"), (0.78, 300, "aorta")]) == "aorta"


@pytest.mark.parametrize("class_id", [STOMACH, VERTEBRA_L1, LIVER, SPLEEN])
def test_one_click_on_an_organ_gives_its_mask(ct_predictor, ct_sample, class_id):
    reference = ct_sample.labels.array[SLICE] == class_id
    box_dice = dice(predict_object(ct_predictor, SLICE, None, None, box_from_mask(reference)).mask, reference)
    click = predict_object(ct_predictor, SLICE, _click(reference), np.ones(1, np.int64))
    assert dice(click.mask, reference) >= CLICK_TO_BOX * box_dice, (dice(click.mask, reference), box_dice)


def test_negative_click_removes_and_positive_click_adds(ct_predictor, ct_sample):
    labels = ct_sample.labels.array[SLICE]
    stomach, vertebra = labels == STOMACH, labels == VERTEBRA_L1
    stomach_click, vertebra_click = _click(stomach), _click(vertebra)
    first = predict_object(ct_predictor, SLICE, stomach_click, np.ones(1, np.int64)).mask
    both = predict_object(ct_predictor, SLICE, np.concatenate([stomach_click, vertebra_click]), np.array([1, 1])).mask
    assert (both & vertebra).sum() > 0.6 * vertebra.sum() and (both & stomach).sum() >= (first & stomach).sum()
    # A negative click on the vertebra removes the vertebra the positive click there had added.
    removed = predict_object(ct_predictor, SLICE, np.concatenate([stomach_click, vertebra_click, vertebra_click + 0.1]),
                             np.array([1, 1, 0])).mask
    assert (removed & vertebra).sum() < 0.2 * (both & vertebra).sum()
    assert (removed & stomach).sum() >= 0.9 * (first & stomach).sum()
    # A negative click on background, outside the mask, shrinks nothing inside it.
    outside = np.argwhere(~ndilate(first))[0]
    kept = predict_object(ct_predictor, SLICE, np.concatenate([stomach_click, [[outside[1] + 0.5, outside[0] + 0.5]]]),
                          np.array([1, 0])).mask
    assert (first & ~kept).sum() == 0


def ndilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=3)


def test_click_plus_box_is_as_good_as_the_box(ct_predictor, ct_sample):
    reference = ct_sample.labels.array[SLICE] == SPLEEN
    box = box_from_mask(reference)
    box_only = dice(predict_object(ct_predictor, SLICE, None, None, box).mask, reference)
    both = dice(predict_object(ct_predictor, SLICE, _click(reference), np.ones(1, np.int64), box).mask, reference)
    assert both >= box_only - 0.02


def test_one_click_on_the_lung1_lesion_reaches_the_box_target(litemedsam, shared_cache):
    from napari_sam_ft.scan_jobs import predictor_for
    from napari_sam_ft.volume import read_labels, read_volume

    image = read_volume(_case("pyradiomics_lung1_ct.nrrd"))
    labels = read_labels(_case("pyradiomics_lung1_label.nrrd"), like=image).array
    predictor = predictor_for(litemedsam, image, "auto", shared_cache)
    index = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    reference = labels[index] > 0
    box_dice = dice(predict_object(predictor, index, None, None, box_from_mask(reference)).mask, reference)
    click_dice = dice(predict_object(predictor, index, _click(reference), np.ones(1, np.int64)).mask, reference)
    assert box_dice > 0.8
    assert click_dice >= CLICK_TO_BOX * box_dice, (click_dice, box_dice)


def test_intensity_regions_also_cut_two_regions_joined_by_a_neck():
    image = np.zeros((60, 100), np.float32)
    image[10:50, 5:45] = image[10:50, 55:95] = 1.0
    image[28:31, 45:55] = 1.0  # a 3-pixel bridge, as the trachea joins the lungs
    regions = intensity_regions(image, (30, 20))
    assert any((region == (image > 0)).all() for region in regions)
    assert any(region[12:48, 7:43].all() and not region[:, 55:].any() for region in regions)  # cut at the neck


def _read_case(litemedsam, shared_cache, image_name: str, labels_name: str):
    from napari_sam_ft.scan_jobs import predictor_for
    from napari_sam_ft.volume import read_labels, read_volume

    image = read_volume(_case(image_name))
    labels = read_labels(_case(labels_name), like=image).array
    return predictor_for(litemedsam, image, "auto", shared_cache), np.asarray(labels)


@pytest.mark.parametrize("class_id", [5, 6])  # the right and the left lung: clicked off their box's centre
def test_one_click_on_a_lung_gives_the_lung(litemedsam, shared_cache, class_id):
    predictor, labels = _read_case(litemedsam, shared_cache, "slicer_ctchest.nrrd", "slicer_ctchest.seg.nrrd")
    index = int(np.argmax((labels == class_id).sum(axis=(1, 2))))
    reference = labels[index] == class_id
    box_dice = dice(predict_object(predictor, index, None, None, box_from_mask(reference)).mask, reference)
    click_dice = dice(predict_object(predictor, index, _click(reference), np.ones(1, np.int64)).mask, reference)
    assert box_dice > 0.9
    assert click_dice >= CLICK_TO_BOX * box_dice, (click_dice, box_dice)
