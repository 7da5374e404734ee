"""A faster forward for segment-anything's decoder ``Attention``, with the same weights and results.

segment-anything computes attention as explicit matmul + softmax + matmul over separated heads, which on
CPU spends much of a click in copies. ``scaled_dot_product_attention`` fuses it. The module keeps its
``q_proj``/``k_proj``/``v_proj``/``out_proj`` layers, so state dicts and peft LoRA targets are unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _fused_attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
    batch, queries, channels = q.shape
    heads = self.num_heads
    q = q.view(batch, queries, heads, channels // heads).transpose(1, 2)
    k = k.view(batch, k.shape[1], heads, channels // heads).transpose(1, 2)
    v = v.view(batch, v.shape[1], heads, channels // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.out_proj(out.transpose(1, 2).reshape(batch, queries, channels))


def use_fused_attention(sam: torch.nn.Module) -> int:
    """Switch every decoder ``Attention`` of ``sam`` to the fused forward; returns how many were switched."""
    from segment_anything.modeling.transformer import Attention

    switched = 0
    for module in sam.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_fused_attention_forward, module)
            switched += 1
    return switched
