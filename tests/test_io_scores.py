"""Acceptance: on ../shared/cases the NRRD cases score what their NIfTI copies (written by SimpleITK) score,
with the real LiteMedSAM and reference box prompts on a few lesion slices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from napari_sam_ft.engine.cache import EmbeddingCache
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.evaluate import evaluate
from napari_sam_ft.io.volume import read_labels, read_volume
from test_io_formats import NRRD_CASES, case_path

LESION_SLICES = 3


def _box_dice(image_path, labels_path, litemedsam) -> float:
    image = read_volume(image_path)
    reference = read_labels(labels_path, like=image)
    per_slice = (reference.array == 1).sum(axis=(1, 2))
    middle = int(np.argmax(per_slice))
    first = max(0, middle - LESION_SLICES // 2)
    predictor = VolumePredictor(litemedsam, image, cache=EmbeddingCache())  # its own forward passes, no shared cache
    report, _ = evaluate(predictor, reference.array, "box", (first, first + LESION_SLICES - 1), [1], with_hd95=False)
    return report["dice"]


@pytest.mark.parametrize("case", ["lung1", "brain2"])
def test_an_nrrd_case_scores_what_its_nifti_copy_scores(case, tmp_path, litemedsam):
    image_path, labels_path = (case_path(name) for name in NRRD_CASES[case])
    copies = []
    for path in (image_path, labels_path):
        copy = tmp_path / (path.name.removesuffix(".nrrd") + ".nii.gz")
        sitk.WriteImage(sitk.ReadImage(str(path)), str(copy))
        copies.append(copy)
    from_nrrd = _box_dice(image_path, labels_path, litemedsam)
    from_nifti = _box_dice(*copies, litemedsam)
    assert from_nrrd > 0.5  # a real lesion segmentation, not two equally wrong ones
    assert from_nrrd == pytest.approx(from_nifti, abs=0.01)
