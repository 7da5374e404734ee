"""A real LoRA adapter for tests: the image encoder's LoRA weights moved off their start, as training leaves them."""

from __future__ import annotations

from pathlib import Path

import torch

from napari_sam_ft.finetune.adapters import AdapterInfo, base_network_copy, save_adapter
from napari_sam_ft.finetune.scopes import LoraSettings, prepare_scope


def make_lora_adapter(model, directory: Path, seed: int = 7, scale: float = 0.05) -> AdapterInfo:
    """Save a rank-4 LoRA adapter for ``model`` (left untouched) in ``directory``; it changes the embeddings."""
    trainable = prepare_scope(base_network_copy(model), "lora", LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in trainable.named_trainable():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    metadata = {"base_model_id": model.model_id, "base_model_name": model.name, "class_ids": [1],
                "class_names": {"1": "spleen"}, "prompt_modes": ["box"], "encoder_adapted": True}
    return save_adapter(directory, scope="lora", weights=trainable.adapter_state(), lora_config=trainable.lora_config,
                        class_head=None, metadata=metadata)
