"""The automatic (no-prompt) multi-class head that a fine-tuned adapter can carry.

SAM's mask decoder turns output tokens into masks: a token attends to the image in the two-way
transformer, a hypernetwork MLP maps it to 32 weights, and those weights dot the upscaled image
features. ``ClassHead`` reuses that machinery with no prompts: it owns one learned token per output
channel (background + K classes), all started from SAM's first mask token, and a hypernetwork whose
first two layers are shared (copied from SAM's first hypernetwork MLP) and whose last layer is one per
channel (each a copy of that MLP's last layer). The transformer and the upscaling network are SAM's own,
so a LoRA-tuned decoder transformer serves both the prompted and the automatic mode.

Contract with the engine: ``head(sam, image_embeddings)`` with (B, 256, 64, 64) float32 embeddings
returns (B, 1 + K, 256, 256) low-resolution logits; channel 0 is background and channel k is class
``class_ids[k - 1]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassHead(nn.Module):
    """No-prompt head producing 1 + ``num_classes`` logit channels from SAM's mask decoder."""

    def __init__(self, num_classes: int, transformer_dim: int = 256, upscaled_dim: int = 32):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a class head needs at least one class, got {num_classes}")
        self.num_classes = int(num_classes)
        channels = self.num_classes + 1
        self.class_tokens = nn.Parameter(torch.zeros(channels, transformer_dim))
        self.hidden = nn.ModuleList([nn.Linear(transformer_dim, transformer_dim),
                                     nn.Linear(transformer_dim, transformer_dim)])
        self.out_weight = nn.Parameter(torch.zeros(channels, upscaled_dim, transformer_dim))
        self.out_bias = nn.Parameter(torch.zeros(channels, upscaled_dim))

    @classmethod
    def from_decoder(cls, mask_decoder: nn.Module, num_classes: int, token_noise: float = 0.02,
                     seed: int = 0) -> "ClassHead":
        """A head started from a SAM mask decoder's first mask token and hypernetwork MLP.

        Identical starting tokens would give identical channels; a little seeded noise breaks the tie.
        """
        token = mask_decoder.mask_tokens.weight[0].detach()
        mlp = mask_decoder.output_hypernetworks_mlps[0]
        layers = list(mlp.layers)
        if len(layers) != 3:
            raise ValueError(f"expected a 3-layer hypernetwork MLP, got {len(layers)} layers")
        head = cls(num_classes, token.shape[0], layers[-1].out_features)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            noise = torch.randn(head.class_tokens.shape, generator=generator) * token.norm() / token.numel() ** 0.5
            head.class_tokens.copy_(token.unsqueeze(0) + token_noise * noise)
            for target, source in zip(head.hidden, layers[:2]):
                target.load_state_dict(source.state_dict())
            head.out_weight.copy_(layers[2].weight.detach().unsqueeze(0).expand_as(head.out_weight))
            head.out_bias.copy_(layers[2].bias.detach().unsqueeze(0).expand_as(head.out_bias))
        return head.to(token.device)

    def forward(self, sam: nn.Module, image_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, 256, 64, 64) image embeddings -> (B, 1 + K, 256, 256) low-res logits."""
        decoder = sam.mask_decoder
        prompt_encoder = sam.prompt_encoder
        batch, channels, height, width = image_embeddings.shape
        tokens = self.class_tokens.unsqueeze(0).expand(batch, -1, -1)
        # The prompt encoder's "no mask" embedding is what SAM adds to the image when no mask is given.
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        source = image_embeddings + dense
        positional = prompt_encoder.get_dense_pe().expand(batch, -1, -1, -1)
        token_out, image_out = decoder.transformer(source, positional, tokens)
        image_out = image_out.transpose(1, 2).reshape(batch, channels, height, width)
        upscaled = decoder.output_upscaling(image_out)  # (B, 32, 4h, 4w)
        hidden = token_out
        for layer in self.hidden:
            hidden = F.relu(layer(hidden))
        weights = torch.einsum("bkd,kcd->bkc", hidden, self.out_weight) + self.out_bias  # (B, 1 + K, 32)
        b, c, up_height, up_width = upscaled.shape
        return (weights @ upscaled.reshape(b, c, up_height * up_width)).reshape(b, -1, up_height, up_width)
