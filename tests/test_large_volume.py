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


def _write_scan(folder, num_slices: int) -> dict:
    """A num_slices x 256 x 256 int16 CT-like volume as uncompressed NIfTI and as .npy."""
    rng = np.random.default_rng(num_slices)
    zyx = np.full((num_slices, 256, 256), -1000, np.int16)
    zyx[:, 40:220, 30:230] = rng.integers(-60, 160, size=(num_slices, 180, 200), dtype=np.int16)
    nifti = folder / f"scan{num_slices}.nii"
    nib.save(nib.Nifti1Image(np.transpose(zyx, (2, 1, 0)), np.diag([0.8, 0.8, 1.5, 1.0])), str(nifti))
    npy = folder / f"scan{num_slices}.npy"
    np.save(npy, zyx)
    return {"nifti": nifti, "npy": npy, "float32_bytes": zyx.size * 4}


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """The same kind of scan with 64 and with 256 slices (32 MiB on disk as int16)."""
    folder = tmp_path_factory.mktemp("large")
    return {num_slices: _write_scan(folder, num_slices) for num_slices in (64, 256)}


LAZY_STEPS = {
    "read_volume": lambda path, volume: read_volume(path),
    "check_intensities": lambda path, volume: check_intensities(volume.array),
    "auto window": lambda path, volume: choose_window(volume.array, "auto"),
    "percentile window": lambda path, volume: choose_window(volume.array, "percentile"),
    "content hash": lambda path, volume: volume_content_hash(volume.array),
    "window one slice": lambda path, volume: choose_window(volume.array, "soft_tissue").apply(volume.array[50]),
}


@pytest.mark.parametrize("kind", ["nifti", "npy"])
def test_opening_windowing_hashing_and_slicing_use_memory_independent_of_the_number_of_slices(scans, kind):
    peaks = {}
    for num_slices, scan in scans.items():
        volume = read_volume(scan[kind], check_values=False)
        mapped = volume.array if volume.array.base is None else volume.array.base
        assert isinstance(mapped, np.memmap), "the file should stay memory-mapped"
        for name, step in LAZY_STEPS.items():
            peaks[name, num_slices] = _peak_bytes(lambda: step(scan[kind], volume))
    quarter_float_copy = scans[256]["float32_bytes"] // 4
    for name in LAZY_STEPS:
        small, large = peaks[name, 64], peaks[name, 256]
        # Four times the slices: the same bounded working memory, far below a float copy of the volume.
        assert large <= 1.25 * small + (1 << 20), (name, small, large)
        assert large < quarter_float_copy, (name, large)


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
    # Each square runs through slices 40-42 as one object (the small one: 300 voxels, kept); on slice 200 the
    # large square is a new object, 3, and the lone 100-voxel square is below the minimum size and dropped.
    assert set(np.unique(linked[40:43])) == {0, 1, 2} and (linked[40] == linked[42]).all()
    assert set(np.unique(linked[200])) == {0, 3} and (linked[200] == 3).sum() == 1600


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
    return CacheKey(name, "model-1", "none", "soft_tissue:-160:240", 2, "fp32")


def _embedding(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(256, 64, 64)).astype(np.float32))


def test_the_disk_tier_evicts_the_least_recently_used_slices_to_stay_under_its_budget(tmp_path):
    import os
    import time

    cache = EmbeddingCache(memory_budget_bytes=EMBEDDING_BYTES, disk_dir=tmp_path,
                           disk_budget_bytes=3 * EMBEDDING_BYTES + 4096)
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


def test_a_scaled_nifti_is_rescaled_slab_by_slab_without_a_float64_copy(tmp_path):
    # CT as many scanners export it: uint16 voxels with scl_inter = -1024 (nibabel alone gives float64).
    rng = np.random.default_rng(1)
    stored = rng.integers(0, 2200, size=(256, 256, 96), dtype=np.uint16)
    image = nib.Nifti1Image(stored, np.diag([0.8, 0.8, 1.5, 1.0]))
    image.header.set_data_dtype(np.uint16)
    image.header.set_slope_inter(1.0, -1024.0)
    path = tmp_path / "scaled_ct.nii"
    nib.save(image, str(path))
    peak = _peak_bytes(lambda: read_volume(path))
    volume = read_volume(path)
    assert volume.array.dtype == np.int16 and volume.array.flags.c_contiguous is False  # flipped view of the copy
    hounsfield = stored.astype(np.int32) - 1024
    assert np.array_equal(volume.to_file_order(np.asarray(volume.array)), hounsfield)
    assert peak < stored.size * 2 + (5 << 20)  # the int16 result and one 4 MiB slab; never a float copy
    assert choose_window(volume.array, "auto").name == "soft_tissue"

    image.header.set_slope_inter(0.5, 0.0)  # a non-integer slope: float32, never float64
    nib.save(image, str(path))
    halved = read_volume(path, check_values=False)
    assert halved.array.dtype == np.float32
    assert np.allclose(halved.to_file_order(np.asarray(halved.array)), stored * 0.5)


def _write_gzipped_ct(path, seed: int = 3):
    """A 96 x 160 x 128 int16 CT-like volume as .nii.gz (3.75 MiB of voxels); returns its (i, j, k) data."""
    rng = np.random.default_rng(seed)
    data = np.full((128, 160, 96), -1000, np.int16)
    data[20:110, 30:140, :] = rng.integers(-80, 200, size=(90, 110, 96), dtype=np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([-0.8, -0.8, 1.5, 1.0])), str(path))
    return data


def test_a_large_nii_gz_is_decompressed_once_to_a_memory_mapped_cache_file_with_identical_values(tmp_path,
                                                                                                monkeypatch):
    from napari_sam_ft.io import decompressed

    monkeypatch.setenv("NAPARI_SAM_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decompressed, "DECOMPRESS_TO_CACHE_BYTES", 1 << 20)  # this 3.75 MiB volume counts as large
    path = tmp_path / "ct.nii.gz"
    data = _write_gzipped_ct(path)
    monkeypatch.setattr(decompressed, "CHUNK_BYTES", 1 << 18)  # the streaming buffer, small beside the volume
    peak = _peak_bytes(lambda: read_volume(path, check_values=False))
    volume = read_volume(path)
    mapped = volume.array if volume.array.base is None else volume.array.base
    assert isinstance(mapped, np.memmap), "a large .nii.gz should be read from its memory-mapped uncompressed copy"
    copies = list((tmp_path / "cache" / "decompressed").iterdir())
    assert len(copies) == 1 and copies[0].suffix == ".nii" and copies[0].stat().st_size >= data.nbytes
    assert peak < data.nbytes / 4  # never the whole volume in memory (nibabel alone reads all of it)
    assert np.array_equal(volume.to_file_order(np.asarray(volume.array)), np.asarray(nib.load(str(path)).dataobj))

    modified = copies[0].stat().st_mtime_ns
    read_volume(path)  # reopened: the same copy, not decompressed again
    assert list((tmp_path / "cache" / "decompressed").iterdir()) == copies
    assert copies[0].stat().st_mtime_ns >= modified

    changed = _write_gzipped_ct(path, seed=4)  # an edited file is another version: decompressed anew
    reread = read_volume(path)
    assert np.array_equal(reread.to_file_order(np.asarray(reread.array)), changed)
    assert len(list((tmp_path / "cache" / "decompressed").iterdir())) == 2


def test_a_damaged_large_nii_gz_is_one_clear_error_and_a_read_only_cache_falls_back_to_memory(tmp_path, monkeypatch):
    from napari_sam_ft.io import VolumeError, decompressed

    monkeypatch.setattr(decompressed, "DECOMPRESS_TO_CACHE_BYTES", 1 << 20)
    path = tmp_path / "ct.nii.gz"
    data = _write_gzipped_ct(path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NAPARI_SAM_FT_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="reading it into memory"):
        volume = read_volume(path)
    assert np.array_equal(volume.to_file_order(np.asarray(volume.array)), data)

    monkeypatch.setenv("NAPARI_SAM_FT_CACHE", str(tmp_path / "cache"))
    compressed = path.read_bytes()
    path.write_bytes(compressed[: len(compressed) * 2 // 3])
    with pytest.raises(VolumeError, match="gzip stream is damaged or truncated"):
        read_volume(path)
    assert not any(entry.name.endswith(".nii") for entry in (tmp_path / "cache" / "decompressed").iterdir())


def test_hd95_on_the_masks_bounding_box_equals_the_whole_volume_distance_maps_and_needs_far_less_memory():
    from scipy import ndimage

    from napari_sam_ft.metrics import hd95

    shape, spacing = (64, 160, 160), (2.5, 0.8, 0.7)
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    reference = ((zz - 32) / 6.0) ** 2 + ((yy - 70) / 20.0) ** 2 + ((xx - 90) / 15.0) ** 2 <= 1
    prediction = ((zz - 33) / 5.0) ** 2 + ((yy - 73) / 18.0) ** 2 + ((xx - 88) / 17.0) ** 2 <= 1

    def whole_volume(a, b):  # the textbook computation over the whole grid
        structure = ndimage.generate_binary_structure(3, 1)
        surface_a = a & ~ndimage.binary_erosion(a, structure, border_value=0)
        surface_b = b & ~ndimage.binary_erosion(b, structure, border_value=0)
        to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)
        to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)
        return float(np.percentile(np.concatenate([to_b[surface_a], to_a[surface_b]]), 95))

    assert hd95(prediction, reference, spacing) == pytest.approx(whole_volume(prediction, reference), abs=1e-9)
    edge = np.zeros(shape, bool)
    edge[:4, :10, -12:] = True  # touching the volume's border: the box is clipped, the result unchanged
    assert hd95(edge, reference, spacing) == pytest.approx(whole_volume(edge, reference), abs=1e-9)
    peak = _peak_bytes(lambda: hd95(prediction, reference, spacing))
    assert peak < reference.size * 8 / 4  # one whole-volume float64 distance map would be 4x this


def test_the_large_scan_benchmark_phantom_has_its_liver_on_the_patients_right_and_is_prompted_where_it_shows(
        tmp_path):
    import importlib.util
    from pathlib import Path

    from napari_sam_ft.volume import read_labels

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "large_volume.py"
    spec = importlib.util.spec_from_file_location("large_volume_benchmark", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = (24, 96, 96)
    image, labels = tmp_path / "phantom.nii", tmp_path / "phantom_labels.nii.gz"
    bench.write_phantom_ct(image, shape, compressed_path=tmp_path / "phantom.nii.gz", labels_path=labels)
    liver_slice = int(0.55 * (shape[0] - 1))
    assert bench.file_liver_x(labels, liver_slice) > 5.0  # nibabel alone: RAS x > 0 is the patient's right
    compressed = read_volume(tmp_path / "phantom.nii.gz")
    assert np.array_equal(np.asarray(compressed.array), np.asarray(read_volume(image).array))
    shown = read_labels(labels, like=compressed).array[liver_slice]
    drawn = bench.phantom_slice(liver_slice, *shape)[1]  # the radiological view the prompts are taken from
    assert np.array_equal(shown, drawn)
    assert bench.world_x_of(liver_slice, drawn == bench.LIVER, compressed.world_affine) == pytest.approx(
        bench.file_liver_x(labels, liver_slice), abs=0.5)


def test_a_large_mgz_is_memory_mapped_from_its_decompressed_copy_too(tmp_path, monkeypatch):
    from napari_sam_ft.io import decompressed

    monkeypatch.setenv("NAPARI_SAM_FT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(decompressed, "DECOMPRESS_TO_CACHE_BYTES", 1 << 20)
    data = np.random.default_rng(5).integers(-1000, 1500, size=(128, 120, 40), dtype=np.int16)
    path = tmp_path / "t1.mgz"
    nib.save(nib.MGHImage(data, np.diag([-1.0, 1.0, 1.2, 1.0])), str(path))
    volume = read_volume(path)
    mapped = volume.array if volume.array.base is None else volume.array.base
    assert isinstance(mapped, np.memmap)
    assert [entry.suffix for entry in (tmp_path / "cache" / "decompressed").iterdir()] == [".mgh"]
    assert np.array_equal(volume.to_file_order(np.asarray(volume.array)), np.asarray(nib.load(str(path)).dataobj))
