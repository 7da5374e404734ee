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


def test_batch_loss_is_the_batch_dice_over_present_classes():
    monai_losses = pytest.importorskip("monai.losses")
    from napari_sam_ft.finetune.losses import batch_dice_ce, class_weights

    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 16, 18, generator=generator, requires_grad=True)
    indices = torch.randint(0, 4, (2, 1, 16, 18), generator=generator)
    indices[:, :, :8] = 0  # background twice as common as the classes together
    # Slices of one size: MONAI's batch Dice (without background) + cross-entropy with the class weights.
    together = batch_dice_ce(list(logits), list(indices[:, 0]))
    weights = class_weights(torch.bincount(indices.reshape(-1), minlength=4))
    assert weights[0] == 1 and (weights[1:] > 1).all()
    dice = monai_losses.DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=True)(logits, indices)
    cross_entropy = torch.nn.functional.cross_entropy(logits, indices[:, 0], weight=weights)
    assert together.item() == pytest.approx((dice + cross_entropy).item(), rel=1e-5)
    together.backward()
    assert torch.isfinite(logits.grad).all()
    # A class absent from the batch costs nothing in the Dice term, however much probability it gets.
    only_one = torch.where(indices[:, 0] == 2, 0, indices[:, 0]) % 2  # classes 0 and 1 only
    confident = torch.nn.functional.one_hot(only_one, 4).movedim(-1, 1).float() * 30
    confident[:, 3] = 29.0  # a strong (but not winning) class 3 everywhere
    small_slice = confident[0, :, :8, :9]
    loss = batch_dice_ce([confident[0], small_slice], [only_one[0], only_one[0, :8, :9]])
    assert loss.item() < 0.6  # the per-slice Dice of absent class 3 would add ~1
