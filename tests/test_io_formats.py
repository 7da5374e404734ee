"""NRRD, Slicer .seg.nrrd, MHA, MGZ and DICOM through ``read_volume``/``read_labels``/``write_volume``, on the
real cases of ../shared/cases, checked against SimpleITK, pynrrd, slicerio and nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from napari_sam_ft.io.errors import VolumeError
from napari_sam_ft.io.volume import read_labels, read_volume, write_volume

CASES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
NRRD_CASES = {
    "lung1": ("pyradiomics_lung1_ct.nrrd", "pyradiomics_lung1_label.nrrd"),
    "brain2": ("pyradiomics_brain2_mr.nrrd", "pyradiomics_brain2_label.nrrd"),
    "ctchest": ("slicer_ctchest.nrrd", "slicer_ctchest.seg.nrrd"),
}


def case_path(name: str) -> Path:
    path = CASES_DIR / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the tests need ../shared/cases beside the repository (see its README)")
    return path


def _lps(point_ras) -> tuple[float, float, float]:
    return (-float(point_ras[0]), -float(point_ras[1]), float(point_ras[2]))


@pytest.mark.parametrize("case", sorted(NRRD_CASES))
def test_shared_nrrd_cases_have_simpleitk_s_world_geometry(case):
    image_path, labels_path = (case_path(name) for name in NRRD_CASES[case])
    volume = read_volume(image_path)
    reference = sitk.ReadImage(str(image_path))
    values = sitk.GetArrayFromImage(reference)  # (k, j, i)
    rng = np.random.default_rng(0)
    for _ in range(300):
        voxel = tuple(int(rng.integers(0, size)) for size in volume.shape)
        world = _lps(volume.world_affine @ (*voxel, 1.0))
        i, j, k = reference.TransformPhysicalPointToIndex(world)
        assert np.allclose(reference.TransformIndexToPhysicalPoint((i, j, k)), world, atol=1e-3)  # a voxel centre
        assert values[k, j, i] == volume.array[voxel]
    assert volume.spacing == pytest.approx(tuple(reference.GetSpacing()[axis] for axis in volume.file_axes))
    labels = read_labels(labels_path, like=volume)
    assert labels.shape == volume.shape and int((labels.array > 0).sum()) > 0


def test_brain2_lps_with_a_flipped_axis_is_shown_radiologically_like_its_nifti_copy(tmp_path):
    image_path = case_path("pyradiomics_brain2_mr.nrrd")
    copy = tmp_path / "brain2.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(image_path)), str(copy))
    from_nrrd, from_nifti = read_volume(image_path), read_volume(copy)
    assert from_nrrd.flips == from_nifti.flips == (False, True, False)  # j points anterior: shown top = anterior
    np.testing.assert_array_equal(from_nrrd.array, from_nifti.array)
    np.testing.assert_allclose(from_nrrd.world_affine, from_nifti.world_affine, atol=1e-4)
    labels_nrrd = read_labels(case_path("pyradiomics_brain2_label.nrrd"), like=from_nrrd)
    labels_copy = tmp_path / "brain2_label.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(case_path("pyradiomics_brain2_label.nrrd"))), str(labels_copy))
    np.testing.assert_array_equal(read_labels(labels_copy, like=from_nrrd).array, labels_nrrd.array)


def test_ctchest_seg_nrrd_keeps_segment_names_colours_and_voxels():
    image = read_volume(case_path("slicer_ctchest.nrrd"))
    seg_path = case_path("slicer_ctchest.seg.nrrd")
    labels = read_labels(seg_path, like=image)
    header = nrrd.read_header(str(seg_path))
    for index in range(7):
        class_id = int(header[f"Segment{index}_LabelValue"])
        assert labels.class_names[class_id] == header[f"Segment{index}_Name"]
        expected_colour = tuple(float(value) for value in header[f"Segment{index}_Color"].split())
        assert labels.class_colors[class_id] == pytest.approx(expected_colour)
    assert labels.class_names[5] == "right lung" and labels.class_names[6] == "left lung"
    segmentation = slicerio.read_segmentation(str(seg_path))
    for segment in segmentation["segments"]:
        mask = slicerio.segment_mask(segmentation, segment["id"])
        assert int((labels.array == segment["labelValue"]).sum()) == int(mask.sum())
    # The right lung lies on the patient's right: the left half of the radiological display (low x column).
    columns = np.argwhere(labels.array == 5)[:, 2]
    assert columns.mean() < image.shape[2] / 2


def test_overlapping_seg_nrrd_layers_become_one_label_map_on_the_image_grid(tmp_path):
    image = read_volume(case_path("slicer_ctchest.nrrd"))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    segmentation = slicerio.create_segmentation(image.file_shape, lps)
    first = np.zeros(image.file_shape, bool)
    first[10:40, 10:40, 5:10] = True
    second = np.zeros(image.file_shape, bool)
    second[30:60, 30:60, 8:12] = True  # overlaps the first: slicerio puts it on a second layer
    slicerio.add_segment(segmentation, first, {"name": "liver", "color": [0.8, 0.2, 0.2]})
    slicerio.add_segment(segmentation, second, {"name": "tumour", "color": [0.1, 0.9, 0.1]})
    assert segmentation["voxels"].ndim == 4
    path = tmp_path / "layers.seg.nrrd"
    slicerio.write_segmentation(str(path), segmentation)
    labels = read_labels(path, like=image)
    assert labels.class_names == {1: "liver", 2: "tumour"}
    file_order = image.to_file_order(labels.array)
    assert (file_order[second] == 2).all() and (file_order[first & ~second] == 1).all()
    assert int((file_order > 0).sum()) == int((first | second).sum())


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".nii.gz", ".mha"])
def test_masks_written_for_lung1_overlay_its_voxels_in_simpletik_and_keep_lps_nrrd_headers(tmp_path, suffix):
    image_path = case_path("pyradiomics_lung1_ct.nrrd")
    image = read_volume(image_path)
    reference = read_labels(case_path("pyradiomics_lung1_label.nrrd"), like=image)
    written = write_volume(tmp_path / f"lesion{suffix}", reference.array, like=image, class_names={1: "lesion"},
                           class_colors={1: (0.9, 0.1, 0.1)})
    ours = sitk.ReadImage(str(written))
    truth = sitk.ReadImage(str(case_path("pyradiomics_lung1_label.nrrd")))
    np.testing.assert_allclose(ours.GetOrigin(), truth.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(ours.GetDirection(), truth.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(ours.GetSpacing(), truth.GetSpacing(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours) > 0, sitk.GetArrayFromImage(truth) > 0)
    if suffix.endswith("nrrd"):
        header, image_header = nrrd.read_header(str(written)), nrrd.read_header(str(image_path))
        assert header["space"] == "left-posterior-superior"
        np.testing.assert_allclose(header["space directions"], image_header["space directions"])
        np.testing.assert_allclose(header["space origin"], image_header["space origin"])
    if suffix == ".seg.nrrd":
        segmentation = slicerio.read_segmentation(str(written))
        [segment] = segmentation["segments"]
        assert segment["name"] == "lesion" and segment["color"] == pytest.approx([0.9, 0.1, 0.1])
        assert read_labels(written, like=image).class_names == {1: "lesion"}


def test_mgz_reads_and_writes_in_nibabel_s_geometry(tmp_path):
    source = nib.load(str(case_path("mni152_aal_amygdala_pallidum_hippocampus.nii.gz")))
    mgz_path = tmp_path / "aal.mgz"
    nib.save(nib.MGHImage(np.asanyarray(source.dataobj).astype(np.uint8), source.affine), str(mgz_path))
    volume = read_volume(mgz_path, check_values=False)
    np.testing.assert_array_equal(volume.array, read_volume(case_path(
        "mni152_aal_amygdala_pallidum_hippocampus.nii.gz"), check_values=False).array)
    written = nib.load(str(write_volume(tmp_path / "mask.mgz", (np.asarray(volume.array) == 3).astype(np.uint8),
                                        like=volume)))
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj) > 0, np.asanyarray(source.dataobj) == 3)


def _nrrd_with_space(path: Path, space_fields: dict) -> Path:
    data = np.random.default_rng(1).integers(0, 500, (9, 10, 6)).astype(np.int16)
    header = {"kinds": ["domain"] * 3, "space directions": np.array([[1.5, 0, 0], [0, -1.0, 0], [0, 0, 2.0]]),
              "space origin": np.array([3.0, 4.0, -5.0]), **space_fields}
    nrrd.write(str(path), data, header, index_order="F")
    return path


@pytest.mark.parametrize("space_fields", [{"space": "right-anterior-superior"}, {"space": "left-anterior-superior"},
                                          {"space": "LPS"}, {"space": "scanner-xyz"}, {"space dimension": 3}],
                         ids=["RAS", "LAS", "LPS-abbreviated", "scanner-xyz", "no-space"])
def test_nrrd_spaces_give_simpleitk_s_world_points(tmp_path, space_fields):
    path = _nrrd_with_space(tmp_path / "space.nrrd", space_fields)
    volume = read_volume(path)
    reference = sitk.ReadImage(str(path))
    for voxel in [(0, 0, 0), (5, 9, 8), (2, 3, 4)]:
        world = _lps(volume.world_affine @ (*voxel, 1.0))
        index = reference.TransformPhysicalPointToIndex(world)
        np.testing.assert_allclose(reference.TransformIndexToPhysicalPoint(index), world, atol=1e-4)
        assert sitk.GetArrayFromImage(reference)[index[::-1]] == volume.array[voxel]


def test_a_vector_nrrd_gives_channels_and_a_2d_or_damaged_nrrd_one_clear_message(tmp_path):
    data = np.random.default_rng(2).integers(0, 100, (3, 8, 9, 5)).astype(np.uint8)
    vector = tmp_path / "vector.nrrd"
    nrrd.write(str(vector), data, {"space": "left-posterior-superior",
                                   "kinds": ["vector", "domain", "domain", "domain"],
                                   "space directions": np.array([[np.nan] * 3, [1, 0, 0], [0, 1, 0], [0, 0, 1.0]])},
               index_order="F")
    with pytest.raises(VolumeError, match="4D"):
        read_volume(vector)
    channel = read_volume(vector, channel=2)
    np.testing.assert_array_equal(channel.to_file_order(channel.array), data[2])
    flat = tmp_path / "flat.nrrd"
    nrrd.write(str(flat), np.ones((8, 9), np.uint8), index_order="F")
    with pytest.raises(VolumeError, match="flat.nrrd: is 2D"):
        read_volume(flat)
    damaged = tmp_path / "damaged.nrrd"
    damaged.write_bytes(vector.read_bytes().replace(b"sizes: 3 8 9 5", b"sizes: 3 8 9 500"))
    with pytest.raises(VolumeError, match="damaged.nrrd: cannot read this nrrd file"):
        read_volume(damaged)


def test_a_dicom_folder_is_read_through_the_dicom_reader_and_nifti_labels_align_to_it(tmp_path):
    from dicom_series import ct_crop, write_ct_series

    hounsfield, affine, _ = ct_crop(size=(32, 28, 6))
    series = write_ct_series(tmp_path / "series", hounsfield, affine)
    volume = read_volume(tmp_path / "series")
    assert volume.file_format == "dicom" and volume.header.series_uid == series["series_uid"]
    assert read_volume(series["files"][0]).shape == volume.shape  # one file of the series opens the series
    with pytest.raises(VolumeError, match="is not a DICOM series"):
        read_volume(case_path("slicer_ctchest.nrrd"), series_uid=series["series_uid"])
    # NIfTI labels in the same world, in the file's own (RAS) voxel order, land on the DICOM display.
    labels_ijk = (hounsfield > np.percentile(hounsfield, 80)).astype(np.uint8)
    labels_path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(labels_ijk, affine), str(labels_path))
    labels = read_labels(labels_path, like=volume)
    np.testing.assert_array_equal(volume.to_file_order(labels.array), labels_ijk)


def _box_prompt_file(path: Path, labels_zyx: np.ndarray, slice_index: int, class_id: int) -> Path:
    from napari_sam_ft.engine.prompts import box_from_mask

    box = [float(value) for value in box_from_mask(labels_zyx[slice_index] == class_id)]
    path.write_text(json.dumps([{"slice": slice_index, "label": 1, "box": box}]))
    return path


def test_cli_segment_writes_every_mask_format_over_an_nrrd_image(tmp_path, capsys):
    from napari_sam_ft.cli import main

    image_path = case_path("slicer_ctchest.nrrd")
    image = read_volume(image_path)
    reference = read_labels(case_path("slicer_ctchest.seg.nrrd"), like=image)
    slice_index = int(np.argmax((reference.array == 5).sum(axis=(1, 2))))
    prompts = _box_prompt_file(tmp_path / "prompts.json", reference.array, slice_index, 5)
    points = {}
    for suffix in (".nii.gz", ".nrrd", ".seg.nrrd"):
        output = tmp_path / f"lung{suffix}"
        assert main(["segment", str(image_path), "--prompts", str(prompts), "-o", str(output)]) == 0
        mask = sitk.ReadImage(str(output))
        indices = np.argwhere(sitk.GetArrayFromImage(mask) > 0)
        points[suffix] = {tuple(np.round(mask.TransformIndexToPhysicalPoint(tuple(int(v) for v in index[::-1])), 2))
                          for index in indices}
    assert points[".nii.gz"] == points[".nrrd"] == points[".seg.nrrd"] and points[".nrrd"]
    # The mask overlays the right lung of the Slicer segmentation in SimpleITK's world.
    truth = sitk.ReadImage(str(case_path("slicer_ctchest.seg.nrrd")))
    truth_values = sitk.GetArrayFromImage(truth)
    under = np.array([truth_values[truth.TransformPhysicalPointToIndex(point)[::-1]] for point in points[".nrrd"]])
    assert np.mean(under == 5) > 0.75 and np.mean(under == 6) == 0.0  # a mirrored mask would lie on the left lung
    capsys.readouterr()


def test_cli_evaluate_an_nrrd_image_against_its_seg_nrrd_names_the_segments(capsys):
    from napari_sam_ft.cli import main

    # Two slices through the middle of both lungs (128 x 128 at 3 mm: zero-shot boxes give Dice ~0.8 there).
    assert main(["evaluate", str(case_path("slicer_ctchest.nrrd")), str(case_path("slicer_ctchest.seg.nrrd")),
                 "--slices", "19:21", "--classes", "5,6", "--window", "lung", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(report["per_class"]) == {"right lung", "left lung"}
    assert min(entry["dice"] for entry in report["per_class"].values()) > 0.6  # a mirrored lung would score ~0


def test_cli_segment_over_a_dicom_series_writes_a_dicom_seg_that_overlays_like_the_nifti_mask(tmp_path, capsys):
    from dicom_series import ct_crop, write_ct_series

    from napari_sam_ft.cli import main

    hounsfield, affine, organs = ct_crop(size=(64, 64, 6))
    write_ct_series(tmp_path / "series", hounsfield, affine)
    image = read_volume(tmp_path / "series")
    reference = read_labels(_nifti_labels(tmp_path / "organs.nii.gz", organs, affine), like=image)
    class_id = int(np.bincount(reference.array[3].ravel())[1:].argmax()) + 1  # the largest organ on slice 3
    prompts = _box_prompt_file(tmp_path / "prompts.json", reference.array, 3, class_id)
    for output in ("mask.nii.gz", "mask.dcm"):
        assert main(["segment", str(tmp_path / "series"), "--prompts", str(prompts), "-o",
                     str(tmp_path / output)]) == 0
    nifti_mask = read_labels(tmp_path / "mask.nii.gz", like=image)
    dicom_seg = read_labels(tmp_path / "mask.dcm", like=image)
    assert int(nifti_mask.array.sum()) > 0
    np.testing.assert_array_equal(dicom_seg.array > 0, nifti_mask.array > 0)
    # SimpleITK's reading of the DICOM series puts the NIfTI mask on the same organ voxels as our display does.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    series = reader.Execute()
    mask = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    organ_world = {tuple(np.round(mask.TransformIndexToPhysicalPoint(tuple(int(v) for v in index[::-1])), 2))
                   for index in np.argwhere(sitk.GetArrayFromImage(mask) > 0)}
    on_series = [series.TransformPhysicalPointToIndex(point) for point in organ_world]
    organ_ijk = organs == class_id
    precision_in_simpleitk = np.mean([organ_ijk[index] for index in on_series])
    precision_displayed = np.mean(reference.array[nifti_mask.array > 0] == class_id)
    assert precision_displayed > 0.1 and precision_in_simpleitk == pytest.approx(precision_displayed)
    capsys.readouterr()


def _nifti_labels(path: Path, labels_ijk: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(labels_ijk, np.uint8), affine), str(path))
    return path


def test_a_detached_nhdr_reads_like_simpleitk_and_detached_outputs_are_refused(tmp_path):
    data = np.random.default_rng(3).integers(0, 900, (10, 11, 7)).astype(np.int16)
    header_path = tmp_path / "scan.nhdr"
    nrrd.write(str(header_path), data, {"space": "left-posterior-superior", "kinds": ["domain"] * 3,
                                        "space directions": np.diag([-0.9, 0.9, 2.0]),
                                        "space origin": np.array([1.0, 2.0, 3.0])},
               detached_header=True, index_order="F")
    assert len(list(tmp_path.iterdir())) == 2  # the header and its data file
    volume = read_volume(header_path)
    reference = sitk.ReadImage(str(header_path))
    voxel = (3, 4, 5)
    index = reference.TransformPhysicalPointToIndex(_lps(volume.world_affine @ (*voxel, 1.0)))
    assert sitk.GetArrayFromImage(reference)[index[::-1]] == volume.array[voxel]
    for suffix, single in ((".nhdr", ".nrrd"), (".mhd", ".mha")):
        with pytest.raises(VolumeError, match=f"write {single} \\(one file\\)"):
            write_volume(tmp_path / f"mask{suffix}", np.zeros(volume.shape, np.uint8), like=volume)


def test_nrrd_labels_reordered_by_simpleitk_align_to_a_nifti_image(tmp_path):
    image_copy = tmp_path / "brain2.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(case_path("pyradiomics_brain2_mr.nrrd"))), str(image_copy))
    image = read_volume(image_copy)
    labels_source = sitk.ReadImage(str(case_path("pyradiomics_brain2_label.nrrd")))
    # SimpleITK moves the voxels and keeps every voxel's physical point: another voxel order, one world.
    reordered = sitk.Flip(sitk.PermuteAxes(labels_source, [2, 0, 1]), [True, False, True])
    reordered_path = tmp_path / "label_kij.nrrd"
    sitk.WriteImage(reordered, str(reordered_path))
    assert nrrd.read_header(str(reordered_path))["sizes"].tolist() == [23, 256, 256]
    aligned = read_labels(reordered_path, like=image)
    np.testing.assert_array_equal(aligned.array, read_labels(case_path("pyradiomics_brain2_label.nrrd"),
                                                             like=image).array)
    assert int(aligned.array.sum()) > 0


def test_a_slicer_segmentation_stored_on_its_extent_lands_on_the_full_image_grid(tmp_path):
    """Slicer may store a .seg.nrrd cropped to its segments (another origin and size); it still overlays."""
    image = read_volume(case_path("slicer_ctchest.nrrd"))
    full = slicerio.read_segmentation(str(case_path("slicer_ctchest.seg.nrrd")))
    start = np.array([20, 30, 5])
    cropped = dict(full)
    cropped["voxels"] = full["voxels"][20:100, 30:90, 5:30].copy()
    cropped["ijkToLPS"] = np.array(full["ijkToLPS"], dtype=float)
    cropped["ijkToLPS"][:3, 3] = (cropped["ijkToLPS"] @ (*start, 1.0))[:3]
    cropped["referenceImageExtentOffset"] = [int(value) for value in start]
    cropped["segments"] = [{key: value for key, value in segment.items() if key != "extent"}
                           for segment in full["segments"]]
    path = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(path), cropped)
    labels = read_labels(path, like=image)
    expected = np.zeros(image.file_shape, np.uint16)
    expected[20:100, 30:90, 5:30] = full["voxels"][20:100, 30:90, 5:30]
    np.testing.assert_array_equal(image.to_file_order(labels.array), expected)
    assert labels.class_names[6] == "left lung"
