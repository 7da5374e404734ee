"""DICOM series reading: slice order, geometry against SimpleITK/GDCM, rescaling, series choice, bad series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_series import ct_crop, write_ct_series
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from napari_sam_ft.io.dicom import is_dicom_path, list_dicom_series, read_dicom
from napari_sam_ft.io.errors import VolumeError


def scanner_orientation(hounsfield_ijk, affine_ras):
    """The crop as a scanner stores an axial series: columns to the patient's left, rows to posterior (LPS +x, +y)."""
    flipped = hounsfield_ijk[::-1, ::-1]
    affine = affine_ras.copy()
    affine[:3, 3] = (affine_ras @ np.array([hounsfield_ijk.shape[0] - 1, hounsfield_ijk.shape[1] - 1, 0, 1.0]))[:3]
    affine[:3, :2] *= -1
    return np.ascontiguousarray(flipped), affine


def oblique(affine_ras, degrees: float = 20.0):
    """The same grid rotated about the patient's left-right axis (a tilted acquisition plane)."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine_ras


@pytest.fixture(scope="module")
def crop():
    return ct_crop()


def sitk_series(folder, series_uid):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    return reader.Execute()


def assert_matches_simpleitk(folder, series_uid, data, affine):
    """Same voxel values at the same world points as SimpleITK's (GDCM) series reader."""
    image = sitk_series(folder, series_uid)
    assert image.GetSize() == data.shape
    assert np.array_equal(sitk.GetArrayFromImage(image), np.transpose(data, (2, 1, 0)))
    for index in [(0, 0, 0), (data.shape[0] - 1, 0, 0), (0, data.shape[1] - 1, 0), (3, 7, data.shape[2] - 1),
                  tuple(size - 1 for size in data.shape)]:
        lps = np.array(image.TransformIndexToPhysicalPoint([int(value) for value in index]))
        ras = (affine @ np.array([*index, 1.0]))[:3]
        assert np.allclose(ras, lps * [-1, -1, 1], atol=1e-3), (index, ras, lps)


@pytest.mark.parametrize("orientation", ["scanner", "as_nifti", "oblique"])
def test_a_shuffled_series_reads_in_slice_order_with_simpleitks_geometry_and_hounsfield_units(crop, tmp_path,
                                                                                                 orientation):
    hounsfield, affine, _ = crop
    if orientation == "scanner":
        hounsfield, affine = scanner_orientation(hounsfield, affine)
    elif orientation == "oblique":
        affine = oblique(affine)
    # 16 stored bits may exceed int16 after the intercept: the reader checks the values, not only the header.
    series = write_ct_series(tmp_path, hounsfield, affine, bits_stored=16 if orientation == "oblique" else 12)
    assert is_dicom_path(tmp_path) and is_dicom_path(series["files"][0]) and not is_dicom_path(tmp_path / "nothing")
    data, read_affine, source = read_dicom(tmp_path)
    assert data.dtype == np.int16 and np.array_equal(data, hounsfield)  # stored + intercept = HU again
    assert np.allclose(read_affine, affine, atol=1e-4)
    assert_matches_simpleitk(tmp_path, series["series_uid"], data, read_affine)
    assert source.sop_instance_uids == tuple(series["sop_uids"]) and source.files == tuple(map(str, series["files"]))
    assert source.modality == "CT" and source.study_uid == series["study_uid"]
    assert "only series" in source.chosen_message

    # One file of the series stands for the whole series in its folder.
    from_one_file, _, _ = read_dicom(series["files"][3])
    assert np.array_equal(from_one_file, data)


def test_fractional_rescaling_gives_float32_and_a_non_dicom_file_is_refused(crop, tmp_path):
    hounsfield, affine, _ = crop
    write_ct_series(tmp_path / "scaled", hounsfield, affine, slope=0.5, bits_stored=16)
    data, _, _ = read_dicom(tmp_path / "scaled")
    assert data.dtype == np.float32 and np.array_equal(data, hounsfield.astype(np.float32))
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file despite its suffix")
    assert not is_dicom_path(text)
    with pytest.raises(VolumeError, match="not a DICOM file"):
        read_dicom(text)


def test_the_largest_ct_series_is_the_default_and_another_is_chosen_by_uid(crop, tmp_path):
    hounsfield, affine, _ = crop
    large = write_ct_series(tmp_path, hounsfield, affine, description="large")
    small = write_ct_series(tmp_path, hounsfield[:32, :32, :4], affine, study_uid=large["study_uid"],
                            description="small", series_number=3, seed=1)
    listed = list_dicom_series(tmp_path)
    assert [info.series_uid for info in listed] == [large["series_uid"], small["series_uid"]]
    assert listed[0].size == (64, 64, 8) and listed[1].num_slices == 4 and listed[1].description == "small"
    data, _, source = read_dicom(tmp_path)
    assert data.shape == (64, 64, 8) and source.series_uid == large["series_uid"]
    assert "largest CT/MR series of 2" in source.chosen_message and small["series_uid"] in source.chosen_message
    chosen, _, chosen_source = read_dicom(tmp_path, series_uid=small["series_uid"])
    assert np.array_equal(chosen, hounsfield[:32, :32, :4]) and chosen_source.series_uid == small["series_uid"]
    assert read_dicom(small["files"][0])[2].series_uid == small["series_uid"]  # the file given decides
    with pytest.raises(VolumeError, match="no series with UID 1.2.3") as error:
        read_dicom(tmp_path, series_uid="1.2.3")
    assert large["series_uid"] in str(error.value) and small["series_uid"] in str(error.value)


def test_a_missing_slice_is_refused_naming_the_gap(crop, tmp_path):
    hounsfield, affine, _ = crop
    write_ct_series(tmp_path, hounsfield, affine, skip_slices=(5,))
    with pytest.raises(VolumeError,
                       match=r"unevenly spaced.*6\.000 mm between slice 4 .* and slice 5.*1 slice\(s\) missing"):
        read_dicom(tmp_path)


def test_mixed_orientations_and_sizes_in_one_series_are_refused(crop, tmp_path):
    hounsfield, affine, _ = crop
    series = write_ct_series(tmp_path, hounsfield, affine)
    dataset = pydicom.dcmread(series["files"][2])
    dataset.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal slice inside an axial series
    dataset.save_as(series["files"][2])
    with pytest.raises(VolumeError, match="mixes slice orientations"):
        read_dicom(tmp_path)
    dataset.ImageOrientationPatient = pydicom.dcmread(series["files"][1]).ImageOrientationPatient
    dataset.Rows, dataset.Columns = 32, 128
    dataset.save_as(series["files"][2])
    with pytest.raises(VolumeError, match="mixes image sizes"):
        read_dicom(tmp_path)


def test_truncated_pixel_data_is_one_clear_error(crop, tmp_path):
    hounsfield, affine, _ = crop
    series = write_ct_series(tmp_path, hounsfield, affine)
    dataset = pydicom.dcmread(series["files"][4])
    dataset.PixelData = dataset.PixelData[:1000]
    dataset.save_as(series["files"][4])
    with pytest.raises(VolumeError, match=r"unreadable pixel data \(Explicit VR Little Endian") as error:
        read_dicom(tmp_path)
    assert str(series["files"][4]) in str(error.value)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_values(crop, tmp_path, syntax):
    hounsfield, affine, _ = crop
    hounsfield = hounsfield[:, :, :3]
    series = write_ct_series(tmp_path, hounsfield, affine, compress=syntax)
    assert pydicom.dcmread(series["files"][0]).file_meta.TransferSyntaxUID == syntax
    data, _, source = read_dicom(tmp_path)
    assert np.array_equal(data, hounsfield) and source.transfer_syntax == syntax


def test_a_transfer_syntax_without_a_decoder_is_named(crop, tmp_path):
    hounsfield, affine, _ = crop
    series = write_ct_series(tmp_path, hounsfield[:, :, :2], affine, compress=RLELossless)
    for path in series["files"]:
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # H.264 video: pydicom has no decoder
        dataset.save_as(path)
    with pytest.raises(VolumeError,
                       match=r"compressed as MPEG-4 AVC/H.264 .*\(1\.2\.840\.10008\.1\.2\.4\.102\).*no installed"):
        read_dicom(tmp_path)


def test_a_compressed_series_without_its_decoder_installed_names_the_package(crop, tmp_path, monkeypatch):
    import pydicom.pixels

    hounsfield, affine, _ = crop
    write_ct_series(tmp_path, hounsfield[:, :, :2], affine, compress=JPEG2000Lossless)

    class Uninstalled:  # what pydicom reports when pylibjpeg-openjpeg (and every other JPEG 2000 plugin) is missing
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda syntax: Uninstalled())
    with pytest.raises(VolumeError, match=r"compressed as JPEG 2000 Image Compression \(Lossless Only\) .*no decoder "
                                          r"for it is installed; install pylibjpeg \+ pylibjpeg-openjpeg"):
        read_dicom(tmp_path)


def test_a_folder_without_dicom_files_and_a_multiframe_image_are_refused(crop, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert not is_dicom_path(tmp_path / "empty")
    with pytest.raises(VolumeError, match="holds no DICOM files"):
        read_dicom(tmp_path / "empty")
    hounsfield, affine, _ = crop
    series = write_ct_series(tmp_path / "multi", hounsfield[:, :, :1], affine)
    dataset = pydicom.dcmread(series["files"][0])
    dataset.NumberOfFrames = 2
    dataset.save_as(series["files"][0])
    with pytest.raises(VolumeError, match="multi-frame"):
        read_dicom(tmp_path / "multi")
    shutil.rmtree(tmp_path / "multi")


def write_series_with_simpleitk(image, folder, seed: int = 0) -> str:
    """Write a 3D SimpleITK image as a CT series with SimpleITK/GDCM itself (another writer than pydicom);
    random file names. Returns the series UID."""
    import uuid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    direction = image.GetDirection()
    series_uid, study_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    tags = [("0008|0060", "CT"), ("0020|000e", series_uid), ("0020|000d", study_uid), ("0008|103e", "sitk"),
            ("0020|0037", "\\".join(f"{value:.8f}" for value in (direction[0], direction[3], direction[6],
                                                                  direction[1], direction[4], direction[7])))]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        for tag, value in tags:
            plane.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetMetaData("0020|0032", "\\".join(f"{value:.6f}" for value in position))
        plane.SetMetaData("0020|0013", str(int(rng.integers(1, 1000))))
        plane.SetMetaData("0008|0018", pydicom.uid.generate_uid())
        writer.SetFileName(str(folder / f"{uuid.UUID(bytes=rng.bytes(16)).hex}.dcm"))
        writer.Execute(plane)
    return series_uid


@pytest.mark.parametrize("case", ["pyradiomics_lung1_ct.nrrd", "pyradiomics_brain2_mr.nrrd"])
def test_a_series_written_by_simpleitk_from_a_real_nrrd_has_the_nrrds_values_at_the_same_world_points(case,
                                                                                                      tmp_path):
    from pathlib import Path

    source = Path(__file__).resolve().parents[1].parent / "shared" / "cases" / case
    assert source.exists(), f"{source} is missing: the real cases live in ../shared/cases beside the repository"
    image = sitk.ReadImage(str(source))
    size = image.GetSize()
    start = [(size[0] - 48) // 2, (size[1] - 40) // 2, max(0, size[2] // 2 - 3)]
    crop = sitk.RegionOfInterest(image, [48, 40, 6], start)
    series_uid = write_series_with_simpleitk(crop, tmp_path)
    data, affine, source_info = read_dicom(tmp_path)
    assert source_info.series_uid == series_uid and data.shape == (48, 40, 6)
    assert_matches_simpleitk(tmp_path, series_uid, data, affine)
    # Every voxel we read lies at the world point of the same value in the NRRD crop (world-to-index by SimpleITK).
    indices = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world_lps = (affine @ np.c_[indices, np.ones(len(indices))].T).T[:, :3] * [-1, -1, 1]
    crop_values = sitk.GetArrayFromImage(crop)  # (k, j, i)
    for index, point in zip(indices[::37], world_lps[::37]):
        i, j, k = crop.TransformPhysicalPointToIndex(tuple(float(value) for value in point))
        assert data[tuple(index)] == crop_values[k, j, i]
