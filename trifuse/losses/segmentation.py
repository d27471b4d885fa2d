"""Region-based segmentation loss: soft Dice + BCE over the nested WT/TC/ET channels.

Region training (one sigmoid per nested region instead of a softmax over labels) is the
nnU-Net BraTS recipe (Isensee et al., "nnU-Net for Brain Tumor Segmentation", BrainLes 2020)
and MONAI's BraTS tutorial; the Dice part is MONAI's ``DiceLoss(sigmoid=True)`` (Milletari et
al., V-Net, 3DV 2016), the BCE part ``torch.nn.functional.binary_cross_entropy_with_logits``.
Deep supervision reuses MONAI's ``DeepSupervisionLoss`` (targets resized by nearest neighbour).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DeepSupervisionLoss, DiceLoss
from torch import nn

__all__ = [
    "region_dice_bce",
    "RegionDiceBCELoss",
    "deep_supervision_weights",
    "deep_supervision_loss",
]

WeightMode = Literal["exp", "same", "two", "nnunet"]


def region_dice_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    batch: bool = False,
    pos_weight: torch.Tensor | Sequence[float] | None = None,
) -> torch.Tensor:
    """``dice_weight · DiceLoss(sigmoid) + bce_weight · BCEWithLogits`` over region channels.

    Args:
        logits: ``(B, C, *spatial)`` raw network outputs (C = 3: WT, TC, ET).
        target: ``(B, C, *spatial)`` binary region masks (any dtype).
        dice_weight: weight of the soft Dice term.
        bce_weight: weight of the BCE term.
        smooth_nr: Dice numerator smoothing (MONAI ``DiceLoss``).
        smooth_dr: Dice denominator smoothing.
        batch: pool the Dice over the batch before dividing (nnU-Net "batch Dice"); more
            stable when a region is absent from some patches.
        pos_weight: optional per-channel positive weight ``(C,)`` for the BCE term.

    Returns:
        scalar loss (mean over batch and channels).

    Note:
        With ``batch=False`` a channel whose target is empty scores Dice loss
        ``1 - smooth_nr / (Σp + smooth_dr)``: the predicted mass Σp must be far below
        ``smooth_dr`` for the loss to vanish. That is MONAI's behaviour, kept as is.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits and target shapes differ: {tuple(logits.shape)} vs {tuple(target.shape)}")
    logits = logits.float()
    target = target.to(dtype=logits.dtype)
    loss = logits.new_zeros(())
    if dice_weight:
        dice = DiceLoss(sigmoid=True, include_background=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch)
        loss = loss + dice_weight * dice(logits, target)
    if bce_weight:
        pw = None
        if pos_weight is not None:
            pw = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
            pw = pw.reshape(-1, *([1] * (logits.ndim - 2)))  # broadcast over the channel axis
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw)
    return loss


def deep_supervision_weights(levels: int, mode: WeightMode = "exp", normalize: bool = True) -> list[float]:
    """Weights of deep-supervision outputs, full resolution first.

    Args:
        levels: number of outputs.
        mode: ``"exp"`` 1, 1/2, 1/4, … (MONAI, floored at 1/16); ``"same"`` all 1;
            ``"two"`` 1, 1/2, 1/2, …; ``"nnunet"`` 1/2^i with the lowest resolution set to 0
            (Isensee et al., nnU-Net).
        normalize: scale the weights to sum to 1, so the loss keeps the scale of a single output.

    Returns:
        ``levels`` floats.
    """
    if levels < 1:
        raise ValueError(f"levels must be ≥ 1, got {levels}")
    if mode == "nnunet":
        w = [0.5**i for i in range(levels)]
        if levels > 1:
            w[-1] = 0.0
    elif mode in ("exp", "same", "two"):
        w = DeepSupervisionLoss(nn.Identity(), weight_mode=mode).get_weights(levels)  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown deep-supervision weight mode {mode!r}")
    if normalize:
        s = sum(w)
        w = [x / s for x in w]
    return [float(x) for x in w]


def _split_levels(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    # DynUNet in training mode stacks its heads: (B, L, C, *spatial) with spatial dims ≥ 2
    return list(torch.unbind(outputs, dim=1))


def deep_supervision_loss(
    outputs: Sequence[torch.Tensor] | torch.Tensor,
    target: torch.Tensor,
    loss_fn=region_dice_bce,
    weights: Sequence[float] | WeightMode = "exp",
) -> torch.Tensor:
    """Weighted sum of ``loss_fn`` over deep-supervision outputs, full resolution first.

    Args:
        outputs: list of ``(B, C, *spatial_l)`` logits, or DynUNet's stacked ``(B, L, C, *spatial)``.
        target: ``(B, C, *spatial)`` full-resolution masks; resized to each output with
            nearest-neighbour interpolation (MONAI ``DeepSupervisionLoss``).
        loss_fn: ``loss_fn(logits, target) -> scalar``.
        weights: explicit weights or a mode of :func:`deep_supervision_weights` (normalised).

    Returns:
        scalar loss.
    """
    levels = _split_levels(outputs)
    w = deep_supervision_weights(len(levels), weights) if isinstance(weights, str) else [float(x) for x in weights]
    if len(w) != len(levels):
        raise ValueError(f"got {len(w)} weights for {len(levels)} outputs")
    ds = DeepSupervisionLoss(loss_fn, weights=w)  # type: ignore[arg-type]
    return ds(levels, target.float())


class RegionDiceBCELoss(nn.Module):
    """Module form of :func:`region_dice_bce`, optionally deep-supervised.

    ``forward(logits, target)`` accepts a tensor ``(B, C, *spatial)``, a list of
    deep-supervision outputs, or DynUNet's stacked ``(B, L, C, *spatial)`` output (recognised
    by having one more dimension than ``target``).

    Args:
        dice_weight, bce_weight, smooth_nr, smooth_dr, batch, pos_weight: see :func:`region_dice_bce`.
        ds_weights: deep-supervision weights or mode (see :func:`deep_supervision_weights`).
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        pos_weight: Sequence[float] | None = None,
        ds_weights: Sequence[float] | WeightMode = "exp",
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            dice_weight=dice_weight, bce_weight=bce_weight, smooth_nr=smooth_nr, smooth_dr=smooth_dr, batch=batch
        )
        if pos_weight is not None:
            self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32), persistent=False)
        else:
            self.pos_weight = None
        self.ds_weights = ds_weights

    def single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one output."""
        return region_dice_bce(logits, target, pos_weight=self.pos_weight, **self.kwargs)

    def forward(self, logits, target: torch.Tensor) -> torch.Tensor:
        if isinstance(logits, (list, tuple)) or logits.ndim == target.ndim + 1:
            return deep_supervision_loss(logits, target, self.single, self.ds_weights)
        return self.single(logits, target)
