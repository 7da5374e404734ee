"""Dice + cross-entropy losses (the same definitions as MONAI's ``DiceCELoss``, without the dependency).

Dice is soft Dice summed over the batch and the pixels (one ratio per channel, then the channel mean),
with MONAI's smoothing of 1e-5 on both sides; the cross-entropy is the mean over pixels. The test suite
checks both against MONAI where it is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SMOOTH = 1e-5


def _soft_dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 - Dice per channel of (B, C, H, W) probabilities and targets, reduced over batch and pixels; mean."""
    axes = [0, *range(2, probabilities.ndim)]
    intersection = (probabilities * targets).sum(axes)
    sizes = probabilities.sum(axes) + targets.sum(axes)
    return (1 - (2 * intersection + SMOOTH) / (sizes + SMOOTH)).mean()


def binary_dice_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) mask logits and {0, 1} targets -> Dice on sigmoid probabilities + BCE with logits."""
    targets = targets.to(logits.dtype)
    return (_soft_dice_loss(torch.sigmoid(logits), targets)
            + F.binary_cross_entropy_with_logits(logits, targets))


def multiclass_dice_ce(logits: torch.Tensor, class_indices: torch.Tensor) -> torch.Tensor:
    """(B, 1 + K, H, W) logits and (B, 1, H, W) channel indices (0 = background) -> Dice over the K class
    channels of the softmax + cross-entropy over all 1 + K channels."""
    channels = logits.shape[1]
    indices = class_indices[:, 0].long()
    one_hot = F.one_hot(indices, channels).movedim(-1, 1).to(logits.dtype)
    probabilities = torch.softmax(logits, dim=1)
    return (_soft_dice_loss(probabilities[:, 1:], one_hot[:, 1:])
            + F.cross_entropy(logits, indices))
