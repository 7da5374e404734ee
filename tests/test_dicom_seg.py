"""DICOM SEG: written with highdicom over a pydicom-written CT series, checked frame by frame with pydicom alone,
and read back onto the source grid."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from dicom_series import ct_crop, write_ct_series

from napari_sam_ft.io.dicom import read_dicom
from napari_sam_ft.io.dicom_seg import is_dicom_seg, read_dicom_seg, write_dicom_seg
from napari_sam_ft.io.errors import VolumeError


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg_source")
    hounsfield, affine, labels = ct_crop()
    written = write_ct_series(folder, hounsfield, affine)
    _, _, source = read_dicom(folder)
    keep = (labels == 5) | (labels == 1) | (labels == 2)  # liver, spleen, right kidney of the sample's labels
    return {"folder": folder, "source": source, "labels": np.where(keep, labels, 0).astype(np.uint16), **written}


def test_a_seg_references_the_source_instances_at_their_positions_and_holds_the_right_pixels(series, tmp_path):
    labels, source = series["labels"], series["source"]
    path = write_dicom_seg(tmp_path / "out.dcm", labels, None, {5: "liver", 1: "spleen"}, source=source)
    assert is_dicom_seg(path) and not is_dicom_seg(series["files"][0])

    seg = pydicom.dcmread(path)  # checked with pydicom alone, not with highdicom or our reader
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series["study_uid"] and seg.FrameOfReferenceUID == series["frame_of_reference_uid"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["series_uid"]
    segments = {int(item.SegmentNumber): item for item in seg.SegmentSequence}
    label_of = {number: int(item.TrackingID.split()[-1]) for number, item in segments.items()}
    assert sorted(label_of.values()) == [1, 2, 5]
    assert {label_of[number]: item.SegmentLabel for number, item in segments.items()} == {
        1: "spleen", 2: "label 2", 5: "liver"}
    position_of = {uid: pydicom.dcmread(file, stop_before_pixels=True).ImagePositionPatient
                   for uid, file in zip(series["sop_uids"], series["files"])}
    slice_of = {uid: k for k, uid in enumerate(series["sop_uids"])}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        label_id = label_of[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert np.allclose([float(value) for value in position], [float(value) for value in position_of[uid]],
                           atol=1e-3)
        k = slice_of[uid]
        assert np.array_equal(frame.astype(bool), labels[:, :, k].T == label_id), (k, label_id)
        seen.add((k, label_id))
    # Every non-empty (slice, label) pair has its frame; empty ones are left out.
    assert seen == {(k, label_id) for k in range(labels.shape[2]) for label_id in (1, 2, 5)
                    if (labels[:, :, k] == label_id).any()}

    back, names = read_dicom_seg(path, source)
    assert back.dtype == np.uint16 and np.array_equal(back, labels)
    assert names == {1: "spleen", 2: "label 2", 5: "liver"}


def test_a_seg_of_another_series_a_wrong_shape_and_a_changed_source_folder_are_refused(series, tmp_path):
    labels, source = series["labels"], series["source"]
    other_folder = tmp_path / "other"
    hounsfield, affine, _ = ct_crop()
    write_ct_series(other_folder, hounsfield, affine, seed=5)
    _, _, other = read_dicom(other_folder)
    path = write_dicom_seg(tmp_path / "other.dcm", labels, None, source=other)
    with pytest.raises(VolumeError, match="not the image's series"):
        read_dicom_seg(path, source)
    with pytest.raises(VolumeError, match=r"mask has shape \(64, 64, 7\)"):
        write_dicom_seg(tmp_path / "bad.dcm", labels[:, :, :7], None, source=source)
    with pytest.raises(VolumeError, match="empty"):
        write_dicom_seg(tmp_path / "bad.dcm", np.zeros_like(labels), None, source=source)
    assert not (tmp_path / "bad.dcm").exists()
    replaced = pydicom.dcmread(other.files[0])
    replaced.SOPInstanceUID = pydicom.uid.generate_uid()
    replaced.save_as(other.files[0])
    with pytest.raises(VolumeError, match="source folder changed"):
        write_dicom_seg(tmp_path / "late.dcm", labels, None, source=other)


def test_labels_shown_over_a_flipped_display_are_written_to_the_seg_on_the_source_pixels(series, tmp_path):
    """The series of the module stores rows and columns toward the patient's right and anterior (the crop's NIfTI
    order), so napari shows it flipped; a mask painted there must land on the same source pixels."""
    import nibabel as nib

    from napari_sam_ft.volume import read_labels, read_volume, write_volume

    volume = read_volume(series["folder"])
    assert any(volume.flips), "this series should be displayed flipped (radiological view)"
    _, affine, _ = ct_crop()
    labels_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(series["labels"], affine), str(labels_path))
    shown = read_labels(labels_path, like=volume).array  # aligned by world geometry onto the displayed grid
    path = write_volume(tmp_path / "painted.dcm", shown, like=volume)
    seg = pydicom.dcmread(path)
    label_of = {int(item.SegmentNumber): int(item.TrackingID.split()[-1]) for item in seg.SegmentSequence}
    slice_of = {uid: k for k, uid in enumerate(series["sop_uids"])}
    for frame, item in zip(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns), seg.PerFrameFunctionalGroupsSequence):
        k = slice_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        label_id = label_of[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        assert np.array_equal(frame.astype(bool), series["labels"][:, :, k].T == label_id)  # nibabel's own voxels
    assert np.array_equal(read_labels(path, like=volume).array, shown)
