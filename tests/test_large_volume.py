"""Large scans stay lazy: windowing, checks, hashing and slice reads never copy the whole volume to floats;
the embedding cache on disk is bounded, survives damage, and serves a reopened file with zero encoder passes."""

from __future__ import annotations

import tracemalloc
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_sam_ft.engine.automatic import AutomaticSettings, link_slices
from napari_sam_ft.engine.cache import CacheKey, EmbeddingCache, volume_content_hash
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.engine.prompts import box_from_mask
from napari_sam_ft.volume import check_intensities, choose_window, read_volume

SPLEEN = 1
EMBEDDING_BYTES = 256 * 64 * 64 * 2  # one slice, float16


def _peak_bytes(function) -> int:
    """Peak Python/numpy heap allocation while ``function`` runs (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def large_files(tmp_path_factory):
    """A 192x256x256 int16 CT-like volume as uncompressed NIfTI and as .npy (24 MiB each on disk)."""
    folder = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    zyx = np.full((192, 256, 256), -1000, np.int16)
    zyx[:, 40:220, 30:230] = rng.normal(40, 30, size=(192, 180, 200)).astype(np.int16)
    nifti = folder / "large.nii"
    nib.save(nib.Nifti1Image(np.transpose(zyx, (2, 1, 0)), np.diag([0.8, 0.8, 1.5, 1.0])), str(nifti))
    npy = folder / "large.npy"
    np.save(npy, zyx)
    return {"nifti": nifti, "npy": npy, "float32_bytes": zyx.size * 4}


@pytest.mark.parametrize("kind", ["nifti", "npy"])
def test_opening_windowing_hashing_and_slicing_never_copy_the_volume_to_floats(large_files, kind):
    volume = read_volume(large_files[kind], check_values=False)
    assert isinstance(volume.array.base if volume.array.base is not None else volume.array, np.memmap) or \
        isinstance(volume.array, np.memmap)
    budget = large_files["float32_bytes"] // 8  # an eighth of one float32 copy of the volume
    steps = {
        "read_volume": lambda: read_volume(large_files[kind]),
        "check_intensities": lambda: check_intensities(volume.array),
        "auto window": lambda: choose_window(volume.array, "auto"),
        "percentile window": lambda: choose_window(volume.array, "percentile"),
        "content hash": lambda: volume_content_hash(volume.array),
        "window one slice": lambda: choose_window(volume.array, "soft_tissue").apply(volume.array[100]),
    }
    for name, step in steps.items():
        assert _peak_bytes(step) < budget, name


def test_linking_automatic_objects_allocates_nothing_but_the_result():
    shape = (300, 128, 128)
    slice_labels = {}
    for index in (40, 41, 42, 200):
        labels = np.zeros(shape[1:], np.int32)
        labels[20:60, 30:70], labels[80:90, 80:90] = 1, 2
        slice_labels[index] = labels
    result_bytes = np.prod(shape) * 4
    peak = _peak_bytes(lambda: link_slices(slice_labels, shape, AutomaticSettings(min_instance_voxels=150)))
    assert peak < 1.2 * result_bytes
    linked = link_slices(slice_labels, shape, AutomaticSettings(min_instance_voxels=150))
    # The square runs through slices 40-42 as one object; the 100-voxel squares there (300 voxels) survive too;
    # the lone 100-voxel square on slice 200 is below the minimum size and is dropped.
    assert set(np.unique(linked[40:43])) == {0, 1, 2} and (linked[40] == linked[42]).all()
    assert set(np.unique(linked[200])) == {0, 1}


def test_a_reopened_file_with_a_fresh_cache_on_the_same_folder_runs_zero_encoder_passes(litemedsam, ct_sample,
                                                                                      tmp_path):
    path = tmp_path / "ct.nii"
    nib.save(nib.load(str(ct_sample.image_path)), str(path))  # uncompressed copy: memory-mapped on reading
    cache_dir = tmp_path / "embeddings"
    reference = ct_sample.labels.array[15] == SPLEEN
    first = VolumePredictor(litemedsam, read_volume(path), cache=EmbeddingCache(disk_dir=cache_dir))
    first.encode_slices([14, 15])
    before = first.predict(box=box_from_mask(reference), slice_index=15).mask
    assert first.encoder_calls >= 1 and sorted(first.cache.cached_slices(first.cache_key, 30)) == [14, 15]

    reopened = VolumePredictor(litemedsam, read_volume(path), cache=EmbeddingCache(disk_dir=cache_dir))
    assert reopened.cache_key == first.cache_key
    reopened.set_slice(15)
    after = reopened.predict(box=box_from_mask(reference)).mask
    reopened.encode_slices([14])
    assert reopened.encoder_calls == 0
    assert np.array_equal(before, after)
    assert reopened.status()["cached_slices"] == 2

    # Another window is another key: those slices are encoded anew.
    bone = VolumePredictor(litemedsam, read_volume(path), window="bone", cache=EmbeddingCache(disk_dir=cache_dir))
    assert not bone.is_encoded(15)


def _key(name: str = "volume") -> CacheKey:
    return CacheKey(name, "model-1", "none", "soft_tissue:-160:240", 2)


def _embedding(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(256, 64, 64)).astype(np.float32))


def test_the_disk_tier_evicts_the_least_recently_used_slices_to_stay_under_its_budget(tmp_path):
    import os
    import time

    cache = EmbeddingCache(memory_budget_bytes=EMBEDDING_BYTES, disk_dir=tmp_path, disk_budget_bytes=3 * EMBEDDING_BYTES + 4096)
    key = _key()
    for index in range(3):
        cache.put(key, index, _embedding(index))
    now = time.time()
    for age, index in ((300, 0), (100, 1), (200, 2)):  # slice 1 was used most recently, slice 0 longest ago
        os.utime(tmp_path / key.digest() / f"slice_{index:05d}.npy", (now - age, now - age))
    cache.put(key, 3, _embedding(3))
    assert cache.disk_bytes() <= cache.disk_budget_bytes
    fresh = EmbeddingCache(disk_dir=tmp_path)  # a restart: nothing in memory
    assert [fresh.contains(key, index) for index in range(4)] == [False, True, False, True]
    restored = fresh.get(key, 3)
    assert restored.dtype == torch.float16 and torch.allclose(restored.float(), _embedding(3), atol=1e-2)


def test_a_damaged_disk_entry_is_dropped_and_an_unwritable_disk_leaves_the_memory_tier(tmp_path):
    key = _key()
    EmbeddingCache(disk_dir=tmp_path).put(key, 0, _embedding(0))
    entry = tmp_path / key.digest() / "slice_00000.npy"
    entry.write_bytes(entry.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    assert EmbeddingCache(disk_dir=tmp_path).get(key, 0) is None
    assert not entry.exists()

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    cache = EmbeddingCache(disk_dir=blocked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache.put(key, 1, _embedding(1))
        cache.put(key, 2, _embedding(2))
    assert len([warning for warning in caught if "memory only" in str(warning.message)]) == 1
    assert cache.get(key, 1) is not None and cache.get(key, 2) is not None
