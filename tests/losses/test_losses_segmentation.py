"""Region Dice + BCE loss: closed forms, gradients, deep supervision."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trifuse.losses import RegionDiceBCELoss, deep_supervision_loss, deep_supervision_weights, region_dice_bce


def masks(seed=0, shape=(2, 3, 16, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) > 0.5).float()


def test_perfect_confident_logits_give_near_zero_loss():
    t = masks()
    logits = (2 * t - 1) * 30.0
    assert region_dice_bce(logits, t).item() < 1e-6
    assert region_dice_bce(logits, t.to(torch.uint8)).item() < 1e-6  # any target dtype


def test_closed_form_at_zero_logits():
    # logits 0 → p = 1/2 everywhere: BCE = ln 2; soft Dice = 2·(n_pos/2) / (N/2 + n_pos) per channel
    t = torch.zeros(1, 3, 4, 4, 4)
    t[:, :, :2] = 1  # half the voxels positive: n_pos = 32, N = 64
    z = torch.zeros_like(t)
    bce = region_dice_bce(z, t, dice_weight=0.0)
    assert bce.item() == pytest.approx(math.log(2), rel=1e-6)
    dice = region_dice_bce(z, t, bce_weight=0.0, smooth_nr=0.0, smooth_dr=0.0)
    assert dice.item() == pytest.approx(1 - 32 / (32 + 32), rel=1e-6)
    both = region_dice_bce(z, t, smooth_nr=0.0, smooth_dr=0.0)
    assert both.item() == pytest.approx(0.5 + math.log(2), rel=1e-6)


def test_pos_weight_matches_torch():
    t = masks(1)
    logits = torch.randn_like(t)
    pw = [1.0, 2.0, 4.0]
    got = region_dice_bce(logits, t, dice_weight=0.0, pos_weight=pw)
    ref = F.binary_cross_entropy_with_logits(logits, t, pos_weight=torch.tensor(pw).view(3, 1, 1, 1))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)


def test_gradient_finite_and_descends():
    t = masks(2)
    logits = torch.zeros_like(t, requires_grad=True)
    loss = region_dice_bce(logits, t)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the gradient pushes positives up and negatives down
    assert (logits.grad[t == 1] < 0).all() and (logits.grad[t == 0] > 0).all()
    # extreme logits stay finite (BCE with logits is stable)
    big = ((2 * t - 1) * -1e4).requires_grad_()
    region_dice_bce(big, t).backward()
    assert torch.isfinite(big.grad).all()


def test_module_equals_function_and_batch_dice():
    t = masks(3)
    logits = torch.randn_like(t)
    assert RegionDiceBCELoss()(logits, t).item() == pytest.approx(region_dice_bce(logits, t).item())
    a = RegionDiceBCELoss(batch=True)(logits, t)
    assert a.item() == pytest.approx(region_dice_bce(logits, t, batch=True).item())
    with pytest.raises(ValueError, match="shapes differ"):
        region_dice_bce(logits, t[:, :2])


def test_deep_supervision_weights():
    assert deep_supervision_weights(3, normalize=False) == [1.0, 0.5, 0.25]
    assert deep_supervision_weights(4, "nnunet") == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert sum(deep_supervision_weights(5, "two")) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        deep_supervision_weights(2, "bogus")


def test_deep_supervision_loss_list_and_stacked():
    t = masks(4)
    full = torch.randn_like(t)
    # a half-resolution head that is perfect for the nearest-exact downsampled target
    t_half = F.interpolate(t, size=(8, 8, 8), mode="nearest-exact")
    half = (2 * t_half - 1) * 30.0
    w = deep_supervision_weights(2)
    got = deep_supervision_loss([full, half], t)
    expect = w[0] * region_dice_bce(full, t) + w[1] * region_dice_bce(half, t_half)
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert RegionDiceBCELoss()([full, half], t).item() == pytest.approx(got.item(), rel=1e-6)
    # DynUNet's stacked (B, L, C, D, H, W) training output
    stacked = torch.stack([full, full], dim=1)
    assert RegionDiceBCELoss(ds_weights=[0.5, 0.5])(stacked, t).item() == pytest.approx(region_dice_bce(full, t).item(), rel=1e-5)
