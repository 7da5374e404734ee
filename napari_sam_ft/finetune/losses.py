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


def batch_dice_ce(logits: list[torch.Tensor], class_indices: list[torch.Tensor]) -> torch.Tensor:
    """Automatic-head loss of a batch of slices that may differ in size: one (1 + K, H_i, W_i) logit map and
    one (H_i, W_i) channel-index map per slice.

    Dice is one ratio per class over the whole batch, and only over the classes present in it; the
    cross-entropy is the mean over every pixel, weighted by ``class_weights``. A class absent from a slice (the pallidum on a slice
    through the hippocampus only) would otherwise give that slice a Dice loss of ~1 for any probability
    above 0, pushing a young head of small structures towards "nothing anywhere".
    """
    channels = logits[0].shape[0]
    counts = sum(torch.bincount(indices.reshape(-1).long(), minlength=channels) for indices in class_indices)
    weights = class_weights(counts).to(logits[0].dtype)
    intersection = logits[0].new_zeros(channels - 1)
    sizes = logits[0].new_zeros(channels - 1)
    present = torch.zeros(channels - 1, dtype=torch.bool, device=logits[0].device)
    cross_entropy = logits[0].new_zeros(())
    pixels = 0
    for slice_logits, indices in zip(logits, class_indices):
        indices = indices.long()
        one_hot = F.one_hot(indices, channels).movedim(-1, 0).to(slice_logits.dtype)[1:]
        probabilities = torch.softmax(slice_logits, dim=0)[1:]
        intersection = intersection + (probabilities * one_hot).sum((1, 2))
        sizes = sizes + probabilities.sum((1, 2)) + one_hot.sum((1, 2))
        present |= one_hot.sum((1, 2)) > 0
        cross_entropy = cross_entropy + F.cross_entropy(slice_logits[None], indices[None], weight=weights,
                                                        reduction="sum")
        pixels += float(weights[indices].sum())
    dice_loss = 1 - (2 * intersection + SMOOTH) / (sizes + SMOOTH)
    dice_term = dice_loss[present].mean() if bool(present.any()) else dice_loss.new_zeros(())
    return dice_term + cross_entropy / pixels


# A class's cross-entropy weight grows as the square root of how much rarer it is than the background, up
# to this: a structure of 100 pixels in a 20,000-pixel window weighs ~14x a background pixel.
MAX_CLASS_WEIGHT = 20.0


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """(1 + K,) pixel counts (background first) -> cross-entropy weights: 1 for the background,
    sqrt(background / class) for each class present (at most ``MAX_CLASS_WEIGHT``), 1 for absent ones."""
    counts = counts.double()
    weights = torch.sqrt(counts[0].clamp(min=1) / counts.clamp(min=1)).clamp(1.0, MAX_CLASS_WEIGHT)
    weights[counts == 0] = 1.0
    weights[0] = 1.0
    return weights.float()
