"""A mask painted in napari and saved through the plugin overlays the scan in world coordinates.

For each scan (NIfTI, NRRD LPS with negative directions, a shuffled DICOM series, an oblique NIfTI) a mask is
painted at known voxels in a layer made by ``viewer.add_labels`` and in one made by napari's own *new labels
layer* action, saved through napari's writer machinery, and read back with SimpleITK (never our reader): each
painted voxel's world point must fall on the scan voxel that was under the brush. The painted voxels are
chosen so that their image values differ from every mirrored or shifted voxel's, so a flip, transpose or
offset cannot pass.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from napari_sam_ft.sample import sample_paths
from napari_sam_ft._writer import SaveRefused

PLUGIN = "napari-sam-ft"
CASES = Path(__file__).resolve().parents[2].parent / "shared" / "cases"
pytestmark = pytest.mark.gui


def case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the geometry tests need ../shared/cases beside the repository", pytrace=False)
    return path


def distinctive_voxels(data: np.ndarray, count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Voxels whose value differs from that of every mirror image (flips of any axes) and of their 6 neighbours."""
    rng = np.random.default_rng(seed)
    shape = np.array(data.shape)
    chosen: list[tuple[int, int, int]] = []
    for _ in range(20000):
        voxel = tuple(int(rng.integers(1, size - 1)) for size in shape)
        value = data[voxel]
        mirrors = {tuple(np.where(flips, shape - 1 - np.array(voxel), voxel)) for flips in product((0, 1), repeat=3)}
        neighbours = {tuple(np.array(voxel) + step) for axis in range(3) for step in np.eye(3, dtype=int)[axis] * [[1], [-1]]}
        others = (mirrors | neighbours) - {voxel}
        if all(data[other] != value for other in others) and voxel not in chosen:
            chosen.append(voxel)
            if len(chosen) == count:
                return chosen
    raise AssertionError("the test volume has too few distinctive voxels")


def labels_by_add_labels(viewer, image):
    return viewer.add_labels(np.zeros(image.data.shape, np.uint16), scale=image.scale, translate=image.translate)


def labels_by_new_labels_action(viewer, image):
    viewer.layers.selection.active = image
    viewer._new_labels()  # what the layer list's "New labels layer" button runs
    return viewer.layers[-1]


MAKERS = [labels_by_add_labels, labels_by_new_labels_action]


def paint(labels, voxels) -> dict[int, tuple[int, int, int]]:
    """Paint voxel n with label n + 1 through the Labels brush (size 1); returns label -> voxel."""
    labels.brush_size = 1
    painted = {}
    for index, voxel in enumerate(voxels):
        labels.selected_label = index + 1
        labels.paint(voxel, index + 1)
        painted[index + 1] = voxel
    assert np.count_nonzero(labels.data) == len(voxels)
    return painted


def save(viewer, labels, path: Path) -> Path:
    viewer.layers.selection.active = labels
    written = viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    assert written == [str(path)]
    return path


def assert_overlays(mask_path: Path, scan: sitk.Image, image_layer, painted: dict) -> None:
    """Each painted label lies, by SimpleITK's geometry of both files, on the scan voxel under the brush."""
    mask = sitk.ReadImage(str(mask_path))
    mask_voxels = sitk.GetArrayViewFromImage(mask)  # (k, j, i)
    scan_voxels = sitk.GetArrayViewFromImage(scan)
    for label, voxel in painted.items():
        [(k, j, i)] = np.argwhere(mask_voxels == label)
        world = mask.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        continuous = np.array(scan.TransformPhysicalPointToContinuousIndex(world))
        np.testing.assert_allclose(continuous, np.rint(continuous), atol=1e-3)  # on a scan voxel centre
        si, sj, sk = (int(value) for value in np.rint(continuous))
        assert scan_voxels[sk, sj, si] == image_layer.data[voxel], (label, voxel, (si, sj, sk))


def paint_save_check(viewer, image, make_labels, path: Path, scan: sitk.Image, count: int = 4) -> dict:
    labels = make_labels(viewer, image)
    painted = paint(labels, distinctive_voxels(np.asarray(image.data), count))
    assert_overlays(save(viewer, labels, path), scan, image, painted)
    return painted


@pytest.mark.parametrize("make_labels", MAKERS)
def test_nifti_mask_overlays_the_sample_mr(make_napari_viewer, tmp_path, make_labels):
    viewer = make_napari_viewer()
    mr_path, _ = sample_paths("mr")
    [image] = viewer.open(str(mr_path), plugin=PLUGIN)
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nii.gz", sitk.ReadImage(str(mr_path)))
    assert nib.load(str(tmp_path / "mask.nii.gz")).shape == nib.load(str(mr_path)).shape


@pytest.mark.parametrize("make_labels", MAKERS)
def test_nrrd_lps_mask_with_negative_directions_overlays_the_scan(make_napari_viewer, tmp_path, make_labels):
    viewer = make_napari_viewer()
    ct_path = case("slicer_ctchest.nrrd")
    [image] = viewer.open(str(ct_path), plugin=PLUGIN)
    scan = sitk.ReadImage(str(ct_path))
    assert (np.diag(np.array(scan.GetDirection()).reshape(3, 3))[:2] < 0).all()  # the point of this case
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nrrd", scan)
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nii.gz", scan)


def test_seg_nrrd_mask_overlays_the_scan_and_keeps_class_names(make_napari_viewer, tmp_path):
    import slicerio

    viewer = make_napari_viewer()
    ct_path = case("slicer_ctchest.nrrd")
    [image] = viewer.open(str(ct_path), plugin=PLUGIN)
    labels = labels_by_new_labels_action(viewer, image)
    painted = paint(labels, distinctive_voxels(np.asarray(image.data), 2))
    labels.features = pd.DataFrame({"index": [0, 1, 2], "name": ["background", "nodule", "vessel"]})
    path = save(viewer, labels, tmp_path / "mask.seg.nrrd")
    assert_overlays(path, sitk.ReadImage(str(ct_path)), image, painted)
    names = {segment["labelValue"]: segment["name"] for segment in slicerio.read_segmentation(str(path))["segments"]}
    assert names == {1: "nodule", 2: "vessel"}


def unique_volume(shape_ijk, low: int = -1000) -> np.ndarray:
    """Every voxel a different value (so a voxel is known by its value), as a scan would hold HU."""
    return (np.arange(np.prod(shape_ijk)).reshape(shape_ijk, order="F") + low).astype(np.int16)


@pytest.mark.parametrize("make_labels", MAKERS)
def test_dicom_series_mask_overlays_the_series(make_napari_viewer, tmp_path, make_labels):
    from dicom_series import write_ct_series

    # A scanner's axial series: columns run to the patient's left, rows to posterior (LPS +x, +y).
    affine = np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    series = write_ct_series(tmp_path / "series", unique_volume((24, 20, 6)), affine)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "series"), plugin=PLUGIN)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series"), series["series_uid"]))
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nii.gz", reader.Execute())


@pytest.mark.parametrize("make_labels", MAKERS)
def test_oblique_nifti_mask_keeps_the_oblique_geometry(make_napari_viewer, tmp_path, make_labels, notifications):
    angle = np.deg2rad(20.0)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine = rotation @ np.array([[1.2, 0, 0, -20.0], [0, 1.0, 0, 10.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    scan_path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(unique_volume((22, 18, 7)), affine), str(scan_path))
    viewer = make_napari_viewer()
    [image] = viewer.open(str(scan_path), plugin=PLUGIN)
    assert any("oblique" in str(note.message) for note in notifications)  # the user is told
    scan = sitk.ReadImage(str(scan_path))
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nii.gz", scan)
    np.testing.assert_allclose(nib.load(str(tmp_path / "mask.nii.gz")).affine, affine, atol=1e-5)
    paint_save_check(viewer, image, make_labels, tmp_path / "mask.nrrd", scan)  # LPS space directions, tilted


def test_a_labels_layer_off_the_scan_grid_is_refused_with_the_reason(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    mr_path, _ = sample_paths("mr")
    [image] = viewer.open(str(mr_path), plugin=PLUGIN)
    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8))  # no scale or translate: not on the scan
    labels.data[5, 40, 40] = 1
    viewer.layers.selection.active = labels
    with pytest.raises(SaveRefused, match="voxel grid of no open scan") as refused:
        viewer.layers.save(str(tmp_path / "mask.nii.gz"), selected=True, plugin=PLUGIN)
    assert "example_mr_sm" in str(refused.value)
    assert not (tmp_path / "mask.nii.gz").exists()


def test_dicom_seg_of_a_painted_mask_references_the_images_under_the_brush(make_napari_viewer, tmp_path):
    """The SEG's frames, read with pydicom alone, put each painted voxel on the source image it was painted on."""
    import pydicom
    from dicom_series import write_ct_series

    affine = np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    series = write_ct_series(tmp_path / "series", unique_volume((24, 20, 6)), affine)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "series"), plugin=PLUGIN)
    labels = labels_by_new_labels_action(viewer, image)
    painted = paint(labels, distinctive_voxels(np.asarray(image.data), 3))
    seg = pydicom.dcmread(str(save(viewer, labels, tmp_path / "mask.dcm")))
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["series_uid"]
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(str(path)) for path in series["files"])}
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, float)
    tracking = {int(item.SegmentNumber): str(item.TrackingID) for item in seg.SegmentSequence}
    for frame, group in zip(seg.pixel_array.reshape(-1, seg.Rows, seg.Columns), seg.PerFrameFunctionalGroupsSequence):
        label = int(tracking[int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)].split()[-1])
        [(row, column)] = np.argwhere(frame)
        position = np.array(group.PlanePositionSequence[0].ImagePositionPatient, float)
        source_uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        source = sources[source_uid]
        # The frame lies on its source image's pixel grid, so (row, column) is the same pixel in both.
        np.testing.assert_allclose(np.array(source.ImagePositionPatient, float), position, atol=1e-3)
        np.testing.assert_allclose(np.array(source.ImageOrientationPatient, float), orientation, atol=1e-6)
        np.testing.assert_allclose(np.array(source.PixelSpacing, float), spacing, atol=1e-6)
        value = source.pixel_array[row, column] * float(source.RescaleSlope) + float(source.RescaleIntercept)
        assert value == image.data[painted[label]], (label, painted[label])
    [reopened] = viewer.open(str(tmp_path / "mask.dcm"), plugin=PLUGIN)  # a SEG opens over its series
    np.testing.assert_array_equal(reopened.data, labels.data)


def test_nifti_labels_on_a_crop_of_an_nrrd_scan_open_on_the_scan(make_napari_viewer, tmp_path):
    """A label file in another format, voxel order and extent (a crop) is put on the open scan's grid by world
    geometry; SimpleITK writes the crop and says which scan voxels it labels."""
    ct_path = case("slicer_ctchest.nrrd")
    scan = sitk.ReadImage(str(ct_path))
    scan_voxels = sitk.GetArrayFromImage(scan)  # (k, j, i)
    voxels = distinctive_voxels(scan_voxels, 3, seed=1)
    mask = sitk.Image(scan.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(scan)
    for label, (k, j, i) in enumerate(voxels, start=1):
        mask[i, j, k] = label
    low = np.min([voxel[::-1] for voxel in voxels], axis=0) - 2
    high = np.max([voxel[::-1] for voxel in voxels], axis=0) + 3
    low, high = np.maximum(low, 0), np.minimum(high, scan.GetSize())
    crop = sitk.RegionOfInterest(mask, [int(value) for value in high - low], [int(value) for value in low])
    sitk.WriteImage(crop, str(tmp_path / "crop_labels.nii.gz"))
    viewer = make_napari_viewer()
    [image] = viewer.open(str(ct_path), plugin=PLUGIN)
    [labels] = viewer.open(str(tmp_path / "crop_labels.nii.gz"), plugin=PLUGIN)
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.translate, image.translate)
    for label, (k, j, i) in enumerate(voxels, start=1):
        [displayed] = np.argwhere(np.asarray(labels.data) == label)
        assert image.data[tuple(displayed)] == scan_voxels[k, j, i]


def test_two_scans_of_one_patient_space_overlay_in_napari_whatever_their_extent(make_napari_viewer, tmp_path):
    """A crop of the MR (made with nibabel: file voxel (i, j, k) is the MR's (i + 10, j + 20, k + 3)) lies on the
    MR in napari's world, along the flipped axes too."""
    mr_path, _ = sample_paths("mr")
    mr = nib.load(str(mr_path))
    affine = mr.affine.copy()
    affine[:3, 3] = (mr.affine @ np.array([10, 20, 3, 1.0]))[:3]
    nib.save(nib.Nifti1Image(np.asanyarray(mr.dataobj)[10:70, 20:75, 3:15], affine), str(tmp_path / "crop.nii.gz"))
    viewer = make_napari_viewer()
    [full] = viewer.open(str(mr_path), plugin=PLUGIN)
    [crop] = viewer.open(str(tmp_path / "crop.nii.gz"), plugin=PLUGIN)
    for voxel in distinctive_voxels(np.asarray(crop.data), 4):
        on_full = np.rint(full.world_to_data(crop.data_to_world(voxel))).astype(int)
        assert full.data[tuple(on_full)] == crop.data[voxel], (voxel, on_full)
