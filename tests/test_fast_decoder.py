"""The CPU fast path of the mask decoder computes what segment-anything's MaskDecoder computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from napari_sam_ft.engine.cache import EmbeddingCache
from napari_sam_ft.engine.fast_decoder import FastMaskDecoder, supports
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.engine.prompts import box_from_mask, interior_point
from napari_sam_ft.metrics import dice

SLICE, LIVER, SPLEEN = 15, 5, 1
BOXES = torch.tensor([[10.0, 20, 100, 120], [50, 60, 200, 180], [0, 0, 255, 255]])
POINTS = (torch.tensor([[[60.0, 80], [100, 100]]] * 3), torch.tensor([[1, 0]] * 3))


@pytest.fixture(scope="module")
def embedding(litemedsam, ct_sample, shared_cache):
    return VolumePredictor(litemedsam, ct_sample.image, cache=shared_cache).embedding(SLICE)


def stock_and_fast(sam, embedding, prompts: dict, multimask: bool, dtype=torch.float32, fast=None, image_key=None):
    fast = fast or FastMaskDecoder(dtype)
    with torch.inference_mode():
        image_pe = sam.prompt_encoder.get_dense_pe()
        sparse, dense = sam.prompt_encoder(**prompts)
        stock = sam.mask_decoder(image_embeddings=embedding, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                                 dense_prompt_embeddings=dense, multimask_output=multimask)
        ours = fast(sam, embedding, sparse, dense if prompts.get("masks") is not None else None,
                    multimask, image_key=image_key)
    return stock, ours


PROMPTS = {
    "one box": dict(points=None, boxes=BOXES[:1], masks=None),
    "three boxes": dict(points=None, boxes=BOXES, masks=None),
    "points and boxes": dict(points=POINTS, boxes=BOXES, masks=None),
    "mask prompts": dict(points=None, boxes=BOXES[:2], masks=torch.randn(2, 1, 256, 256, generator=torch.Generator().manual_seed(0))),
}


def test_the_embedded_models_decoder_has_the_supported_layout(litemedsam):
    assert supports(litemedsam.sam.mask_decoder)
    assert not supports(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_fp32_equals_the_stock_decoder(litemedsam, embedding, name, multimask):
    (stock_masks, stock_iou), (masks, iou) = stock_and_fast(litemedsam.sam, embedding, PROMPTS[name], multimask)
    assert masks.shape == stock_masks.shape and iou.shape == stock_iou.shape
    torch.testing.assert_close(masks, stock_masks, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(iou, stock_iou, atol=1e-5, rtol=1e-5)


def test_bf16_keeps_the_masks(litemedsam, embedding):
    (stock_masks, stock_iou), (masks, iou) = stock_and_fast(litemedsam.sam, embedding, PROMPTS["points and boxes"],
                                                            True, dtype=torch.bfloat16)
    assert ((masks > 0) == (stock_masks > 0)).float().mean() > 0.995
    assert (iou - stock_iou).abs().max() < 0.02


def test_a_repeated_slice_reuses_its_image_projections_with_the_same_result(litemedsam, embedding):
    fast = FastMaskDecoder()
    _, first = stock_and_fast(litemedsam.sam, embedding, PROMPTS["one box"], False, fast=fast, image_key=("ct", 15))
    weights = fast.weights(litemedsam.sam)
    assert list(weights.first_block_cache) == [("ct", 15)]
    (stock, _), second = stock_and_fast(litemedsam.sam, embedding, PROMPTS["three boxes"], False, fast=fast,
                                        image_key=("ct", 15))
    torch.testing.assert_close(second[0], stock, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(second[0][:1], first[0])
    assert fast.weights(litemedsam.sam) is weights, "unchanged weights are not read again"


def test_a_lora_adapter_on_the_decoder_is_followed_through_training_steps_and_switching(litemedsam, embedding):
    from peft import LoraConfig, inject_adapter_in_model

    sam = copy.deepcopy(litemedsam.sam)
    fast = FastMaskDecoder()
    (plain, _), _ = stock_and_fast(sam, embedding, PROMPTS["three boxes"], False, fast=fast)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]),
                            sam.mask_decoder)
    generator = torch.Generator().manual_seed(1)
    lora_b = [parameter for name, parameter in sam.mask_decoder.named_parameters() if "lora_B" in name]
    assert lora_b
    with torch.no_grad():
        for parameter in lora_b:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    sam.eval()
    (adapted, _), (masks, _) = stock_and_fast(sam, embedding, PROMPTS["three boxes"], False, fast=fast)
    assert (adapted - plain).abs().max() > 0.1, "the adapter should change the logits"
    torch.testing.assert_close(masks, adapted, atol=2e-4, rtol=1e-4)

    with torch.no_grad():  # an optimiser step changes weights in place
        lora_b[0].mul_(3.0)
    (stepped, _), (masks, _) = stock_and_fast(sam, embedding, PROMPTS["three boxes"], False, fast=fast)
    torch.testing.assert_close(masks, stepped, atol=2e-4, rtol=1e-4)

    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in sam.mask_decoder.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)
    (disabled, _), (masks, _) = stock_and_fast(sam, embedding, PROMPTS["three boxes"], False, fast=fast)
    torch.testing.assert_close(masks, disabled, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(masks, plain, atol=2e-4, rtol=1e-4)


def test_the_predictor_uses_the_fast_decoder_on_cpu_and_masks_match_the_stock_path(litemedsam, ct_sample, shared_cache):
    predictor = VolumePredictor(litemedsam, ct_sample.image, cache=shared_cache, precision="fp32")
    assert predictor.fast_decoder is not None
    reference = ct_sample.labels.array[SLICE]
    boxes = np.stack([box_from_mask(reference == class_id) for class_id in (SPLEEN, LIVER)])
    point = interior_point(reference == LIVER)
    fast_masks, fast_scores = predictor.predict_boxes(boxes, SLICE)
    fast_click = predictor.predict(point_coords=point[None], point_labels=[1], multimask_output=True, slice_index=SLICE)
    predictor.fast_decoder = None
    stock_masks, stock_scores = predictor.predict_boxes(boxes, SLICE)
    stock_click = predictor.predict(point_coords=point[None], point_labels=[1], multimask_output=True, slice_index=SLICE)
    assert all(dice(fast, stock) > 0.999 for fast, stock in zip(fast_masks, stock_masks))
    np.testing.assert_allclose(fast_scores, stock_scores, atol=1e-4)
    assert dice(fast_click.mask, stock_click.mask) > 0.999
    assert dice(fast_masks[1], reference == LIVER) > 0.9


def test_min_score_skips_only_the_upscaling_of_low_scoring_prompts(litemedsam, embedding):
    from napari_sam_ft.engine.fast_decoder import SKIPPED_LOGIT

    fast = FastMaskDecoder()
    sam = litemedsam.sam
    with torch.inference_mode():
        sparse, _ = sam.prompt_encoder(points=POINTS, boxes=BOXES, masks=None)
        all_masks, iou = fast(sam, embedding, sparse, None, True)
        threshold = float(iou.amax(dim=1).median())
        masks, filtered_iou = fast(sam, embedding, sparse, None, True, min_score=threshold)
    kept = iou.amax(dim=1) >= threshold
    assert 0 < kept.sum() < len(kept)
    torch.testing.assert_close(filtered_iou, iou)
    torch.testing.assert_close(masks[kept], all_masks[kept])
    assert (masks[~kept] == SKIPPED_LOGIT).all()


def test_a_randomly_initialised_sam_vit_decoder_matches_too():
    """Not tied to LiteMedSAM's weights: SAM's own decoder layout for a 1024-pixel input, random weights."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(3)
    sam = torch.nn.Module()
    sam.prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                       mask_in_chans=16)
    sam.mask_decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                                   iou_head_hidden_dim=256,
                                   transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    sam.eval()
    assert supports(sam.mask_decoder)
    embedding = torch.randn(1, 256, 64, 64)
    prompts = dict(points=(torch.tensor([[[300.0, 400], [700, 650]]] * 2), torch.tensor([[1, 0], [1, 1]])),
                   boxes=torch.tensor([[100.0, 120, 600, 700], [400, 300, 900, 1000]]), masks=None)
    for multimask in (False, True):
        (stock, stock_iou), (masks, iou) = stock_and_fast(sam, embedding, prompts, multimask)
        torch.testing.assert_close(masks, stock, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(iou, stock_iou, atol=1e-5, rtol=1e-5)
