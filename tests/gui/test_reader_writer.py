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
    # The RAS file is shown radiologically: the displayed first voxel is the file's last along I and J, and
    # napari's world axes are the patient's (S, P, L), growing with the displayed index.
    first_voxel = affine @ np.array([image.data.shape[2] - 1, image.data.shape[1] - 1, 0, 1.0])
    np.testing.assert_allclose(image.translate, (first_voxel[2], -first_voxel[1], -first_voxel[0]))
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


def test_bad_files_notify_once_and_leave_the_viewer_usable(make_napari_viewer, tmp_path, notifications):
    viewer = make_napari_viewer()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    constant = tmp_path / "constant.nrrd"
    import nrrd

    nrrd.write(str(constant), np.full((8, 8, 4), 7.5, np.float32))  # a scan (fractional) with nothing in it
    for path, problem in ((broken, "cannot read"), (constant, "constant")):
        before = len(notifications)
        assert viewer.open(str(path), plugin=PLUGIN) == []
        messages = [str(note.message) for note in notifications[before:]]
        assert len(messages) == 1 and path.name in messages[0] and problem in messages[0], messages
    assert len(viewer.layers) == 0
    viewer.open_sample(PLUGIN, "ct")  # still usable
    assert [layer.name for layer in viewer.layers] == ["sample CT", "sample CT reference"]


def test_2d_pictures_and_folders_without_dicom_are_left_to_napari(make_napari_viewer, tmp_path):
    import tifffile

    from napari_sam_ft._reader import get_reader

    picture = tmp_path / "slice.tif"
    tifffile.imwrite(str(picture), np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8))
    photo = tmp_path / "photo.tif"
    tifffile.imwrite(str(photo), np.zeros((30, 40, 3), np.uint8), photometric="rgb")
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no scans here")
    np.save(tmp_path / "stack.npy", np.random.default_rng(0).random((5, 16, 16)).astype(np.float32))
    assert get_reader(str(picture)) is None and get_reader(str(photo)) is None and get_reader(str(folder)) is None
    assert get_reader(str(tmp_path / "stack.npy")) is not None  # a 3D volume is ours
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(picture), plugin="napari")  # napari's own reader takes the 2D picture
    assert layer.data.shape == (40, 50)
    with pytest.raises(Exception, match="slice.tif"):  # ours gives no empty result for it
        viewer.open(str(picture), plugin=PLUGIN)
    assert len(viewer.layers) == 1


def test_a_folder_with_two_series_opens_the_largest_and_offers_the_other(make_napari_viewer, tmp_path, qtbot,
                                                                        notifications):
    from dicom_series import write_ct_series

    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    rng = np.random.default_rng(0)
    large = write_ct_series(tmp_path / "study", rng.integers(-900, 900, (24, 20, 6)), affine, description="large")
    small = write_ct_series(tmp_path / "study", rng.integers(-900, 900, (16, 12, 3)), affine, description="small",
                            study_uid=large["study_uid"], series_number=3, seed=1)
    viewer = make_napari_viewer()
    [image] = viewer.open(str(tmp_path / "study"), plugin=PLUGIN)
    assert image.data.shape == (6, 20, 24)
    [offer] = [note for note in notifications if note.actions]
    assert "2 image series" in str(offer.message) and large["series_uid"] in str(offer.message)
    (button, choose), = offer.actions
    picker = choose(None)
    qtbot.addWidget(picker)
    [row] = [index for index in range(picker.choices.count()) if small["series_uid"] in picker.choices.item(index).text()]
    picker.choices.setCurrentRow(row)
    picker.accept()
    assert [tuple(layer.data.shape) for layer in viewer.layers] == [(6, 20, 24), (3, 12, 16)]


def test_a_long_4d_file_opens_its_first_volume_and_offers_the_others(make_napari_viewer, tmp_path, qtbot,
                                                                    notifications):
    path = tmp_path / "bold.nii.gz"
    series = np.random.default_rng(0).random((10, 9, 5, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.diag([3.0, 3.0, 4.0, 1.0])), str(path))
    viewer = make_napari_viewer()
    [first] = viewer.open(str(path), plugin=PLUGIN)
    assert first.name == "bold [channel 0]"
    [offer] = [note for note in notifications if note.actions]
    assert "6 volumes" in str(offer.message)
    picker = offer.actions[0][1](None)
    qtbot.addWidget(picker)
    picker.choices.setCurrentRow(4)
    picker.accept()
    fourth = viewer.layers[-1]
    assert fourth.name == "bold [channel 4]" and fourth.metadata[GEOMETRY_KEY]["channel"] == 4
    np.testing.assert_array_equal(np.asarray(fourth.data), np.transpose(series[..., 4], (2, 1, 0))[:, ::-1, ::-1])


def test_a_session_on_two_channels_reopens_as_3d_layers_the_segment_widget_takes(make_napari_viewer, tmp_path,
                                                                                 monkeypatch, qtbot):
    from napari.layers import Image

    from napari_sam_ft._widgets._layers import LayerVolume
    from napari_sam_ft._widgets.session_panel import SessionPanel
    from napari_sam_ft.session import read_session_file, read_session_volume, save_session, session_from_volume

    monkeypatch.setenv("NAPARI_SAM_FT_AUTOSAVE", str(tmp_path / "autosave"))
    path = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 10, 5, 3)).astype(np.float32),
                             np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    volume = read_session_volume(path, None, [0, 2])  # what `--channels 0,2` segments: (Z, Y, X, 2)
    mask = np.zeros(volume.shape, np.uint8)
    mask[2, 3:5, 4:7] = 1
    session = save_session(tmp_path / "multi.session.json", session_from_volume(volume, channels=[0, 2]), mask,
                           like=volume)
    viewer = make_napari_viewer()
    panel = SessionPanel(viewer)
    assert panel.open(session) is not None
    qtbot.waitUntil(lambda: panel.idle, timeout=30000)
    image, labels = panel.last_opened
    images = [layer for layer in viewer.layers if isinstance(layer, Image)]
    assert [layer.name for layer in images] == ["multi [channel 0]", "multi [channel 2]"]
    assert all(layer.data.ndim == 3 for layer in images) and image is images[0]
    assert LayerVolume().get(image).shape == volume.shape  # the Segment widget's view of its image layer
    np.testing.assert_array_equal(labels.data, mask)
    np.testing.assert_allclose(labels.translate, image.translate)
    panel.image_combo.select_layer(image)
    assert panel.save(tmp_path / "again.session.json") is not None  # from one channel's layer: reopens that one
    qtbot.waitUntil(lambda: panel.idle, timeout=30000)
    assert read_session_file(panel.last_saved).channels == [0]
