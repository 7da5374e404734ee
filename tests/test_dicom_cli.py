"""End to end over a DICOM series written from the bundled sample CT: evaluate against the NIfTI labels (aligned
by world geometry) scores what the NIfTI scores, and segment -o out.dcm writes a SEG on the right instances."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import SAMPLE_CT, SAMPLE_CT_LABELS, write_ct_series

from napari_sam_ft.cli import main


@pytest.fixture(scope="module")
def dicom_ct(tmp_path_factory):
    """The whole sample CT as a scanner writes it (columns to the patient's left, rows to posterior), plus a
    second, smaller series in the same folder."""
    folder = tmp_path_factory.mktemp("dicom_ct")
    image = nib.load(str(SAMPLE_CT))
    hounsfield = np.asarray(image.dataobj)
    flipped = np.ascontiguousarray(hounsfield[::-1, ::-1])
    affine = image.affine.copy()
    affine[:3, 3] = (image.affine @ np.array([hounsfield.shape[0] - 1, hounsfield.shape[1] - 1, 0, 1.0]))[:3]
    affine[:3, :2] *= -1
    series = write_ct_series(folder, flipped, affine, description="sample CT")
    write_ct_series(folder, flipped[:40, :40, :3], affine, study_uid=series["study_uid"], description="scout",
                    series_number=1, seed=7)
    return {"folder": folder, **series}


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_a_dicom_folder_against_nifti_labels_or_a_seg_scores_what_the_nifti_scores(dicom_ct, tmp_path,
                                                                                               capsys):
    options = ["--prompt", "box", "--slices", "14:16", "--classes", "1,5", "--json"]
    assert main(["evaluate", str(dicom_ct["folder"]), str(SAMPLE_CT_LABELS), *options]) == 0
    output = capsys.readouterr()
    assert "largest CT/MR series of 2" in output.err  # the choice of series is said
    from_dicom = json.loads(output.out.strip().splitlines()[-1])
    assert main(["evaluate", str(SAMPLE_CT), str(SAMPLE_CT_LABELS), *options]) == 0
    from_nifti = _report(capsys)
    assert from_nifti["per_class"].keys() == from_dicom["per_class"].keys() and len(from_nifti["per_class"]) == 2
    for name, entry in from_nifti["per_class"].items():
        assert entry["reference_voxels"] == from_dicom["per_class"][name]["reference_voxels"]
        assert from_dicom["per_class"][name]["dice"] == pytest.approx(entry["dice"], abs=0.01)
    assert from_dicom["dice"] > 0.8

    # The same reference as a DICOM SEG over the series (written by write_volume, read back by reference).
    from napari_sam_ft.volume import read_labels, read_volume, write_volume

    volume = read_volume(dicom_ct["folder"])
    seg = write_volume(tmp_path / "reference.dcm", read_labels(SAMPLE_CT_LABELS, like=volume).array, like=volume)
    assert main(["evaluate", str(dicom_ct["folder"]), str(seg), *options]) == 0
    from_seg = _report(capsys)
    by_label = {entry["label"]: entry for entry in from_seg["per_class"].values()}
    for entry in from_nifti["per_class"].values():
        assert by_label[entry["label"]]["reference_voxels"] == entry["reference_voxels"]
        assert by_label[entry["label"]]["dice"] == pytest.approx(entry["dice"], abs=0.01)


def test_segment_a_dicom_series_to_a_seg_on_the_prompted_instances(dicom_ct, tmp_path, capsys):
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.volume import read_labels, read_volume

    volume = read_volume(dicom_ct["folder"])
    spleen = read_labels(SAMPLE_CT_LABELS, like=volume).array == 1
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"slice": 15, "label": 1, "box": [float(v) for v in box_from_mask(spleen[15])]}]))
    output = tmp_path / "spleen.dcm"
    assert main(["segment", str(dicom_ct["folder"]), "--prompts", str(prompts), "-o", str(output)]) == 0

    seg = pydicom.dcmread(output)  # checked with pydicom: which instance each frame lies on, and its pixels
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_ct["series_uid"]
    mask_zyx = np.zeros(volume.shape, np.uint8)
    written = read_labels(output, like=volume).array
    mask_zyx[written == 1] = 1
    assert written.any(axis=(1, 2)).nonzero()[0].tolist() == [15]
    assert dice(written[15] == 1, spleen[15]) > 0.85
    mask_ijk = volume.to_file_order(mask_zyx)
    k = int(np.flatnonzero(mask_ijk.any(axis=(0, 1)))[0])
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    assert len(frames) == 1
    item = seg.PerFrameFunctionalGroupsSequence[0]
    assert item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == dicom_ct["sop_uids"][k]
    assert np.array_equal(frames[0].astype(bool), mask_ijk[:, :, k].T.astype(bool))
    source_position = pydicom.dcmread(dicom_ct["files"][k], stop_before_pixels=True).ImagePositionPatient
    assert np.allclose([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient],
                       [float(v) for v in source_position], atol=1e-3)


def test_auto_on_a_dicom_series_writes_a_seg_of_the_slices_it_segmented(dicom_ct, tmp_path):
    from napari_sam_ft.volume import read_labels, read_volume

    output = tmp_path / "auto.dcm"
    assert main(["auto", str(dicom_ct["folder"]), "--slices", "15:16", "-o", str(output)]) == 0
    seg = pydicom.dcmread(output)
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_ct["series_uid"]
    volume = read_volume(dicom_ct["folder"])
    labels = read_labels(output, like=volume).array
    assert labels[15].any() and not labels[:15].any() and not labels[16:].any()
    referenced = {item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                  for item in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {volume.header.sop_instance_uids[int(np.flatnonzero(
        volume.to_file_order((labels > 0).astype(np.uint8)).any(axis=(0, 1)))[0])]}
    assert len(seg.SegmentSequence) == len(np.unique(labels)) - 1
