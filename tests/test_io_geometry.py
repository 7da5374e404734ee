"""One geometry model: masks we write land on the image's voxels in world coordinates, checked with SimpleITK
and nibabel (never with our own reader), for NIfTI RAS, NRRD LPS with a negative direction and an oblique scan;
label files in another voxel order are aligned by world geometry or refused naming both grids."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sam_ft.io.errors import VolumeError
from napari_sam_ft.io.geometry import grid_alignment
from napari_sam_ft.io.volume import read_channels, read_labels, read_volume, write_volume

SHAPE_IJK = (20, 24, 16)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _unique_voxels(shape=SHAPE_IJK) -> np.ndarray:
    """Every voxel a different value, so a displayed voxel can be found in the file by value alone."""
    return np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape, order="F") + 1


def _oblique_affine() -> np.ndarray:
    angle = np.radians(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    tilt = np.radians(10.0)
    rotation = rotation @ np.array([[1.0, 0.0, 0.0], [0.0, np.cos(tilt), -np.sin(tilt)],
                                    [0.0, np.sin(tilt), np.cos(tilt)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = (-12.0, 30.5, -7.25)
    return affine


def _write_nifti_image(path: Path, affine_ras: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(_unique_voxels(), affine_ras), str(path))
    return path


def _write_nrrd_image(path: Path) -> Path:
    """LPS space with a negative i direction and a negative k direction, as Slicer writes flipped scans."""
    header = {"space": "left-posterior-superior", "kinds": ["domain"] * 3, "encoding": "gzip",
              "space directions": np.array([[-0.7, 0.0, 0.0], [0.0, 0.75, 0.0], [0.0, 0.0, -3.0]]),
              "space origin": np.array([40.0, -20.0, 55.0])}
    nrrd.write(str(path), _unique_voxels(), header, index_order="F")
    return path


IMAGES = {
    "nifti_ras": lambda tmp: _write_nifti_image(tmp / "image.nii.gz", np.diag([0.8, 0.9, 2.5, 1.0]) + np.array(
        [[0, 0, 0, -10.0], [0, 0, 0, 22.0], [0, 0, 0, -30.0], [0, 0, 0, 0]])),
    "nrrd_lps_negative": lambda tmp: _write_nrrd_image(tmp / "image.nrrd"),
    "nifti_oblique": lambda tmp: _write_nifti_image(tmp / "oblique.nii.gz", _oblique_affine()),
}
PAINTED_ZYX = [(0, 0, 0), (3, 5, 7), (15, 23, 19), (8, 12, 2), (8, 13, 2), (11, 0, 19)]


def _physical_points_of_values(image: sitk.Image, values) -> np.ndarray:
    """World points (LPS mm, by SimpleITK) of the image voxels holding ``values``."""
    array = sitk.GetArrayFromImage(image)  # (k, j, i)
    points = []
    for value in values:
        k, j, i = (int(index) for index in np.argwhere(array == value)[0])
        points.append(image.TransformIndexToPhysicalPoint((i, j, k)))
    return np.array(points)


def _physical_points_of_mask(path: Path) -> np.ndarray:
    mask = sitk.ReadImage(str(path))
    indices = np.argwhere(sitk.GetArrayFromImage(mask) > 0)
    return np.array([mask.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for k, j, i in indices])


def _same_points(first: np.ndarray, second: np.ndarray) -> bool:
    order = lambda points: points[np.lexsort(np.round(points, 3).T)]  # noqa: E731
    return first.shape == second.shape and np.allclose(order(first), order(second), atol=1e-3)


@pytest.mark.parametrize("image_kind", sorted(IMAGES))
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".seg.nrrd", ".mha"])
def test_a_mask_painted_at_known_voxels_maps_to_the_image_voxels_world_points(tmp_path, image_kind, suffix):
    image_path = IMAGES[image_kind](tmp_path)
    volume = read_volume(image_path)
    mask = np.zeros(volume.shape, np.uint8)
    for voxel in PAINTED_ZYX:
        mask[voxel] = 1
    written = write_volume(tmp_path / f"mask{suffix}", mask, like=volume)
    painted_values = [int(volume.array[voxel]) for voxel in PAINTED_ZYX]
    expected = _physical_points_of_values(sitk.ReadImage(str(image_path)), painted_values)
    assert _same_points(_physical_points_of_mask(written), expected)
    # Our world_affine says the same (RAS = LPS with the first two signs flipped).
    ours = np.array([volume.world_affine @ (*voxel, 1.0) for voxel in PAINTED_ZYX])[:, :3] * (-1, -1, 1)
    assert np.allclose(ours, expected, atol=1e-3)


def test_nibabel_puts_the_written_nifti_mask_where_the_image_voxels_are(tmp_path):
    image_path = _write_nifti_image(tmp_path / "oblique.nii.gz", _oblique_affine())
    volume = read_volume(image_path)
    assert volume.is_oblique and "oblique by" in volume.describe_geometry()
    mask = np.zeros(volume.shape, np.uint8)
    mask[4, 6, 9] = 1
    written = nib.load(str(write_volume(tmp_path / "mask.nii.gz", mask, like=volume)))
    np.testing.assert_allclose(written.affine, nib.load(str(image_path)).affine, atol=1e-6)  # the oblique kept exactly
    source = np.asanyarray(nib.load(str(image_path)).dataobj)
    ijk = np.argwhere(source == volume.array[4, 6, 9])[0]
    np.testing.assert_array_equal(np.argwhere(np.asanyarray(written.dataobj) > 0), [ijk])
    np.testing.assert_allclose(nib.affines.apply_affine(written.affine, ijk), (volume.world_affine @ (4, 6, 9, 1))[:3])


def test_nrrd_and_nifti_copies_of_one_scan_display_identically(tmp_path):
    nrrd_path = _write_nrrd_image(tmp_path / "image.nrrd")
    nifti_path = tmp_path / "copy.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(nrrd_path)), str(nifti_path))
    from_nrrd, from_nifti = read_volume(nrrd_path), read_volume(nifti_path)
    np.testing.assert_array_equal(from_nrrd.array, from_nifti.array)
    np.testing.assert_allclose(from_nrrd.world_affine, from_nifti.world_affine, atol=1e-4)
    # Radiological: rows run toward posterior, columns toward the patient's left.
    rows, columns = from_nrrd.world_affine[:3, 1], from_nrrd.world_affine[:3, 2]
    assert rows[1] < 0 and columns[0] < 0


def _labels_in_another_voxel_order(image_path: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The image's labels (value > threshold) as NIfTI with axes swapped and one flipped, by nibabel."""
    image = sitk.ReadImage(str(image_path))
    labels_kji = (sitk.GetArrayFromImage(image) % 7 == 0).astype(np.uint8)  # (k, j, i)
    labels_ijk = np.transpose(labels_kji, (2, 1, 0))
    affine_ras = LPS.copy()
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    affine_ras[:3, :3] = (LPS[:3, :3] @ direction)
    affine_ras[:3, 3] = LPS[:3, :3] @ np.asarray(image.GetOrigin())
    # New voxel order (j, k, i) with k reversed: new index (a, b, c) = (j, K-1-k, i).
    reordered = np.transpose(labels_ijk, (1, 2, 0))[:, ::-1, :]
    permute = np.zeros((4, 4))
    permute[3, 3] = 1.0
    permute[1, 0] = 1.0                       # j = a
    permute[2, 1], permute[2, 3] = -1.0, labels_ijk.shape[2] - 1  # k = K-1-b
    permute[0, 2] = 1.0                       # i = c
    path = tmp_path / "labels_reordered.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(reordered), affine_ras @ permute), str(path))
    return path, labels_kji


def test_nifti_labels_in_another_voxel_order_are_aligned_to_an_nrrd_image_by_world_geometry(tmp_path):
    image_path = _write_nrrd_image(tmp_path / "image.nrrd")
    labels_path, labels_kji = _labels_in_another_voxel_order(image_path, tmp_path)
    image = read_volume(image_path)
    labels = read_labels(labels_path, like=image)
    assert labels.shape == image.shape and labels.file_axes == image.file_axes and labels.flips == image.flips
    # Every displayed voxel: labelled exactly where the image's own voxel (found by value) is labelled.
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))
    expected = np.zeros(image.shape, bool)
    values = np.asarray(image.array)
    lookup = {int(value): index for index, value in np.ndenumerate(source)}
    for voxel, value in np.ndenumerate(values):
        expected[voxel] = bool(labels_kji[lookup[int(value)]])
    np.testing.assert_array_equal(labels.array > 0, expected)
    # ...and a mask written from them overlays the labels file in SimpleITK's world.
    written = write_volume(tmp_path / "again.nii.gz", labels.array, like=image)
    assert _same_points(_physical_points_of_mask(written), _physical_points_of_mask(labels_path))


def test_labels_off_the_image_grid_are_refused_naming_both_geometries(tmp_path):
    image_path = _write_nrrd_image(tmp_path / "image.nrrd")
    image = read_volume(image_path)
    shifted = image.affine.copy()
    shifted[:3, 3] += shifted[:3, 0] * 0.5  # half a voxel along i
    path = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(SHAPE_IJK, np.uint8), shifted), str(path))
    with pytest.raises(VolumeError) as refused:
        read_labels(path, like=image)
    message = str(refused.value)
    assert message.count("shape (20, 24, 16)") == 2 and "spacing (0.7, 0.75, 3) mm" in message
    assert "origin (-40, 20, 55) mm RAS" in message and "origin (-39.65, 20, 55) mm RAS" in message
    assert "axes RPI" in message and "Resample the labels" in message


def test_a_label_crop_of_the_image_grid_is_pasted_in_place_and_one_past_its_edge_is_refused(tmp_path):
    image = read_volume(_write_nrrd_image(tmp_path / "image.nrrd"))
    crop = np.zeros((5, 6, 4), np.uint8)
    crop[1:4, 2:5, 1:3] = 3
    offset = np.array([7, 9, 4])
    affine = image.affine.copy()
    affine[:3, 3] = (image.affine @ (*offset, 1))[:3]
    path = tmp_path / "crop.nii.gz"
    nib.save(nib.Nifti1Image(crop, affine), str(path))
    labels = read_labels(path, like=image)
    assert int((labels.array == 3).sum()) == int((crop == 3).sum())
    assert _same_points(_physical_points_of_mask(write_volume(tmp_path / "pasted.nrrd", labels.array, like=image)),
                        _physical_points_of_mask(path))
    affine[:3, 3] = (image.affine @ (18, 9, 4, 1))[:3]  # the labelled voxels now reach past the image's i edge
    nib.save(nib.Nifti1Image(crop, affine), str(path))
    with pytest.raises(VolumeError, match="do not lie on the image's voxel grid"):
        read_labels(path, like=image)


def test_grid_alignment_finds_the_signed_permutation_and_refuses_other_spacings():
    target = np.diag([2.0, 3.0, 4.0, 1.0])
    source = target @ np.array([[0, 1, 0, 0], [-1, 0, 0, 5], [0, 0, 1, -2], [0, 0, 0, 1.0]])
    alignment = grid_alignment(source, target)
    assert alignment.source_axes == (1, 0, 2) and alignment.signs == (1, -1, 1) and alignment.offsets == (0, 5, -2)
    assert grid_alignment(np.diag([2.0, 3.0, 4.5, 1.0]), target) is None


def test_one_channel_chosen_from_a_4d_file_keeps_the_radiological_flips(tmp_path):
    path = tmp_path / "sequences.nii.gz"
    data = np.random.default_rng(0).integers(0, 1000, (10, 12, 6, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), str(path))
    chosen = read_channels(path, [1])
    single = read_volume(path, channel=1)
    assert chosen.array.ndim == 3 and chosen.flips == single.flips == (False, True, True)
    np.testing.assert_array_equal(chosen.array, single.array)
    mask = np.zeros(chosen.shape, np.uint8)
    mask[2, 0, 0] = 1  # the displayed first row and column: the file's last j and last i for this RAS scan
    written = np.asanyarray(nib.load(str(write_volume(tmp_path / "mask.nii.gz", mask, like=chosen))).dataobj)
    np.testing.assert_array_equal(np.argwhere(written), [[9, 11, 2]])


def test_a_volume_is_an_immutable_value(tmp_path):
    import dataclasses

    volume = read_volume(_write_nrrd_image(tmp_path / "image.nrrd"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        volume.array = np.zeros(3)
    other = volume.with_array(np.zeros(volume.shape, np.uint8))
    np.testing.assert_array_equal(other.world_affine, volume.world_affine)


def test_label_arrays_without_geometry_round_trip_in_the_image_s_file_order(tmp_path):
    image = read_volume(_write_nrrd_image(tmp_path / "image.nrrd"))
    mask = np.zeros(image.shape, np.uint8)
    mask[3, 4, 5] = 2
    path = write_volume(tmp_path / "mask.npy", mask, like=image)
    assert np.load(path).shape == SHAPE_IJK  # the NRRD's own (i, j, k) order, as nrrd.read gives it
    np.testing.assert_array_equal(read_labels(path, like=image).array, mask)
    np.save(tmp_path / "wrong.npy", np.zeros(image.shape, np.uint8))  # the displayed order is not the file's
    wrong_order = r"labels have shape \(16, 24, 20\) but the image's voxels are \(20, 24, 16\)"
    with pytest.raises(VolumeError, match=wrong_order):
        read_labels(tmp_path / "wrong.npy", like=image)


SIGNED_PERMUTATIONS = st.tuples(st.permutations([0, 1, 2]), st.tuples(*[st.sampled_from([1, -1])] * 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=SIGNED_PERMUTATIONS, offset=st.tuples(st.integers(-2, 12), st.integers(-2, 12), st.integers(-2, 8)),
       seed=st.integers(0, 2**16))
def test_any_label_crop_in_any_voxel_order_lands_where_nibabel_puts_it(tmp_path, order, offset, seed):
    """Labels of random voxel order, flips and offset: each labelled voxel lands on the image voxel at its world
    point (by nibabel), or the file is refused because labelled voxels fall outside the image."""
    image = read_volume(tmp_path / "image.nrrd") if (tmp_path / "image.nrrd").exists() else \
        read_volume(_write_nrrd_image(tmp_path / "image.nrrd"))
    axes, signs = order
    crop = (np.random.default_rng(seed).random((6, 5, 4)) > 0.7).astype(np.uint8)
    # Label voxel l maps to image file voxel i = P l + offset, with P the signed permutation.
    permutation = np.zeros((4, 4))
    permutation[3, 3] = 1.0
    for label_axis, (image_axis, sign) in enumerate(zip(axes, signs)):
        permutation[image_axis, label_axis] = sign
    permutation[:3, 3] = offset
    labels_affine = image.affine @ permutation
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(crop, labels_affine), str(path))
    image_voxels = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine),
                                                    nib.affines.apply_affine(labels_affine, np.argwhere(crop))))
    inside = ((image_voxels >= 0) & (image_voxels < SHAPE_IJK)).all(axis=1)
    if not inside.all():
        with pytest.raises(VolumeError, match="do not lie on the image's voxel grid"):
            read_labels(path, like=image)
        return
    expected = np.zeros(SHAPE_IJK, np.uint8)
    expected[tuple(image_voxels.astype(int).T)] = 1
    np.testing.assert_array_equal(image.to_file_order(read_labels(path, like=image).array), expected)


def test_a_spacing_off_by_a_fraction_of_a_percent_is_refused_when_it_misplaces_voxels_across_the_grid():
    target = np.diag([1.0, 1.0, 1.0, 1.0])
    slightly_larger = np.diag([1.0008, 1.0, 1.0, 1.0])  # 0.08 %: 0.4 voxel off after 500 voxels
    assert grid_alignment(slightly_larger, target, (8, 8, 8)) is not None
    assert grid_alignment(slightly_larger, target, (500, 8, 8)) is None
