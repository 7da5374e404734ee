"""Reading, writing and windowing volumes, and the error messages for files that are not usable scans."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile

from napari_sam_ft.sample import sample_paths
from napari_sam_ft.volume import (CT_WINDOW_PRESETS, VolumeError, choose_window, looks_like_ct, read_labels,
                                  read_volume, write_volume)


def test_nifti_is_read_as_zyx_with_spacing_and_the_third_voxel_axis_as_z(ct_sample):
    image_path, _ = sample_paths("ct")
    raw = np.asanyarray(nib.load(str(image_path)).dataobj)  # (I, J, K) = (122, 101, 30)
    volume = ct_sample.image
    assert volume.shape == (raw.shape[2], raw.shape[1], raw.shape[0])
    assert volume.spacing == (3.0, 3.0, 3.0)
    assert np.array_equal(volume.array[7], raw[::-1, ::-1, 7].T)  # RAS file: anterior up, patient right on the left


def test_a_written_mask_has_the_inputs_voxel_order_and_affine(ct_sample, tmp_path):
    image_path, _ = sample_paths("ct")
    mask = (ct_sample.labels.array == 5).astype(np.uint8)
    out = write_volume(tmp_path / "liver.nii.gz", mask, like=ct_sample.image)
    written, original = nib.load(str(out)), nib.load(str(image_path))
    assert written.shape == original.shape
    assert np.allclose(written.affine, original.affine)
    reference = np.asanyarray(nib.load(str(sample_paths("ct")[1])).dataobj) == 5
    assert np.array_equal(np.asanyarray(written.dataobj).astype(bool), reference)


def test_another_slicing_axis_round_trips(tmp_path):
    image_path, _ = sample_paths("ct")
    coronal = read_volume(image_path, slicing_axis=1)
    assert coronal.shape == (101, 30, 122)
    out = write_volume(tmp_path / "coronal.nii.gz", (coronal.array > 0).astype(np.uint8), like=coronal)
    raw = np.asanyarray(nib.load(str(image_path)).dataobj)
    assert np.array_equal(np.asanyarray(nib.load(str(out)).dataobj).astype(bool), raw > 0)


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_tiff_and_npy_round_trip(ct_sample, tmp_path, suffix):
    array = np.asarray(ct_sample.image.array)
    like = read_volume(write_volume(tmp_path / f"ct{suffix}", array.astype(np.float32)))
    assert like.shape == array.shape
    assert np.array_equal(like.array, array.astype(np.float32))


def test_tiff_keeps_spacing(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.arange(4 * 8 * 9, dtype=np.uint16).reshape(4, 8, 9), imagej=True,
                     resolution=(1 / 0.5, 1 / 0.5), metadata={"spacing": 2.5, "unit": "mm"})
    volume = read_volume(path)
    assert volume.spacing == pytest.approx((2.5, 0.5, 0.5))


def _nifti(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("array, message", [
    (np.random.rand(20, 30).astype(np.float32), "is 2D"),
    (np.random.rand(10, 12, 8, 3).astype(np.float32), "is 4D"),
    (np.full((6, 7, 8), 12, np.int16), "is constant"),
])
def test_bad_volumes_get_one_clear_message_naming_the_file(tmp_path, array, message):
    path = _nifti(tmp_path / "bad.nii.gz", array)
    with pytest.raises(VolumeError, match=message) as error:
        read_volume(path)
    assert "bad.nii.gz" in str(error.value)


def test_nan_voxels_are_refused(tmp_path):
    array = np.random.rand(5, 6, 7).astype(np.float32)
    array[2, 3, 4] = np.nan
    with pytest.raises(VolumeError, match="NaN or infinite"):
        read_volume(_nifti(tmp_path / "nan.nii", array))


def test_4d_asks_for_a_channel_and_accepts_one(tmp_path):
    array = np.random.rand(10, 12, 8, 3).astype(np.float32)
    path = _nifti(tmp_path / "multi.nii.gz", array)
    with pytest.raises(VolumeError, match=r"channel=N .* 0 to 2"):
        read_volume(path)
    assert read_volume(path, channel=2).shape == (8, 12, 10)
    with pytest.raises(VolumeError, match="out of range"):
        read_volume(path, channel=3)


def test_unreadable_and_unknown_files(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    with pytest.raises(VolumeError, match="cannot read"):
        read_volume(broken)
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(tmp_path / "scan.png")
    with pytest.raises(VolumeError, match="not found"):
        read_volume(tmp_path / "missing.nii.gz")


def test_labels_on_another_grid_are_refused_naming_both_geometries(ct_sample, tmp_path):
    path = _nifti(tmp_path / "labels.nii.gz", np.ones((5, 5, 5), np.uint8))
    with pytest.raises(VolumeError, match="do not lie on the image's voxel grid") as refused:
        read_labels(path, like=ct_sample.image)
    message = str(refused.value)
    assert "shape (5, 5, 5), spacing (1, 1, 1) mm" in message and "shape (122, 101, 30), spacing (3, 3, 3) mm" in message


def test_ct_is_recognised_and_gets_the_soft_tissue_window(ct_sample):
    assert looks_like_ct(ct_sample.image.array)
    window = choose_window(ct_sample.image.array, "auto")
    level, width = CT_WINDOW_PRESETS["soft_tissue"]
    assert (window.low, window.high) == (level - width / 2, level + width / 2)
    windowed = window.apply(ct_sample.image.array[15])
    assert windowed.min() == 0.0 and windowed.max() == 1.0


def test_mri_gets_percentile_clipping():
    from napari_sam_ft.sample import load_sample

    mr = load_sample("mr").image.array
    assert not looks_like_ct(mr)
    window = choose_window(mr, "auto")
    assert window.name == "percentile"
    assert np.percentile(mr, 0.5) - 1 <= window.low < window.high <= np.percentile(mr, 99.5) + 1
