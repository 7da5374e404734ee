"""Read checkpoint files safely and recognise which SAM variant a state dict belongs to."""

from __future__ import annotations

from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the chosen model."""


# Embedding width of ViT image encoders -> SAM variant.
VIT_WIDTHS = {768: "vit_b (SAM ViT-B or MedSAM)", 1024: "vit_l (SAM ViT-L)", 1280: "vit_h (SAM ViT-H)"}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` (read with ``weights_only=True``: no code runs) or ``.safetensors`` file.

    Training checkpoints that wrap the weights in ``model``/``state_dict`` and DataParallel ``module.``
    prefixes are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be read as a weights-only checkpoint ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); napari-sam-ft never unpickles code, "
                              "so re-save it as a plain state dict or .safetensors") from error
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def guess_model_family(state_dict: dict[str, torch.Tensor]) -> str:
    """A human description of which SAM variant these weights look like."""
    keys = state_dict.keys()
    if not any(key.startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.")) for key in keys):
        return "no SAM model at all (no image_encoder/prompt_encoder/mask_decoder weights)"
    patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        return VIT_WIDTHS.get(int(patch.shape[0]), f"a SAM ViT of width {int(patch.shape[0])}")
    if any(key.startswith("image_encoder.layers.") for key in keys):
        dense = state_dict.get("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")
        # LiteMedSAM and MobileSAM share the TinyViT layout; their training resolution differs (256 vs 1024).
        return "a TinyViT model: litemedsam (the embedded default) or mobilesam" + ("" if dense is not None else "")
    return "a SAM model with an unknown image encoder"
