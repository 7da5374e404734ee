"""Image or labels: an 8-bit or low-range 16-bit scan is an image, a label map without a telling name is labels."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_sam_ft.io.content import classify_contents, looks_like_labels
from napari_sam_ft.io.volume import read_volume
from napari_sam_ft.sample import sample_paths
from test_io_formats import case_path


def _rescaled_copy(source, path, high: int, dtype) -> object:
    image = nib.load(str(source))
    values = np.asanyarray(image.dataobj).astype(np.float64)
    scaled = np.rint(high * (values - values.min()) / (values.max() - values.min())).astype(dtype)
    nib.save(nib.Nifti1Image(scaled, image.affine), str(path))
    return read_volume(path)


@pytest.mark.parametrize("high, dtype", [(255, np.uint8), (300, np.uint16)], ids=["8-bit", "0..300 16-bit"])
@pytest.mark.parametrize("source", ["mni152_t1.nii.gz", "mr"])
def test_a_low_range_scan_is_an_image_whatever_its_value_count(tmp_path, source, high, dtype):
    path = case_path(source) if source.endswith(".nii.gz") else sample_paths(source)[0]
    volume = _rescaled_copy(path, tmp_path / "scan.nii.gz", high, dtype)
    assert len(np.unique(np.asarray(volume.array))) < 1000  # the value count alone would have said labels
    kind, reason = classify_contents(volume)
    assert kind == "image" and "vary voxel to voxel" in reason


@pytest.mark.parametrize("labels", ["ct_labels", "mni152_aal_amygdala_pallidum_hippocampus.nii.gz"])
def test_label_maps_without_a_telling_name_are_labels(tmp_path, labels):
    source = sample_paths("ct")[1] if labels == "ct_labels" else case_path(labels)
    renamed = tmp_path / "volume_b.nii.gz"
    shutil.copyfile(source, renamed)
    assert looks_like_labels(read_volume(renamed, check_values=False))


def test_names_formats_and_sidecars_decide_before_the_voxels(tmp_path):
    assert classify_contents(read_volume(case_path("slicer_ctchest.seg.nrrd"), check_values=False))[0] == "labels"
    assert classify_contents(read_volume(case_path("pyradiomics_lung1_label.nrrd"), check_values=False)) == \
        ("labels", "the name 'pyradiomics_lung1_label.nrrd'")
    assert classify_contents(read_volume(case_path("pyradiomics_lung1_ct.nrrd")))[0] == "image"  # Hounsfield < 0
    # A coarse 8-level scan is labels by its voxels, but an image when its sidecar records an acquisition.
    coarse = (np.arange(8 * 9 * 10).reshape(8, 9, 10) % 8).astype(np.uint8)
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(coarse, np.eye(4)), str(path))
    assert looks_like_labels(read_volume(path))
    (tmp_path / "sub-01_T1w.json").write_text(json.dumps({"RepetitionTime": 2.3, "EchoTime": 0.003}))
    assert classify_contents(read_volume(path)) == ("image", "its JSON sidecar has acquisition fields")
    mask_path = tmp_path / "liver_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(np.random.default_rng(0).random((8, 9, 10)) * 300).astype(np.float32),
                             np.eye(4)), str(mask_path))
    assert classify_contents(read_volume(mask_path)) == ("labels", "the name 'liver_mask.nii.gz'")
