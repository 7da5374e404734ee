"""The fp32 CPU encoder through ONNX Runtime: the same masks as torch's eager fp32 encoder on real slices, never
used for an encoder adapter, and an export failure leaves eager with one warning. Real LiteMedSAM forward passes."""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

import numpy as np
import pytest

from napari_sam_ft.engine import onnx_encoder
from napari_sam_ft.engine.cache import EmbeddingCache
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.engine.prompts import box_from_mask
from napari_sam_ft.finetune.adapters import load_adapter, unload_adapter
from napari_sam_ft.metrics import dice

from lora_adapter import make_lora_adapter

CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"
MASK_AGREEMENT = 0.99  # issue 9: masks Dice >= 0.99 against fp32 eager
SAMPLE_SLICE, SAMPLE_ORGANS = 15, (1, 2, 3, 5)  # spleen, kidneys, liver


def _case(name: str) -> Path:
    path = CASES / name
    if not path.exists():
        pytest.fail(f"{path} is missing: these tests read the real cases in ../shared/cases beside the repository")
    return path


def _fp32_predictors(model, volume):
    """An eager and an ONNX Runtime fp32 predictor of ``volume``, each with a cache of its own."""
    eager = VolumePredictor(model, volume, cache=EmbeddingCache(), precision="fp32")
    eager.use_onnx_encoder = False
    fast = VolumePredictor(model, volume, cache=EmbeddingCache(), precision="fp32")
    assert fast.onnx_encoder() is not None, "ONNX Runtime is installed and the base encoder is on the CPU"
    assert eager.onnx_encoder() is None
    return eager, fast


def _varied_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """The object's tight box, one grown by 12 px and one shifted by a quarter of its size."""
    box = box_from_mask(mask).astype(np.float32)
    size = box[2:] - box[:2]
    return [box, box + np.array([-12, -12, 12, 12], np.float32), box + np.tile(size / 4, 2)]


def _mask_agreement(eager, fast, slice_index: int, masks: list[np.ndarray]) -> list[float]:
    scores = []
    for box in (box for mask in masks for box in _varied_boxes(mask)):
        scores.append(dice(fast.predict(box=box, slice_index=slice_index).mask,
                           eager.predict(box=box, slice_index=slice_index).mask))
    return scores


def test_onnx_fp32_masks_equal_eager_fp32_on_lung1_and_the_sample(litemedsam, ct_sample):
    from napari_sam_ft.volume import read_labels, read_volume

    unload_adapter(litemedsam)
    image = read_volume(_case("pyradiomics_lung1_ct.nrrd"))
    lesion = read_labels(_case("pyradiomics_lung1_label.nrrd"), like=image).array > 0
    areas = lesion.sum(axis=(1, 2))
    largest = int(np.argmax(areas))
    smaller = int(np.flatnonzero(areas)[0])  # the lesion's first slice: a small object
    eager, fast = _fp32_predictors(litemedsam, image)
    scores = [score for index in (largest, smaller) for score in _mask_agreement(eager, fast, index, [lesion[index]])]
    sample_eager, sample_fast = _fp32_predictors(litemedsam, ct_sample.image)
    organs = [ct_sample.labels.array[SAMPLE_SLICE] == class_id for class_id in SAMPLE_ORGANS]
    scores += _mask_agreement(sample_eager, sample_fast, SAMPLE_SLICE, organs)
    assert min(scores) >= MASK_AGREEMENT, scores
    embedding_gap = (fast.embedding(largest) - eager.embedding(largest)).norm() / eager.embedding(largest).norm()
    assert 0 < float(embedding_gap) < 1e-3  # a different runtime (not eager twice), the same embedding
    assert fast.encoder_calls == 2 and eager.encoder_calls == 2


def test_an_encoder_lora_model_runs_eager_and_the_base_returns_to_onnx(litemedsam, ct_sample, tmp_path):
    adapter = make_lora_adapter(litemedsam, tmp_path / "adapter")
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache(), precision="fp32")
    assert predictor.onnx_encoder() is not None
    load_adapter(litemedsam, adapter.adapter_dir)
    try:
        assert litemedsam.identity.encoder_adapted
        assert onnx_encoder.onnx_encoder_for(litemedsam) is None and predictor.onnx_encoder() is None
        adapted = predictor.embedding(SAMPLE_SLICE)
    finally:
        unload_adapter(litemedsam)
    base = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache(), precision="fp32")
    assert base.onnx_encoder() is not None  # the base network's tensors are back, unchanged
    gap = (base.embedding(SAMPLE_SLICE) - adapted).norm() / adapted.norm()
    assert float(gap) > 1e-2  # the adapter's embedding came from the adapted (eager) encoder, not the export


def test_a_failed_export_falls_back_to_eager_with_one_warning(litemedsam, ct_sample, tmp_path, monkeypatch, caplog):
    def failing_export(*args, **kwargs):
        raise RuntimeError("exporter broke")

    unload_adapter(litemedsam)
    monkeypatch.setattr(onnx_encoder, "_RUNTIMES", weakref.WeakKeyDictionary())
    monkeypatch.setattr(onnx_encoder, "default_cache_dir", lambda: tmp_path)  # no export kept from other tests
    monkeypatch.setattr(onnx_encoder, "_export", failing_export)
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache(), precision="fp32")
    with caplog.at_level(logging.WARNING, logger=onnx_encoder.__name__):
        predictor.encode_slices([SAMPLE_SLICE, SAMPLE_SLICE + 1, SAMPLE_SLICE + 2])
    assert predictor.encoded_slices == 3 and predictor.onnx_encoder() is None
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "exporter broke" in warnings[0].getMessage()


def test_a_run_that_never_changes_the_encoder_encodes_its_views_as_the_engine_does(litemedsam, ct_sample):
    """In fp32 on a CPU, a decoder-scope run encodes through the base model's ONNX Runtime export, so it trains
    on exactly the embeddings the engine caches; a LoRA run changes the encoder and encodes with torch."""
    import torch

    from napari_sam_ft.finetune import TrainSettings, VolumeAnnotations, build_training_data
    from napari_sam_ft.finetune.train import _Trainer

    labels = np.zeros_like(ct_sample.labels.array)
    labels[[9, 15]] = ct_sample.labels.array[[9, 15]]
    data = build_training_data([VolumeAnnotations(ct_sample.image, labels, "ct")], classes=[5],
                               validation_slices=[15])
    decoder_run = _Trainer(litemedsam, data, TrainSettings(scope="decoder", precision="fp32"), None, None)
    assert decoder_run.frozen_encoder is onnx_encoder.onnx_encoder_for(litemedsam) is not None
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=EmbeddingCache(), precision="fp32")
    image = predictor.slice_image(SAMPLE_SLICE)
    with torch.no_grad():
        trained_on = decoder_run.encode([image])
    torch.testing.assert_close(trained_on, predictor.encode_batch(image[None]).half().float(), rtol=0, atol=0)
    assert _Trainer(litemedsam, data, TrainSettings(scope="lora", precision="fp32"), None, None).frozen_encoder is None
    assert _Trainer(litemedsam, data, TrainSettings(scope="decoder", precision="bf16"), None,
                    None).frozen_encoder is None
