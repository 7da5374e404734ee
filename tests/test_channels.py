"""Multi-sequence input: a 4D NIfTI or several co-registered files feed SAM's three input channels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from napari_sam_ft.engine.cache import EmbeddingCache
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.engine.prompts import box_from_mask
from napari_sam_ft.metrics import dice
from napari_sam_ft.sample import load_sample
from napari_sam_ft.volume import ChannelWindow, VolumeError, choose_window, read_channels, read_volume, write_volume


@pytest.fixture(scope="module")
def mr():
    return load_sample("mr")


@pytest.fixture(scope="module")
def mr_files(mr, tmp_path_factory):
    """The sample MR, a smoothed copy and an edge map, as three 3D files and as one 4D NIfTI (X, Y, Z, 3)."""
    folder = tmp_path_factory.mktemp("channels")
    image = nib.load(str(mr.image_path))
    data = np.asarray(image.dataobj).astype(np.float32)
    smoothed = ndimage.gaussian_filter(data, 1.5)
    edges = ndimage.gaussian_gradient_magnitude(data, 1.0)
    paths = []
    for name, array in (("t1", data), ("smooth", smoothed), ("edges", edges)):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, image.affine), str(path))
        paths.append(path)
    four_d = folder / "multi.nii"
    nib.save(nib.Nifti1Image(np.stack([data, smoothed, edges], axis=-1), image.affine), str(four_d))
    return {"files": paths, "4d": four_d, "affine": image.affine}


def test_a_4d_nifti_opens_as_z_y_x_c_in_the_same_display_order_as_each_channel(mr_files, mr):
    volume = read_channels(mr_files["4d"], [0, 1, 2])
    assert volume.array.shape == (*mr.image.shape, 3) and volume.shape == mr.image.shape
    assert volume.num_channels == 3 and volume.channel_names == ("multi.nii[0]", "multi.nii[1]", "multi.nii[2]")
    assert volume.flips == mr.image.flips and volume.file_axes == mr.image.file_axes
    assert np.array_equal(volume.array[..., 0], np.asarray(mr.image.array, dtype=np.float32))
    for channel in range(3):
        single = read_volume(mr_files["4d"], channel=channel)
        assert np.array_equal(volume.array[..., channel], single.array)
    # Channels in another order, and one channel alone (the single-channel path, a 3D volume).
    reordered = read_channels(mr_files["4d"], [2, 0])
    assert np.array_equal(reordered.array[..., 0], volume.array[..., 2])
    assert read_channels(mr_files["4d"], [1]).array.ndim == 3


def test_co_registered_files_stack_as_channels_and_others_are_refused(mr_files, tmp_path):
    volume = read_channels(mr_files["files"])
    four_d = read_channels(mr_files["4d"])
    assert volume.channel_names == ("t1.nii.gz", "smooth.nii.gz", "edges.nii.gz")
    assert np.allclose(volume.array, four_d.array)
    moved = tmp_path / "moved.nii.gz"
    shifted = mr_files["affine"].copy()
    shifted[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(mr_files["files"][0])).dataobj), shifted), str(moved))
    with pytest.raises(VolumeError, match="co-registered"):
        read_channels([mr_files["files"][0], moved])
    cropped = tmp_path / "cropped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(nib.load(str(mr_files["files"][0])).dataobj)[:-2], mr_files["affine"]),
             str(cropped))
    with pytest.raises(VolumeError, match="co-registered"):
        read_channels([mr_files["files"][0], cropped])
    with pytest.raises(VolumeError, match=r"choose 1 to 3 channels"):
        read_channels([*mr_files["files"], mr_files["files"][0]], [0, 1, 2, 3])
    with pytest.raises(VolumeError, match=r"channel 5 is out of range 0\.\.2"):
        read_channels(mr_files["4d"], [0, 5])


def test_each_channel_gets_its_own_window_and_the_model_sees_three_windowed_channels(mr_files, litemedsam):
    volume = read_channels(mr_files["4d"])
    window = choose_window(volume.array, "auto")
    assert isinstance(window, ChannelWindow) and len(window.channels) == 3
    per_channel = [choose_window(volume.array[..., channel], "percentile") for channel in range(3)]
    assert [(w.low, w.high) for w in window.channels] == [(w.low, w.high) for w in per_channel]
    predictor = VolumePredictor(litemedsam, volume, cache=EmbeddingCache())
    image = predictor.slice_image(10)
    assert image.shape == (*volume.shape[1:], 3) and image.dtype == np.float32
    for channel in range(3):
        assert np.allclose(image[..., channel], per_channel[channel].apply(volume.array[10, ..., channel]))
    two = VolumePredictor(litemedsam, read_channels(mr_files["4d"], [0, 2]), cache=EmbeddingCache())
    pair = two.slice_image(10)
    assert pair.shape[-1] == 3 and np.allclose(pair[..., 2], pair[..., :2].mean(axis=-1))


def test_three_copies_of_one_sequence_encode_exactly_like_the_single_channel_path(mr, mr_files, litemedsam):
    t1 = mr_files["files"][0]
    single = VolumePredictor(litemedsam, read_volume(t1), cache=EmbeddingCache())
    triple = VolumePredictor(litemedsam, read_channels([t1, t1, t1]), cache=EmbeddingCache())
    assert single.cache_key != triple.cache_key  # another input, another cache entry
    assert np.allclose(triple.slice_image(10), single.slice_image(10)[..., None])
    assert np.allclose(triple.embedding(10).numpy(), single.embedding(10).numpy(), atol=1e-4)


def test_a_multichannel_volume_segments_from_a_box_and_its_mask_writes_in_the_file_geometry(mr, mr_files,
                                                                                            litemedsam, tmp_path):
    volume = read_channels(mr_files["4d"])
    predictor = VolumePredictor(litemedsam, volume, cache=EmbeddingCache())
    labels = mr.labels.array
    slice_index = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    class_id = int(np.bincount(labels[slice_index][labels[slice_index] > 0]).argmax())
    reference = labels[slice_index] == class_id
    mask = predictor.predict(box=box_from_mask(reference), slice_index=slice_index).mask
    assert dice(mask, reference) > 0.75
    written = np.zeros(volume.shape, np.uint8)
    written[slice_index] = mask
    path = write_volume(tmp_path / "mask.nii.gz", written, like=volume)
    assert nib.load(str(path)).shape == nib.load(str(mr.image_path)).shape
    assert np.array_equal(read_volume(path, check_values=False).array, written)
