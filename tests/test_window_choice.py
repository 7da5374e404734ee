"""The per-prompt CT window (engine.window_choice) on real scans: lung1's lesion, the sample CT's liver, brain2 MR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_sam_ft.engine.prompts import box_from_mask
from napari_sam_ft.engine.window_choice import (SOLID_IN_AIR_WINDOW, WIDE_CT_WINDOW, chooses_window_per_prompt,
                                                predictor_for_box, window_for_box, windows_used)

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"


def _case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: these tests read the real cases in ../shared/cases beside the repository")
    return path


@pytest.fixture(scope="module")
def lung1():
    from napari_sam_ft.volume import read_labels, read_volume

    image = read_volume(_case("pyradiomics_lung1_ct.nrrd"))
    return image, np.asarray(read_labels(_case("pyradiomics_lung1_label.nrrd"), like=image).array)


def test_a_lesion_in_air_a_lung_and_the_liver_each_get_their_window(lung1, ct_sample):
    image, labels = lung1
    index = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    assert window_for_box(np.asarray(image.array[index]), box_from_mask(labels[index] > 0)) == SOLID_IN_AIR_WINDOW
    lung = ct_sample.labels.array[25] == 10  # lung_upper_lobe_left: an air-filled middle
    assert window_for_box(np.asarray(ct_sample.image.array[25]), box_from_mask(lung)) == WIDE_CT_WINDOW
    liver = ct_sample.labels.array[15] == 5
    assert window_for_box(np.asarray(ct_sample.image.array[15]), box_from_mask(liver)).name == "soft_tissue"


def test_only_automatic_ct_windows_change_per_prompt(litemedsam, lung1, shared_cache):
    from napari_sam_ft.scan_jobs import predictor_for
    from napari_sam_ft.volume import read_volume

    image, _ = lung1
    assert chooses_window_per_prompt(predictor_for(litemedsam, image, "auto", shared_cache))
    assert not chooses_window_per_prompt(predictor_for(litemedsam, image, "soft_tissue", shared_cache))
    brain = read_volume(_case("pyradiomics_brain2_mr.nrrd"))
    mri = predictor_for(litemedsam, brain, "auto", shared_cache)
    assert not chooses_window_per_prompt(mri)
    assert predictor_for_box(mri, 9, np.array([10, 10, 60, 60], np.float32)) is mri


def test_evaluate_records_the_window_and_the_lesion_window_beats_soft_tissue_on_lung1(litemedsam, lung1, shared_cache):
    from napari_sam_ft.evaluate import evaluate
    from napari_sam_ft.scan_jobs import predictor_for

    image, labels = lung1
    rows = np.flatnonzero(labels.any(axis=(1, 2)))
    slices = (int(rows[0]), int(rows[-1]))
    automatic = predictor_for(litemedsam, image, "auto", shared_cache)
    report, _ = evaluate(automatic, labels, "box", slices, with_hd95=False)
    fixed, _ = evaluate(predictor_for(litemedsam, image, "soft_tissue", shared_cache), labels, "box", slices,
                        with_hd95=False)
    assert report["windows_used"] == ["solid_in_air"] and windows_used(automatic) == ["solid_in_air"]
    assert report["dice"] >= fixed["dice"] + 0.03, (report["dice"], fixed["dice"])
