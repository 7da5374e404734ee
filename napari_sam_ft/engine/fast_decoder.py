"""SAM's mask decoder for clicks on a CPU: the same arithmetic as ``MaskDecoder``, laid out for speed.

A click costs one pass of SAM's two-way transformer over the 64x64 embedding grid plus the upscaling to
256x256 low-res logits. Run module by module on a 2-core CPU that takes ~50 ms, most of it not in matmuls:
autocast re-casts every weight on every call (the weights have no gradient, so its cache never keeps
them), the image tokens are transposed between (C, H, W) and (HW, C) several times, and ``k_proj(keys +
key_pe)`` adds the positional encoding to the whole grid before each projection.

``FastMaskDecoder`` computes the same function with the weights read once into the compute dtype:

- image tokens stay in (HW, C) layout from start to end;
- ``k_proj(keys + pe) = k_proj(keys) + W_k pe``: the positional term is a constant per model, so each block
  projects its image tokens with one matmul (token-to-image keys and values and image-to-token queries
  concatenated) plus a precomputed addend;
- in the first block all prompts of a batch share the same image tokens (when no mask prompt is given), so
  they are projected once, not once per prompt, and that projection is kept for the last few slices;
- the image-to-token attention (4096 image queries over a handful of prompt tokens) is two block-diagonal
  matmuls instead of per-head kernels;
- the two stride-2 transposed convolutions of the upscaling are per-pixel matmuls whose outputs are
  rearranged into the 256x256 grid once, at the end, and only the requested masks are computed (with
  ``min_score``, only for prompts whose predicted IoU reaches it).

Every linear layer's effective weight is read by probing the layer itself (``layer(I) - layer(0)``), so a
peft LoRA adapter on the decoder is honoured without knowing peft's internals; the weights are read again
whenever a parameter changes in place, a module is swapped or an adapter is switched. The result equals
the stock decoder to float rounding in fp32 (tested), and in bf16 matches it as closely as autocast does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FIRST_BLOCK_CACHE_SLICES = 4  # ~5 MB each in bf16 for a 64x64 grid
SKIPPED_LOGIT = -100.0  # the logits of a mask not computed (``min_score``): background everywhere


def supports(mask_decoder: nn.Module) -> bool:
    """Whether ``mask_decoder`` has the layout of segment-anything's MaskDecoder + TwoWayTransformer."""
    transformer = getattr(mask_decoder, "transformer", None)
    upscaling = getattr(mask_decoder, "output_upscaling", None)
    if (transformer is None or upscaling is None or not hasattr(transformer, "final_attn_token_to_image")
            or len(transformer.layers) == 0):
        return False
    if len(upscaling) != 5 or type(upscaling[1]).__name__ != "LayerNorm2d":
        return False
    for conv in (upscaling[0], upscaling[3]):
        if not (isinstance(conv, nn.ConvTranspose2d) and conv.kernel_size == (2, 2) and conv.stride == (2, 2)
                and conv.padding == (0, 0) and conv.output_padding == (0, 0) and conv.groups == 1):
            return False
    return all(not getattr(mlp, "sigmoid_output", False) for mlp in mask_decoder.output_hypernetworks_mlps)


def _effective_linear(layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (out, in), bias (out,)) of any affine layer, e.g. ``nn.Linear`` or a peft LoRA ``Linear``."""
    in_features = getattr(layer, "in_features", None)
    if in_features is None:
        in_features = layer.base_layer.in_features
    parameter = next(layer.parameters())
    with torch.no_grad(), torch.autocast(parameter.device.type, enabled=False):
        probes = torch.cat([torch.zeros(1, in_features), torch.eye(in_features)]).to(parameter)
        outputs = layer(probes).float()
    bias = outputs[0]
    weight = (outputs[1:] - bias).T
    return weight.to(dtype).contiguous(), bias.to(dtype).contiguous()


def _adapter_state(module: nn.Module) -> tuple:
    """What decides a module's output besides its parameters: peft's active adapter flags."""
    return tuple((name, tuple(getattr(sub, "active_adapters", ())), bool(getattr(sub, "disable_adapters", False)),
                  bool(getattr(sub, "merged", False)))
                 for name, sub in module.named_modules() if hasattr(sub, "disable_adapters"))


def _version(tensor: torch.Tensor) -> int | None:
    # Tensors made under inference mode keep no version counter (and cannot be changed outside it).
    return None if tensor.is_inference() else tensor._version


def _signature(sam: nn.Module) -> tuple:
    """Changes whenever the decoder's function or the positional encoding could have changed."""
    prompt_encoder = sam.prompt_encoder
    tensors = (*sam.mask_decoder.parameters(), prompt_encoder.no_mask_embed.weight,
               prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    return (tuple((id(tensor), _version(tensor), tensor.device) for tensor in tensors),
            _adapter_state(sam.mask_decoder), tuple(prompt_encoder.image_embedding_size))


@dataclass
class _Attention:
    q: tuple[torch.Tensor, torch.Tensor]
    k: tuple[torch.Tensor, torch.Tensor]
    v: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]
    heads: int


@dataclass
class _Block:
    self_attention: _Attention
    token_to_image: _Attention
    image_to_token: _Attention
    norms: list[tuple[torch.Tensor, torch.Tensor, float]]  # norm1..norm4: (weight, bias, eps)
    mlp: list[tuple[torch.Tensor, torch.Tensor]]
    mlp_activation: nn.Module
    skip_first_layer_pe: bool
    # Image side: keys @ image_weight.T + image_addend -> [token-to-image k | image-to-token q | token-to-image v]
    image_weight: torch.Tensor
    image_addend: torch.Tensor


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)"""
    batch, tokens, channels = x.shape
    return x.reshape(batch, tokens, heads, channels // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, c) -> (B, N, heads * c)"""
    batch, heads, tokens, channels = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * channels)


def _layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    weight, bias, eps = norm
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class DecoderWeights:
    """Everything the fast decoder reads from a SAM model, in the compute dtype, for one model state."""

    def __init__(self, sam: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.signature = _signature(sam)
        # The signature holds these tensors' ids: keep them alive so no new tensor can reuse an id.
        self.kept_alive = [*sam.mask_decoder.parameters(), sam.prompt_encoder.no_mask_embed.weight,
                           sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix]
        with torch.no_grad():
            image_pe = sam.prompt_encoder.get_dense_pe()
        decoder = sam.mask_decoder
        self.no_mask_embedding = sam.prompt_encoder.no_mask_embed.weight.detach().to(dtype).reshape(1, 1, -1)
        pe_tokens = image_pe[0].flatten(1).T.float()  # (HW, C)
        transformer = decoder.transformer
        self.blocks: list[_Block] = []
        for layer in transformer.layers:
            token_to_image = self._attention(layer.cross_attn_token_to_image)
            image_to_token = self._attention(layer.cross_attn_image_to_token)
            image_weight, image_addend = self._image_projection(
                [token_to_image.k, image_to_token.q, token_to_image.v], [True, True, False], pe_tokens)
            self.blocks.append(_Block(
                self_attention=self._attention(layer.self_attn), token_to_image=token_to_image,
                image_to_token=image_to_token,
                norms=[self._norm(getattr(layer, f"norm{index}")) for index in (1, 2, 3, 4)],
                mlp=[_effective_linear(layer.mlp.lin1, dtype), _effective_linear(layer.mlp.lin2, dtype)],
                mlp_activation=layer.mlp.act, skip_first_layer_pe=bool(layer.skip_first_layer_pe),
                image_weight=image_weight, image_addend=image_addend))
        self.final = self._attention(transformer.final_attn_token_to_image)
        self.final_weight, self.final_addend = self._image_projection([self.final.k, self.final.v], [True, False],
                                                                      pe_tokens)
        self.final_norm = self._norm(transformer.norm_final_attn)
        self.output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight]).detach().to(dtype)
        self.num_mask_tokens = int(decoder.num_mask_tokens)
        self.hypernetworks = [[_effective_linear(layer, dtype) for layer in mlp.layers]
                              for mlp in decoder.output_hypernetworks_mlps]
        self.iou_head = [_effective_linear(layer, dtype) for layer in decoder.iou_prediction_head.layers]
        self.iou_sigmoid = bool(getattr(decoder.iou_prediction_head, "sigmoid_output", False))
        first, norm, self.upscale_activation_1, second, self.upscale_activation_2 = decoder.output_upscaling
        self.upscale_1 = self._pixel_matmul(first)
        self.upscale_norm = self._norm(norm)
        self.upscale_2 = self._pixel_matmul(second)
        self.grid = tuple(image_pe.shape[-2:])
        # image_key -> (image tokens, their first-block projection), for the last few slices clicked on
        self.first_block_cache: OrderedDict[object, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_lock = threading.Lock()

    def _attention(self, attention: nn.Module) -> _Attention:
        return _Attention(*(_effective_linear(getattr(attention, name), self.dtype)
                            for name in ("q_proj", "k_proj", "v_proj", "out_proj")), heads=attention.num_heads)

    def _norm(self, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
        return norm.weight.detach().to(self.dtype), norm.bias.detach().to(self.dtype), float(norm.eps)

    def _image_projection(self, projections: list[tuple[torch.Tensor, torch.Tensor]], with_pe: list[bool],
                          pe_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenate projections of ``keys`` (+ ``pe`` where ``with_pe``) into one weight and addend."""
        weight = torch.cat([w for w, _ in projections]).contiguous()
        addend = torch.cat([pe_tokens.to(self.dtype) @ w.T + b if pe else b.expand(pe_tokens.shape[0], -1)
                            for (w, b), pe in zip(projections, with_pe)], dim=1).contiguous()
        return weight, addend

    def _pixel_matmul(self, conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
        """A 2x2 stride-2 transposed convolution as a per-pixel linear map C_in -> (2, 2, C_out)."""
        weight = conv.weight.detach()  # (C_in, C_out, 2, 2)
        channels_in, channels_out = weight.shape[:2]
        matrix = weight.permute(2, 3, 1, 0).reshape(4 * channels_out, channels_in)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(channels_out, device=weight.device)
        return matrix.to(self.dtype).contiguous(), bias.repeat(4).to(self.dtype).contiguous()


class FastMaskDecoder:
    """Callable like ``MaskDecoder.forward`` for one image embedding and a batch of prompts (inference only).

    Thread-safe: a call works on the weights it started with, even if another thread's call re-reads them.
    """

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self._weights: DecoderWeights | None = None
        self._lock = threading.Lock()

    def weights(self, sam: nn.Module) -> DecoderWeights:
        """The prepared weights, read again if the decoder or its adapters changed since the last call."""
        signature = _signature(sam)
        with self._lock:
            if self._weights is None or self._weights.signature != signature:
                self._weights = DecoderWeights(sam, self.dtype)
            return self._weights

    # -- forward ---------------------------------------------------------------------------------------
    @staticmethod
    def _affine(x: torch.Tensor, weight: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
        """(B, N, C_in) @ weight.T + addend, with addend (N, C_out) or (C_out,)."""
        if x.shape[0] == 1:
            return torch.addmm(addend, x[0], weight.T)[None]  # one fused call, no intermediate
        return torch.matmul(x, weight.T).add_(addend)

    @staticmethod
    def _mlp(x: torch.Tensor, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        for index, (weight, bias) in enumerate(layers):
            x = F.linear(x, weight, bias)
            if index < len(layers) - 1:
                x = F.relu(x)
        return x

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """Attention of (B, Nq, C) queries over (Bk, Nk, C) keys/values, where Bk is B or 1 (shared)."""
        batch, queries, channels = q.shape
        if k.shape[0] == 1 and batch > 1:
            # Every query row attends independently: fold the prompts into one long query sequence.
            out = F.scaled_dot_product_attention(_split_heads(q.reshape(1, batch * queries, channels), heads),
                                                 _split_heads(k, heads), _split_heads(v, heads))
            return _merge_heads(out).reshape(batch, queries, channels)
        return _merge_heads(F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads),
                                                           _split_heads(v, heads)))

    @staticmethod
    def _attend_few_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        """Attention of many (Bq, N, C) image queries over a few (B, T, C) prompt tokens (Bq is B or 1).

        The heads become block-diagonal key and value matrices, so the whole attention is two plain matmuls
        and a softmax over the T tokens laid out along a middle axis: CPU softmax kernels are slow over a
        last axis of 5-10 elements, and per-head matmuls of 16 channels are mostly overhead.
        """
        batch, tokens, channels = k.shape
        head_channels = channels // heads
        # block[c, h * T + t] = 1 where channel c belongs to head h
        block = torch.repeat_interleave(torch.eye(heads, dtype=q.dtype, device=q.device), head_channels, dim=0)
        block = torch.repeat_interleave(block, tokens, dim=1)
        keys_block = k.transpose(1, 2).repeat(1, 1, heads) * (block * head_channels ** -0.5)  # (B, C, H*T)
        values_block = v.repeat(1, heads, 1) * block.T  # (B, H*T, C)
        if batch == 1:  # 2D matmuls take the transposed operands without copying them
            scores = torch.mm(keys_block[0].T, q[0].T)[None]  # (1, H*T, N)
        else:
            scores = torch.matmul(keys_block.transpose(1, 2), q.transpose(1, 2))  # (B, H*T, N)
        probabilities = scores.view(batch, heads, tokens, -1).softmax(dim=2).view(batch, heads * tokens, -1)
        if batch == 1:
            return torch.mm(probabilities[0].T, values_block[0])[None]
        return torch.matmul(probabilities.transpose(1, 2), values_block)  # (B, N, C)

    def _block(self, block: _Block, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
               projected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        attention = block.self_attention
        if block.skip_first_layer_pe:
            queries = self._project_attend(attention, queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self._project_attend(attention, q, q, queries)
        queries = _layer_norm(queries, block.norms[0])

        # One matmul projects the image tokens for both cross attentions (positional terms precomputed).
        if projected is None:
            projected = self._affine(keys, block.image_weight, block.image_addend)
        internal = block.token_to_image.k[0].shape[0]
        image_keys, image_queries, image_values = projected.split(
            [internal, block.image_to_token.q[0].shape[0], internal], dim=-1)

        attention = block.token_to_image
        token_queries = F.linear(queries + query_pe, *attention.q)
        attended = self._attend(token_queries, image_keys, image_values, attention.heads)
        queries = _layer_norm(queries + F.linear(attended, *attention.out), block.norms[1])

        mlp_out = F.linear(block.mlp_activation(F.linear(queries, *block.mlp[0])), *block.mlp[1])
        queries = _layer_norm(queries + mlp_out, block.norms[2])

        attention = block.image_to_token
        token_keys = F.linear(queries + query_pe, *attention.k)
        token_values = F.linear(queries, *attention.v)
        attended = self._attend_few_keys(image_queries, token_keys, token_values, attention.heads)
        keys = _layer_norm(keys + F.linear(attended, *attention.out), block.norms[3])
        return queries, keys

    def _project_attend(self, attention: _Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attended = self._attend(F.linear(q, *attention.q), F.linear(k, *attention.k), F.linear(v, *attention.v),
                                attention.heads)
        return F.linear(attended, *attention.out)

    @staticmethod
    def _upscale_masks(weights: DecoderWeights, keys: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """(B, HW, C) image tokens and (B, M, C') hypernetwork outputs -> (B, M, 4H, 4W) mask logits."""
        batch = keys.shape[0]
        height, width = weights.grid
        upscaled = F.linear(keys, *weights.upscale_1)  # (B, HW, [a, b, C1])
        upscaled = upscaled.reshape(batch, height * width * 4, -1)
        upscaled = weights.upscale_activation_1(_layer_norm(upscaled, weights.upscale_norm))
        upscaled = weights.upscale_activation_2(F.linear(upscaled, *weights.upscale_2))  # (B, HW*4, [c, d, C2])
        upscaled = upscaled.reshape(batch, height * width * 16, -1)
        masks = torch.bmm(upscaled, hyper_in.transpose(1, 2))  # (B, pixels as (i, j, a, b, c, d), M)
        masks = masks.reshape(batch, height, width, 2, 2, 2, 2, -1)
        # Row 4i + 2a + c, column 4j + 2b + d.
        return masks.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(batch, -1, 4 * height, 4 * width)

    def _image_tokens(self, weights: DecoderWeights, image_embedding: torch.Tensor,
                      mask_embeddings: torch.Tensor | None, image_key) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1 or B, HW, C) image tokens plus dense prompt, and the first block's projection of them when
        it can be reused (no mask prompt, and the caller named the embedding with ``image_key``)."""
        dtype = weights.dtype
        if mask_embeddings is not None:
            keys = image_embedding.to(dtype).flatten(2).transpose(1, 2)
            return (keys + mask_embeddings.to(dtype).flatten(2).transpose(1, 2)).contiguous(), None
        with weights.cache_lock:
            cached = weights.first_block_cache.get(image_key) if image_key is not None else None
            if cached is not None:
                weights.first_block_cache.move_to_end(image_key)
                return cached
        # contiguous: the sum keeps the (C, HW) strides of its input, and strided adds are slow
        keys = (image_embedding.to(dtype).flatten(2).transpose(1, 2) + weights.no_mask_embedding).contiguous()
        first = weights.blocks[0]
        cached = (keys, self._affine(keys, first.image_weight, first.image_addend))
        if image_key is not None:
            with weights.cache_lock:
                weights.first_block_cache[image_key] = cached
                while len(weights.first_block_cache) > FIRST_BLOCK_CACHE_SLICES:
                    weights.first_block_cache.popitem(last=False)
        return cached

    @torch.inference_mode()
    def __call__(self, sam: nn.Module, image_embedding: torch.Tensor, sparse_prompt_embeddings: torch.Tensor, mask_embeddings: torch.Tensor | None,
                 multimask_output: bool, image_key=None,
                 min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``sam.mask_decoder(image_embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense,
        multimask_output)`` for a
        (1, C, H, W) embedding and B prompts. ``mask_embeddings`` is the prompt encoder's (B, C, H, W)
        dense output for mask prompts, or None without them (``no_mask_embed``: the prompts then share the
        image tokens up to the first image-to-token attention). A hashable ``image_key`` naming the
        embedding lets later calls on the same slice reuse the first block's image projections.
        With ``min_score``, prompts whose masks all have a predicted IoU below it skip the upscaling (the
        largest part of a prompt's cost): their logits are ``SKIPPED_LOGIT`` everywhere. Automatic
        segmentation discards such masks anyway.
        Returns float32 low-res logits (B, M, 4H, 4W) and predicted IoU (B, M)."""
        weights = self.weights(sam)
        batch = sparse_prompt_embeddings.shape[0]
        tokens = torch.cat([weights.output_tokens.expand(batch, -1, -1),
                            sparse_prompt_embeddings.to(weights.dtype)], dim=1)
        keys, projected = self._image_tokens(weights, image_embedding, mask_embeddings, image_key)
        queries = tokens
        for index, block in enumerate(weights.blocks):
            queries, keys = self._block(block, queries, keys, tokens, projected if index == 0 else None)

        projected = self._affine(keys, weights.final_weight, weights.final_addend)
        final_keys, final_values = projected.chunk(2, dim=-1)
        final_queries = F.linear(queries + tokens, *weights.final.q)
        attended = self._attend(final_queries, final_keys, final_values, weights.final.heads)
        queries = _layer_norm(queries + F.linear(attended, *weights.final.out), weights.final_norm)

        mask_indices = range(1, weights.num_mask_tokens) if multimask_output else range(0, 1)
        hyper_in = torch.stack([self._mlp(queries[:, 1 + index], weights.hypernetworks[index])
                                for index in mask_indices], dim=1)
        iou = self._mlp(queries[:, 0], weights.iou_head)
        if weights.iou_sigmoid:
            iou = torch.sigmoid(iou)
        iou = iou[:, mask_indices.start:mask_indices.stop].float()
        # keys are per prompt here: the first image-to-token attention gave each prompt its own.
        if min_score is None:
            return self._upscale_masks(weights, keys, hyper_in).float(), iou
        kept = torch.nonzero(iou.amax(dim=1) >= min_score).flatten()
        height, width = weights.grid
        masks = torch.full((batch, len(mask_indices), 4 * height, 4 * width), SKIPPED_LOGIT)
        if len(kept):
            masks[kept] = self._upscale_masks(weights, keys[kept], hyper_in[kept]).float()
        return masks, iou
