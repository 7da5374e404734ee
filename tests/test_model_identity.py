"""Model identity and the embedding-cache key: an adapter switch during an encoding never stores or serves a stale
embedding; encoder precision and the code version are part of the key. Real LiteMedSAM, a real LoRA adapter."""

from __future__ import annotations

import threading

import pytest
import torch

from napari_sam_ft.engine.cache import EMBEDDING_CODE_VERSION, CacheKey, EmbeddingCache
from napari_sam_ft.engine.predictor import ModelChanged, VolumePredictor
from napari_sam_ft.finetune.adapters import load_adapter, unload_adapter

from lora_adapter import make_lora_adapter

SLICES = [13, 14, 15, 16]  # two batches of CPU_BATCH_SIZE
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def lora_adapter_dir(litemedsam, tmp_path_factory):
    info = make_lora_adapter(litemedsam, tmp_path_factory.mktemp("lora") / "adapter")
    assert info.encoder_adapted
    return info.adapter_dir


@pytest.fixture
def base_model(litemedsam):
    unload_adapter(litemedsam)
    yield litemedsam
    unload_adapter(litemedsam)


def fresh_embedding(model, volume, slice_index: int) -> torch.Tensor:
    """The slice encoded now by ``model`` as it is, through a cache that holds nothing."""
    return VolumePredictor(model, volume, cache=EmbeddingCache()).embedding(slice_index)[0]


def test_an_adapter_switch_between_batches_stops_the_encoding_and_files_nothing_under_a_stale_key(
        base_model, ct_sample, lora_adapter_dir, tmp_path):
    predictor = VolumePredictor(base_model, ct_sample.image, cache=EmbeddingCache(disk_dir=tmp_path), batch_size=2)
    base_key = predictor.cache_key
    switched = threading.Event()
    outcome: dict = {}

    def progress(done, _total):
        if done == 2:  # the first batch is stored: switch the adapter before the second one starts
            switcher = threading.Thread(target=lambda: load_adapter(base_model, lora_adapter_dir))
            switcher.start()
            switcher.join(TIMEOUT_S)
            switched.set()

    def encode():
        try:
            predictor.encode_slices(SLICES, progress=progress)
        except ModelChanged as error:
            outcome["error"] = error

    worker = threading.Thread(target=encode)
    worker.start()
    worker.join(TIMEOUT_S)
    assert switched.is_set() and isinstance(outcome.get("error"), ModelChanged)

    adapter_key = predictor.cache_key
    assert adapter_key != base_key and adapter_key.adapter_id == base_model.adapter_id != "none"
    # The first batch ran on the base network and is filed under the base key; nothing went under the adapter's.
    assert [predictor.cache.contains(base_key, index) for index in SLICES] == [True, True, False, False]
    assert not any(predictor.cache.contains(adapter_key, index) for index in SLICES)

    # What is served now comes from the adapted encoder, not from the base embeddings cached for the slice.
    served = predictor.embedding(SLICES[0])[0]
    adapted = fresh_embedding(base_model, ct_sample.image, SLICES[0])
    unload_adapter(base_model)
    base = fresh_embedding(base_model, ct_sample.image, SLICES[0])
    assert torch.allclose(served, adapted, atol=1e-2)
    assert (served - base).abs().max() > 0.1  # the adapter really changes the embedding
    assert torch.allclose(predictor.cache.get(base_key, SLICES[0]).float(), base, atol=1e-2)


def test_an_adapter_switch_waits_for_the_encoder_pass_in_flight(base_model, ct_sample, lora_adapter_dir):
    predictor = VolumePredictor(base_model, ct_sample.image, cache=EmbeddingCache(), batch_size=2)
    base_key = predictor.cache_key
    in_pass, events = threading.Event(), []
    encode_batch = predictor.encode_batch

    def recorded_encode_batch(images):
        events.append("pass started")
        in_pass.set()
        result = encode_batch(images)
        events.append("pass finished")
        return result

    predictor.encode_batch = recorded_encode_batch
    outcome: dict = {}

    def encode():
        try:
            predictor.encode_slices(SLICES)
        except ModelChanged as error:
            outcome["error"] = error

    worker = threading.Thread(target=encode)
    worker.start()
    assert in_pass.wait(TIMEOUT_S)
    load_adapter(base_model, lora_adapter_dir)  # blocks on the model's lock while a pass runs
    events.append("switched")
    worker.join(TIMEOUT_S)
    switch = events.index("switched")
    assert events[switch - 1] == "pass finished"  # never in the middle of a pass
    finished_before = events[:switch].count("pass finished")
    stored = [predictor.cache.contains(base_key, index) for index in SLICES]
    assert stored == [True] * (2 * finished_before) + [False] * (len(SLICES) - 2 * finished_before)
    assert isinstance(outcome.get("error"), ModelChanged) or finished_before == len(SLICES) // 2
    assert not any(predictor.cache.contains(predictor.cache_key, index) for index in SLICES)


def test_encoder_precision_is_part_of_the_cache_key(base_model, ct_sample, tmp_path):
    cache = EmbeddingCache(disk_dir=tmp_path)
    bf16 = VolumePredictor(base_model, ct_sample.image, cache=cache, precision="bf16")
    fp32 = VolumePredictor(base_model, ct_sample.image, cache=cache, precision="fp32")
    assert (bf16.cache_key.precision, fp32.cache_key.precision) == ("bf16", "fp32")
    assert bf16.cache_key.digest() != fp32.cache_key.digest()
    bf16.encode_slices([SLICES[0]])
    assert bf16.is_encoded(SLICES[0]) and not fp32.is_encoded(SLICES[0])
    served = fp32.embedding(SLICES[0])
    assert fp32.encoder_calls == 1  # the bf16 embedding was not served to the fp32 predictor
    assert not torch.equal(served, bf16.embedding(SLICES[0]))


def test_a_new_code_version_misses_what_an_older_version_cached_on_disk(tmp_path):
    embedding = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    old = CacheKey("volume", "model", "none", "window", 0, "fp32")
    assert old.code_version == EMBEDDING_CODE_VERSION
    EmbeddingCache(disk_dir=tmp_path).put(old, 3, embedding)
    reopened = EmbeddingCache(disk_dir=tmp_path)
    assert torch.equal(reopened.get(old, 3).float(), embedding)
    newer = CacheKey("volume", "model", "none", "window", 0, "fp32", code_version=EMBEDDING_CODE_VERSION + 1)
    assert reopened.get(newer, 3) is None and not reopened.contains(newer, 3)
