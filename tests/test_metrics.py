"""Dice and HD95 against hand-computable cases, with anisotropic spacing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_sam_ft.metrics import dice, hd95, score_labels


def test_dice_of_known_overlaps():
    a = np.zeros((4, 10, 10), bool)
    b = np.zeros_like(a)
    a[:, :5] = True
    b[:, 2:7] = True  # 3 of 5 rows shared
    assert dice(a, b) == pytest.approx(2 * 3 / 10)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_hd95_honours_spacing():
    reference = np.zeros((1, 40, 40), bool)
    reference[0, 10:20, 10:20] = True
    shifted = np.roll(reference, 3, axis=2)  # 3 voxels along x
    assert hd95(shifted, reference, spacing=(1.0, 1.0, 1.0)) == pytest.approx(3.0)
    assert hd95(shifted, reference, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)
    assert hd95(reference, reference) == 0.0
    assert math.isinf(hd95(np.zeros_like(reference), reference))


def test_score_labels_means_over_classes_present_in_the_reference():
    reference = np.zeros((2, 20, 20), np.uint8)
    reference[:, 2:8, 2:8] = 1
    reference[:, 12:18, 12:18] = 3
    prediction = reference.copy()
    prediction[prediction == 3] = 0
    report = score_labels(prediction, reference, spacing=(3, 1, 1), class_names={1: "spleen"})
    assert report["per_class"]["spleen"]["dice"] == 1.0
    assert report["per_class"]["3"]["dice"] == 0.0 and report["per_class"]["3"]["hd95"] is None
    assert report["dice"] == 0.5
