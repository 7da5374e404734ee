"""The npe2 reader, writers and sample data without a viewer: geometry survives a round trip."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_sam_ft._layer_data import GEOMETRY_KEY, volume_from_layer
from napari_sam_ft._reader import NO_LAYERS, get_reader, read_layers
from napari_sam_ft._sample_data import make_ct_sample, make_mr_sample
from napari_sam_ft._writer import write_image, write_labels
from napari_sam_ft.sample import sample_paths
from napari_sam_ft.volume import VolumeError


@pytest.fixture
def notifications():
    from napari.utils.notifications import notification_manager

    messages: list[str] = []

    def record(notification):
        messages.append(str(notification.message))

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)


def read_one(path):
    reader = get_reader(str(path))
    assert reader is not None
    layers = reader(str(path))
    assert len(layers) == 1
    return layers[0]


def test_reader_claims_only_what_it_can_read(tmp_path):
    ct_path, _ = sample_paths("ct")
    assert get_reader(str(ct_path)) is read_layers
    assert get_reader([str(ct_path)]) is read_layers
    assert get_reader(str(tmp_path / "picture.png")) is None
    assert get_reader([str(ct_path), str(ct_path)]) is None
    np.save(tmp_path / "slice.npy", np.zeros((32, 32), np.float32))
    np.save(tmp_path / "photo.npy", np.zeros((32, 32, 3), np.uint8))
    np.save(tmp_path / "stack.npy", np.zeros((4, 32, 32), np.float32))
    assert get_reader(str(tmp_path / "slice.npy")) is None and get_reader(str(tmp_path / "photo.npy")) is None
    assert get_reader(str(tmp_path / "stack.npy")) is read_layers
    assert get_reader(str(tmp_path)) is None  # a folder without DICOM


def test_ct_opens_as_an_image_with_scale_translate_and_geometry():
    ct_path, labels_path = sample_paths("ct")
    data, meta, layer_type = read_one(ct_path)
    assert layer_type == "image" and data.shape == (30, 101, 122)
    assert meta["scale"] == (3.0, 3.0, 3.0)
    affine = nib.load(str(ct_path)).affine
    # Z is the file's third voxel axis; the RAS file is shown radiologically (anterior up, patient right on
    # the left), so the displayed first voxel is the file's last along I and J, and napari's world axes are
    # (S, P, L): the patient axes growing with the displayed index.
    first_voxel = affine @ np.array([121, 100, 0, 1.0])
    assert meta["translate"] == pytest.approx((first_voxel[2], -first_voxel[1], -first_voxel[0]))
    np.testing.assert_array_equal(data[0, 0, :3], np.asanyarray(nib.load(str(ct_path)).dataobj)[121:118:-1, 100, 0])
    geometry = meta["metadata"][GEOMETRY_KEY]
    np.testing.assert_array_equal(geometry["affine"], affine)
    assert geometry["file_axes"] == (2, 1, 0)
    assert meta["contrast_limits"] == pytest.approx((-160.0, 240.0))  # the CT soft-tissue window

    labels, labels_meta, labels_type = read_one(labels_path)
    assert labels_type == "labels" and labels.dtype == np.uint8 and labels.shape == data.shape
    assert labels_meta["scale"] == meta["scale"] and labels_meta["translate"] == meta["translate"]


def test_labels_written_back_match_the_source_file_voxel_for_voxel(tmp_path):
    _, labels_path = sample_paths("ct")
    data, meta, _ = read_one(labels_path)
    written = write_labels(str(tmp_path / "mask.nii.gz"), data, meta)
    assert written == [str(tmp_path / "mask.nii.gz")]
    source, result = nib.load(str(labels_path)), nib.load(written[0])
    np.testing.assert_array_equal(result.affine, source.affine)
    np.testing.assert_array_equal(np.asanyarray(result.dataobj), np.asanyarray(source.dataobj))  # file voxel order
    assert result.get_data_dtype() == np.uint8


def test_a_drawn_mask_round_trips_through_nifti_with_the_image_geometry(tmp_path):
    ct_path, _ = sample_paths("ct")
    _, image_meta, _ = read_one(ct_path)
    mask = np.zeros((30, 101, 122), np.int32)
    mask[10:20, 30:60, 40:90] = 3
    mask[15, 0, 0] = 300  # needs uint16
    path = tmp_path / "drawn.nii"
    write_labels(str(path), mask, {"metadata": image_meta["metadata"], "scale": image_meta["scale"]})
    assert nib.load(str(path)).get_data_dtype() == np.uint16
    np.testing.assert_array_equal(nib.load(str(path)).affine, nib.load(str(ct_path)).affine)
    data, meta, layer_type = read_one(path)
    assert layer_type == "labels"
    np.testing.assert_array_equal(data, mask)
    assert meta["scale"] == image_meta["scale"] and meta["translate"] == image_meta["translate"]


@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_layers_without_stored_geometry_are_written_with_their_scale(tmp_path, suffix):
    mask = np.zeros((6, 20, 24), np.uint8)
    mask[2:4, 5:15, 6:18] = 1
    path = tmp_path / f"mask{suffix}"
    write_labels(str(path), mask, {"metadata": {}, "scale": (2.0, 0.5, 0.5), "translate": (0.0, 0.0, 0.0)})
    data, meta, layer_type = read_one(path)
    assert layer_type == "labels"
    np.testing.assert_array_equal(data, mask)
    if suffix == ".tif":  # TIFF keeps the spacing (ImageJ metadata); .npy has none
        assert meta["scale"] == pytest.approx((2.0, 0.5, 0.5))


def test_image_writer_keeps_values_and_affine(tmp_path):
    mr_path, _ = sample_paths("mr")
    data, meta, _ = read_one(mr_path)
    path = tmp_path / "mr_copy.nii.gz"
    write_image(str(path), data, meta)
    np.testing.assert_array_equal(nib.load(str(path)).affine, nib.load(str(mr_path)).affine)
    written, source = nib.load(str(path)), nib.load(str(mr_path))
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.asanyarray(source.dataobj))


def test_samples_give_an_image_and_its_reference_labels():
    for make, shape in ((make_ct_sample, (30, 101, 122)), (make_mr_sample, (20, 91, 117))):
        (image, image_meta, image_type), (labels, labels_meta, labels_type) = make()
        assert (image_type, labels_type) == ("image", "labels")
        assert image.shape == labels.shape == shape
        assert labels_meta["scale"] == image_meta["scale"]
        assert labels_meta["metadata"]["class_names"]
    (_, _, _), (labels, meta, _) = make_ct_sample()
    assert meta["metadata"]["class_names"][1] == "spleen" and (labels == 1).any()


def test_a_4d_nifti_opens_each_channel_as_a_3d_layer_that_reopens_as_that_channel(tmp_path):
    path = tmp_path / "series.nii.gz"
    data = np.random.default_rng(0).random((8, 9, 6, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    layers = read_layers(str(path))
    assert [meta["name"] for _, meta, _ in layers] == [f"series [channel {c}]" for c in range(3)]
    for channel, (array, meta, layer_type) in enumerate(layers):
        assert layer_type == "image" and array.shape == (6, 9, 8)
        assert meta["metadata"][GEOMETRY_KEY]["channel"] == channel
        again, _, _ = read_layers(str(path))[channel]
        np.testing.assert_array_equal(array, again)
        # The displayed (z, y, x) volume is the file's channel, transposed and flipped as for any RAS scan.
        np.testing.assert_array_equal(np.asarray(array), np.transpose(data[..., channel], (2, 1, 0))[:, ::-1, ::-1])


def test_a_vector_nrrd_opens_each_channel_as_a_3d_layer(tmp_path):
    import nrrd

    data = np.random.default_rng(0).random((2, 10, 9, 5)).astype(np.float32)  # (channel, i, j, k)
    directions = np.array([[np.nan] * 3, [1.0, 0, 0], [0, 1.0, 0], [0, 0, 2.0]])
    nrrd.write(str(tmp_path / "dwi.nrrd"), data, {"kinds": ["vector", "domain", "domain", "domain"],
                                                   "space": "left-posterior-superior", "space directions": directions})
    layers = read_layers(str(tmp_path / "dwi.nrrd"))
    assert [meta["name"] for _, meta, _ in layers] == ["dwi [channel 0]", "dwi [channel 1]"]
    assert [meta["metadata"][GEOMETRY_KEY]["channel"] for _, meta, _ in layers] == [0, 1]
    assert all(array.shape == (5, 9, 10) for array, _, _ in layers)


def test_a_damaged_file_gives_one_notification(tmp_path, notifications):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file")
    assert read_layers(str(path)) == NO_LAYERS
    assert len(notifications) == 1 and "broken.nii.gz" in notifications[0]


def test_an_8_bit_scan_opens_as_an_image_and_a_mask_as_labels(tmp_path):
    """An 8-bit scan has fewer grey levels than MAX_LABEL_IDS: the reader must still call it an Image."""
    mr_path, labels_path = sample_paths("mr")
    mr = nib.load(str(mr_path))
    values = np.asanyarray(mr.dataobj).astype(np.float32)
    scan_8bit = np.rint(255 * (values - values.min()) / (values.max() - values.min())).astype(np.uint8)
    path = tmp_path / "t1_8bit.nii.gz"
    nib.save(nib.Nifti1Image(scan_8bit, mr.affine), str(path))
    assert read_one(path)[2] == "image"
    assert read_one(labels_path)[2] == "labels"


def test_layer_data_that_is_not_3d_is_refused():
    with pytest.raises(VolumeError, match="4D"):
        volume_from_layer(np.zeros((2, 3, 4, 5)), {})
    with pytest.raises(VolumeError, match="2D"):
        volume_from_layer(np.zeros((3, 4)), {})


def test_a_nifti_layer_saved_as_tiff_holds_the_scans_file_voxel_order(tmp_path):
    """TIFF has no world geometry: like write_volume everywhere, it holds the scan's own (i, j, k) voxels, which
    ``read_labels(..., like=scan)`` (the CLI) puts back on the scan."""
    import tifffile

    from napari_sam_ft.volume import read_labels, read_volume

    ct_path, labels_path = sample_paths("ct")
    data, meta, _ = read_one(labels_path)
    path = tmp_path / "labels.tif"
    write_labels(str(path), data, meta)
    np.testing.assert_array_equal(tifffile.imread(str(path)), np.asanyarray(nib.load(str(labels_path)).dataobj))
    np.testing.assert_array_equal(read_labels(path, like=read_volume(ct_path)).array, data)


def test_opening_and_saving_never_import_torch(tmp_path):
    """The reader and writer run inside napari before any model: importing torch there (and triton with it)
    after napari's OpenGL context crashes the viewer, so they must not."""
    import subprocess
    import sys

    script = f"""
import sys
import numpy as np
from napari_sam_ft._reader import get_reader
from napari_sam_ft._writer import write_labels
from napari_sam_ft.sample import sample_paths
image, labels = sample_paths("mr")
data, meta, _ = get_reader(str(image))(str(image))[0]
write_labels({str(tmp_path / "mask.seg.nrrd")!r}, np.zeros(data.shape, np.uint8) + 1, meta)
assert "torch" not in sys.modules, [name for name in sys.modules if name.startswith("torch")][:5]
"""
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
