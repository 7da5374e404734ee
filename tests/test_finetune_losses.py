"""The Dice + cross-entropy losses match MONAI's DiceCELoss and behave as losses should."""

import pytest
import torch

from napari_sam_ft.finetune.losses import binary_dice_ce, multiclass_dice_ce


def test_binary_loss_matches_monai_and_rewards_the_right_mask():
    monai_losses = pytest.importorskip("monai.losses")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 20, 24, generator=generator)
    targets = (torch.rand(3, 1, 20, 24, generator=generator) > 0.7).float()
    reference = monai_losses.DiceCELoss(sigmoid=True, batch=True)(logits, targets)
    assert binary_dice_ce(logits, targets).item() == pytest.approx(reference.item(), rel=1e-5)
    perfect = (targets * 2 - 1) * 20
    assert binary_dice_ce(perfect, targets) < 0.01 < binary_dice_ce(-perfect, targets) - 1.5


def test_multiclass_loss_matches_monai_and_has_gradients():
    monai_losses = pytest.importorskip("monai.losses")
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 16, 18, generator=generator, requires_grad=True)
    indices = torch.randint(0, 4, (2, 1, 16, 18), generator=generator)
    reference = monai_losses.DiceCELoss(softmax=True, to_onehot_y=True, include_background=False,
                                        batch=True)(logits, indices)
    loss = multiclass_dice_ce(logits, indices)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    perfect = torch.nn.functional.one_hot(indices[:, 0], 4).movedim(-1, 1).float() * 30
    assert multiclass_dice_ce(perfect, indices) < 0.01
