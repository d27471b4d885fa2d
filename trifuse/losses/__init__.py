"""Segmentation losses (functions first, thin modules)."""
from trifuse.losses.segmentation import (
    RegionDiceBCELoss,
    deep_supervision_loss,
    deep_supervision_weights,
    region_dice_bce,
)

__all__ = ["RegionDiceBCELoss", "deep_supervision_loss", "deep_supervision_weights", "region_dice_bce"]
