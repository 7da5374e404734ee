"""What a fine-tuning run may change: the scopes ``lora``, ``decoder`` and ``full``.

* ``lora`` (default): peft LoRA on the image encoder's attention ``qkv`` projections (TinyViT's
  ``WindowAttention.qkv``; SAM ViT's ``Attention.qkv`` too) and on the mask decoder's two-way
  transformer attention projections (``q_proj``/``k_proj``/``v_proj``/``out_proj``).
* ``decoder``: the mask decoder, the encoder frozen (so training can run on cached image embeddings), except
  the two-way transformer's MLP blocks, which keep their base weights (``FROZEN_IN_SCOPE``).
* ``full``: every weight of the network.

Adapters of the ``decoder`` and ``full`` scopes store only the weights their scope trains, in half precision
(``STORED_DTYPE``): a ``decoder`` adapter is then about 4 MB, not the 16 MB of the whole decoder in fp32.

Training always works on a private copy of the base network (``TrainableModel``), so a model that a
segmentation widget is using is never touched by a run.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

SCOPES = ("lora", "decoder", "full")
# peft adapter names become module attributes: they must not clash with nn.Module names like "train".
TRAINING_ADAPTER_NAME = "finetuning"
TUNED_MODULES = {"decoder": ("mask_decoder",), "full": ("image_encoder", "prompt_encoder", "mask_decoder")}
# The two-way transformer's MLPs hold 2.1 M of the mask decoder's 4.06 M weights. Few-shot runs tune the decoder's
# attention, upscaling, hypernetworks and IoU head around them; leaving them at their base values halves what
# an adapter stores (full-match against parameter names).
FROZEN_IN_SCOPE = {"decoder": re.compile(r"mask_decoder\.transformer\.layers\.\d+\.mlp\..*")}
# Tuned weights are stored in fp16: their relative rounding (5e-4) leaves masks unchanged, at half the size.
STORED_DTYPE = torch.float16


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scaling and target layer names (last component of the module path)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    encoder_targets: tuple[str, ...] = ("qkv",)
    decoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")

    def target_regex(self) -> str:
        """One regular expression that peft full-matches against module names."""
        parts = []
        if self.encoder_targets:
            names = "|".join(re.escape(name) for name in self.encoder_targets)
            parts.append(rf"image_encoder\..*\.(?:{names})")
        if self.decoder_targets:
            names = "|".join(re.escape(name) for name in self.decoder_targets)
            parts.append(rf"mask_decoder\.transformer\..*\.(?:{names})")
        if not parts:
            raise ValueError("LoRA needs at least one target layer name")
        return "|".join(f"(?:{part})" for part in parts)

    def peft_config(self):
        from peft import LoraConfig

        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        return LoraConfig(r=int(self.rank), lora_alpha=float(self.alpha), lora_dropout=float(self.dropout),
                          target_modules=self.target_regex(), bias="none")


@dataclass
class TrainableModel:
    """A private copy of the base SAM network with one scope applied; only its scope's weights train."""

    sam: nn.Module
    scope: str
    lora_config: object | None = None  # peft LoraConfig for the lora scope

    @property
    def encoder_trainable(self) -> bool:
        return any(parameter.requires_grad for parameter in self.sam.image_encoder.parameters())

    def named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, parameter) for name, parameter in self.sam.named_parameters() if parameter.requires_grad]

    def trainable_count(self) -> int:
        return sum(parameter.numel() for _, parameter in self.named_trainable())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The weights an adapter stores, on the CPU: peft LoRA keys (fp32), or the tuned modules' trainable
        weights in ``STORED_DTYPE``. Training keeps its best weights in this form and restores them from it,
        so the network it validates last is the one the adapter file gives back."""
        if self.scope == "lora":
            from peft import get_peft_model_state_dict

            state = get_peft_model_state_dict(self.sam, adapter_name=TRAINING_ADAPTER_NAME)
            return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in state.items()}
        return {name: parameter.detach().to("cpu", STORED_DTYPE, copy=True).contiguous()
                for name, parameter in self.named_trainable()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put weights from ``adapter_state`` back (restores the best-so-far weights)."""
        if self.scope == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.sam, state, adapter_name=TRAINING_ADAPTER_NAME)
            return
        parameters = dict(self.sam.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)


def strip_adapters(sam: nn.Module) -> nn.Module:
    """Replace every peft layer in ``sam`` by the plain layer it wraps (in place); returns ``sam``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(sam.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                setattr(parent, name, child.get_base_layer())
    if "peft_config" in sam.__dict__:
        del sam.__dict__["peft_config"]
    return sam


def prepare_scope(base_sam: nn.Module, scope: str, lora: LoraSettings | None = None,
                  copy_network: bool = True) -> TrainableModel:
    """Make the scope's weights of ``base_sam`` (which must carry no adapter) trainable, on a copy unless
    ``copy_network`` is False (then ``base_sam`` itself is changed)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}")
    sam = copy.deepcopy(base_sam) if copy_network else base_sam
    sam.eval()  # BatchNorm keeps its running statistics: a few slices are no batch to re-estimate them
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    if scope == "lora":
        from peft.tuners.lora import LoraModel

        config = (lora or LoraSettings()).peft_config()
        LoraModel(sam, config, TRAINING_ADAPTER_NAME)  # injects the LoRA layers into ``sam`` in place
        for name, parameter in sam.named_parameters():
            parameter.requires_grad_("lora_" in name)
        return TrainableModel(sam, scope, lora_config=config)
    frozen = FROZEN_IN_SCOPE.get(scope)
    for module in TUNED_MODULES[scope]:
        for name, parameter in getattr(sam, module).named_parameters(prefix=module):
            parameter.requires_grad_(frozen is None or not frozen.fullmatch(name))
    return TrainableModel(sam, scope)


def expected_lora_count(sam: nn.Module, lora: LoraSettings) -> int:
    """r * (in + out) summed over the linear layers that ``lora`` targets (used to check a scope's size)."""
    pattern = re.compile(lora.target_regex())
    return sum(lora.rank * (module.in_features + module.out_features) for name, module in sam.named_modules()
               if isinstance(module, nn.Linear) and pattern.fullmatch(name))
