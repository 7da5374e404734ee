"""TinyViT image encoder as used by LiteMedSAM and MobileSAM.

A compact re-implementation of the TinyViT-5M backbone plus the SAM "neck"
that turns it into a Segment Anything image encoder.  Parameter and buffer
names mirror the upstream modules so that the released checkpoints
(``image_encoder.*`` entries, prefix stripped) load with ``strict=True``.

Layout of the network (``embed_dims=[64, 128, 160, 320]``)::

    stem -> stage 0 (MBConv)      -> merge (/2)
         -> stage 1 (window attn) -> merge (/2)
         -> stage 2 (window attn) -> merge (/1, channels only)
         -> stage 3 (window attn) -> neck -> (B, 256, H/s, W/s)

The two published variants differ only in the stem:

* LiteMedSAM (256 px input) uses two 1x1 convolutions with stride 1, so the
  stages run at 256, 128, 64 and 64 px and the embedding is 64x64.
* MobileSAM (1024 px input) uses two 3x3 stride-2 convolutions, so the stages
  run at 256, 128, 64 and 64 px as well and the embedding is again 64x64.
  Its checkpoint also carries an (unused) ImageNet classifier head,
  ``norm_head`` / ``head``, which we create so the weights load strictly.

Inside the attention stages tokens are kept as ``(B, H, W, C)`` tensors: this
is what LayerNorm/Linear want, and ``permute(0, 3, 1, 2)`` of it is a free
channels-last NCHW view for the depthwise convolutions.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["TinyViT", "tiny_vit_litemedsam", "tiny_vit_mobilesam"]

# Output channels of the SAM neck; the prompt encoder / mask decoder expect 256.
SAM_EMBED_DIM = 256


class ConvBN(nn.Module):
    """Bias-free ``Conv2d`` followed by ``BatchNorm2d`` (keys ``c.*``, ``bn.*``)."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.bn(self.c(x))
        # In eval mode BatchNorm is an affine map, so fold it into the conv
        # weights (a weight-sized op) instead of making another full pass over
        # the activations; this is the bulk of the 256x256 stage-0 cost.
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.c.weight * scale.view(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return F.conv2d(
            x, weight, bias, self.c.stride, self.c.padding, self.c.dilation, self.c.groups
        )


class PatchEmbed(nn.Module):
    """Stem: two ConvBN layers with a GELU between them (keys ``seq.{0,2}.*``)."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int) -> None:
        super().__init__()
        # LiteMedSAM replaced MobileSAM's two 3x3/stride-2 convs with 1x1/stride-1
        # ones, so its 256 px input still gives a 64x64 embedding.
        kernel, step = {1: (1, 1), 4: (3, 2)}[stride]
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, kernel_size=kernel, stride=step),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, kernel_size=kernel, stride=step),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, kernel_size=3, groups=hidden)
        # Zero-init of the last BN makes a fresh block start as identity.
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        # Unlike a usual residual, GELU is applied after the sum (as upstream).
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Change the channel count and (optionally) halve the resolution.

    Takes and returns ``(B, C, H, W)`` tensors.
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, kernel_size=3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


class ConvStage(nn.Module):
    """Stage 0: a stack of MBConv blocks followed by a patch merge."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


def _relative_offset_index(window: int) -> torch.Tensor:
    """``(N, N)`` index into the per-head bias table, ``N = window**2``.

    Upstream enumerates the distinct ``(|dy|, |dx|)`` offsets in first-seen
    order while scanning point pairs.  The first point is ``(0, 0)``, whose
    offsets to all points already enumerate every ``(dy, dx)`` in row-major
    order, so that table index is simply ``dy * window + dx``.
    """
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # (2, N)
    delta = (coords[:, :, None] - coords[:, None, :]).abs()  # (2, N, N)
    return delta[0] * window + delta[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention over ``window x window`` token groups.

    Includes the pre-norm and a learned bias per head and relative offset.
    Input is ``(num_windows, N, C)``.
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        # Per head the output channels are laid out as [q | k | v].
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        # Derived from the window size alone, so it stays out of the state
        # dict (the checkpoints do not contain it either).
        self.register_buffer(
            "attention_bias_idxs", _relative_offset_index(window), persistent=False
        )
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None

    def _attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``(heads, N, N)`` bias, gathered from the per-offset table.

        Without autograd the gather is kept and reused while the table is the
        same tensor at the same in-place version (load_state_dict and optimiser
        steps bump it), so unlike upstream's eval-time cache it cannot go
        stale. Traced graphs (torch.export, torch.compile) gather every time.
        """
        table = self.attention_biases
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return table[:, self.attention_bias_idxs].to(dtype)
        key = (table.data_ptr(), table._version, table.device, dtype, self.attention_bias_idxs.data_ptr(),
               torch.is_inference_mode_enabled())
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, table[:, self.attention_bias_idxs].to(dtype))
        return self._bias_cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows, n, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(windows, n, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (windows, heads, N, d)
        bias = self._attention_bias(q.dtype)
        # SDPA's default scale is head_dim ** -0.5, the same as upstream.  The
        # mask must be 4-D: a 3-D one silently sends CPU SDPA down its slow
        # "math" fallback (about 5x slower here).
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(windows, n, dim))


class Mlp(nn.Module):
    """Pre-norm two-layer MLP."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention, depthwise "local" conv, MLP.  Works on ``(B, H, W, C)``."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = ConvBN(dim, dim, kernel_size=local_conv_size, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = -h % ws, -w % ws
        # Upstream pads with zeros *before* the attention's LayerNorm, so the
        # padded tokens take part as keys/values; we must do the same.
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        # Batch all windows in one call: (B, nh, ws, nw, ws, C) -> (B*nh*nw, ws*ws, C)
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(x)
        # (B, H, W, C) -> NCHW view with channels-last strides, no copy.
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks, then an optional patch merge."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in, ``(B, C', H', W')`` out."""
        # No copy when the input is already channels-last.
        x = x.permute(0, 2, 3, 1).contiguous()
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same maths as upstream's mean/var formula, but one fused kernel.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class TinyViT(nn.Module):
    """TinyViT backbone + SAM neck, returning ``(B, 256, H', W')`` embeddings.

    Args:
        img_size: expected input side length (only used for bookkeeping; the
            forward pass follows the actual input shape).
        in_chans: input channels.
        embed_dims, depths: channels and block count of the four stages.
        num_heads, window_sizes: attention heads / window side for each stage
            (entry 0 is ignored: stage 0 is convolutional).
        mlp_ratio: MLP hidden size relative to the stage width.
        mbconv_expand_ratio: hidden size of the stage-0 MBConv blocks.
        local_conv_size: kernel of the depthwise conv inside attention blocks.
        stem_stride: 1 for LiteMedSAM's 1x1-conv stem, 4 for MobileSAM's two
            3x3 stride-2 convs.
        num_classes: >0 adds the classifier head that MobileSAM's checkpoint
            carries (``norm_head``, ``head``); it is not used by ``forward``.
    """

    def __init__(
        self,
        img_size: int,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        *,
        stem_stride: int = 1,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        n_stages = len(depths)
        assert len(embed_dims) == len(num_heads) == len(window_sizes) == n_stages
        assert stem_stride in (1, 4), "stem_stride must be 1 (LiteMedSAM) or 4 (MobileSAM)"
        self.img_size = img_size

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], stem_stride)

        def merge(i: int) -> nn.Module | None:
            if i == n_stages - 1:
                return None
            # The merge into the last stage keeps the resolution and only widens
            # the channels (upstream keys this on out_dim in {320, 448, 576},
            # i.e. the last merge of every published TinyViT size).
            stride = 1 if i == n_stages - 2 else 2
            return PatchMerging(embed_dims[i], embed_dims[i + 1], stride)

        self.layers = nn.ModuleList(
            [ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merge(0))]
        )
        for i in range(1, n_stages):
            self.layers.append(
                AttentionStage(
                    embed_dims[i],
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    merge(i),
                )
            )

        if num_classes > 0:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], SAM_EMBED_DIM, kernel_size=1, bias=False),
            LayerNorm2d(SAM_EMBED_DIM),
            nn.Conv2d(SAM_EMBED_DIM, SAM_EMBED_DIM, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(SAM_EMBED_DIM),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # Matches upstream so a randomly initialised model behaves similarly.
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, S, S)`` image -> ``(B, 256, S/s, S/s)`` SAM embedding.

        ``s`` is 4 for LiteMedSAM (256 -> 64) and 16 for MobileSAM (1024 -> 64).
        """
        # Channels-last lets oneDNN run the convolutions without layout
        # reorders and makes the NCHW <-> (B, H, W, C) permutes free (about
        # 25% faster on CPU here).  A no-op if the caller already did it.
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        # Hand back an ordinary contiguous tensor (a 4 MB copy) so callers can
        # .view() it freely.
        return self.neck(x).contiguous()


def tiny_vit_litemedsam() -> TinyViT:
    """LiteMedSAM encoder: 256x256 input -> (B, 256, 64, 64)."""
    return TinyViT(
        img_size=256,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        stem_stride=1,
    )


def tiny_vit_mobilesam() -> TinyViT:
    """MobileSAM encoder: 1024x1024 input -> (B, 256, 64, 64)."""
    return TinyViT(
        img_size=1024,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        stem_stride=4,
        num_classes=1000,
    )
