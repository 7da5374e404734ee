"""The model registry: embedded default weights, checkpoint checks, preprocessing, device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam_ft.devices import autocast_dtype, select_device
from napari_sam_ft.models.checkpoints import CheckpointError, load_state_dict
from napari_sam_ft.models.registry import MODELS, Preprocessing, embedded_litemedsam_checkpoint, load_model


def test_embedded_litemedsam_loads_with_zero_missing_or_unexpected_keys():
    state = load_state_dict(embedded_litemedsam_checkpoint())
    sam = MODELS["litemedsam"].build()
    result = sam.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert len(state) == len(sam.state_dict())


def test_the_default_model_is_frozen_eval_and_identified_by_its_weights(litemedsam):
    assert litemedsam.name == "litemedsam"
    assert not litemedsam.sam.training
    assert not any(parameter.requires_grad for parameter in litemedsam.sam.parameters())
    assert litemedsam.model_id.startswith("litemedsam-") and len(litemedsam.weights_hash) == 64


def test_a_checkpoint_for_another_model_says_what_it_looks_like(tmp_path):
    state = load_state_dict(embedded_litemedsam_checkpoint())
    path = tmp_path / "lite.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="looks like a TinyViT model: litemedsam"):
        load_model("vit_b", path)


def test_a_vit_b_checkpoint_is_recognised(tmp_path):
    # Build SAM ViT-B's architecture (no weights are downloaded) and save its state dict as a checkpoint.
    state = MODELS["vit_b"].build().state_dict()
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"vit_b \(SAM ViT-B or MedSAM\)"):
        load_model("litemedsam", path)
    loaded = load_model("medsam", path)
    assert loaded.preprocessing.input_size == 1024 and loaded.preprocessing.pixel_scale == 1.0


def test_models_without_embedded_weights_ask_for_a_checkpoint():
    with pytest.raises(CheckpointError, match="give its checkpoint file"):
        load_model("vit_h")
    with pytest.raises(CheckpointError, match="unknown model"):
        load_model("resnet")


def test_non_checkpoint_files_are_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read as a weights-only checkpoint"):
        load_state_dict(path)
    path = tmp_path / "other.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no SAM model at all"):
        load_model("litemedsam", path)


def test_preprocessing_keeps_aspect_and_pads_bottom_right():
    preprocessing = Preprocessing(256)
    slice_01 = np.ones((101, 122), np.float32)
    tensor = preprocessing.image_to_tensor(slice_01)
    assert tensor.shape == (1, 3, 256, 256)
    height, width = preprocessing.resized_shape(101, 122)
    assert (height, width) == (212, 256)
    # Bilinear resampling of ones gives 1 - 6e-8 in torch's one-thread kernel: compare within float error.
    assert torch.allclose(tensor[0, :, :height, :width], torch.ones(1), atol=1e-6) and torch.all(tensor[0, :, height:, :] == 0)
    corner = preprocessing.coords_to_model(np.array([[122.0, 101.0]]), 101, 122)
    assert np.allclose(corner, [[256.0, 212.0]], atol=1)
    logits = torch.zeros(1, 1, 256, 256)
    logits[..., :height, :width] = 1
    back = preprocessing.logits_to_slice(logits, 101, 122)
    assert back.shape == (1, 1, 101, 122) and torch.all(back > 0.5)


def test_device_selection_and_precision():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU"):
            select_device("cuda")
    assert autocast_dtype(torch.device("cpu"), "fp32") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16


def test_fused_decoder_attention_matches_segment_anythings_own(litemedsam):
    from segment_anything.modeling.transformer import Attention

    from napari_sam_ft.models.fast_attention import _fused_attention_forward

    torch.manual_seed(0)
    attention = next(module for module in litemedsam.sam.mask_decoder.modules() if isinstance(module, Attention))
    queries, keys = torch.randn(2, 7, 256), torch.randn(2, 4096, 256)
    with torch.no_grad():
        expected = Attention.forward(attention, queries, keys, keys)
        fused = _fused_attention_forward(attention, queries, keys, keys)
    assert torch.allclose(fused, expected, atol=1e-5)
    assert attention.forward.__func__ is _fused_attention_forward  # load_model switched it on
