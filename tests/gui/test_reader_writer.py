"""Opening and saving through napari itself (npe2 manifest -> reader/writer), in a real viewer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_sam_ft._layer_data import GEOMETRY_KEY
from napari_sam_ft.sample import sample_paths

PLUGIN = "napari-sam-ft"
pytestmark = pytest.mark.gui


def test_open_keeps_the_affine_as_scale_and_translate(make_napari_viewer):
    viewer = make_napari_viewer()
    ct_path, labels_path = sample_paths("ct")
    [image] = viewer.open(str(ct_path), plugin=PLUGIN)
    [labels] = viewer.open(str(labels_path), plugin=PLUGIN)
    affine = nib.load(str(ct_path)).affine
    assert image._type_string == "image" and labels._type_string == "labels"
    np.testing.assert_allclose(image.scale, (3.0, 3.0, 3.0))
    # The RAS file is shown radiologically: the displayed first voxel is the file's last along I and J.
    first_voxel = affine @ np.array([image.data.shape[2] - 1, image.data.shape[1] - 1, 0, 1.0])
    np.testing.assert_allclose(image.translate, (first_voxel[2], first_voxel[1], first_voxel[0]))
    np.testing.assert_allclose(labels.translate, image.translate)
    np.testing.assert_array_equal(image.metadata[GEOMETRY_KEY]["affine"], affine)


def test_saving_a_mask_writes_the_input_voxel_order_and_affine(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    ct_path, _ = sample_paths("ct")
    [image] = viewer.open(str(ct_path), plugin=PLUGIN)
    mask = np.zeros(image.data.shape, np.int32)
    mask[12:18, 40:60, 30:50] = 2
    layer = viewer.add_labels(mask, name="mask", scale=image.scale, translate=image.translate,
                              metadata=dict(image.metadata))
    viewer.layers.selection.active = layer
    path = tmp_path / "mask.nii.gz"
    viewer.layers.save(str(path), selected=True, plugin=PLUGIN)
    written = nib.load(str(path))
    np.testing.assert_array_equal(written.affine, nib.load(str(ct_path)).affine)
    assert written.shape == nib.load(str(ct_path)).shape  # the file's (x, y, z) voxel order, not napari's (z, y, x)
    # Displayed (z, y, x) is the file's (k, -j, -i) for this RAS scan: undo the radiological flips, then transpose.
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), np.transpose(mask[:, ::-1, ::-1], (2, 1, 0)))


def test_bad_files_notify_and_leave_the_viewer_usable(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    flat = tmp_path / "flat.npy"
    np.save(flat, np.ones((16, 16), np.float32))
    series = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((8, 8, 5, 2)).astype(np.float32), np.eye(4)), str(series))
    for path in (flat, series):
        assert viewer.open(str(path), plugin=PLUGIN) == []
    messages = [str(note.message) for note in notifications]
    assert any("flat.npy" in message and "2D" in message for message in messages)
    assert any("series.nii.gz" in message and "4D" in message for message in messages)
    assert len(viewer.layers) == 0
    viewer.open_sample(PLUGIN, "ct")  # still usable
    assert [layer.name for layer in viewer.layers] == ["sample CT", "sample CT reference"]
