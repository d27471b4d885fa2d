"""A region-based segmentation LightningModule: patches in training, whole cases in validation.

This is the plain MRI model of the foundation stage; the teacher and student
modules of the feature tier build on it. Every part (network, loss, metrics) is
passed in, so LightningCLI configs can swap them by ``class_path``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from trifuse import keys


def default_net(in_channels: int = 4, out_channels: int = 3) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=16)


class RegionDiceBCE(nn.Module):
    """Dice + BCE on sigmoid region logits (WT, TC, ET), MONAI DiceLoss + torch BCE."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.dice_weight, self.bce_weight = dice_weight, bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * bce


class SegmentationModule(L.LightningModule):
    """Region segmentation of WT/TC/ET from a configurable set of input keys.

    Args:
        net: network ``(B, in_channels, D, H, W) → (B, 3, D, H, W)`` logits; default a MONAI
            SegResNet (16 initial filters).
        inputs: sample keys concatenated along channels as the network input.
        criterion: loss on ``(logits, label)``; default Dice + BCE per region.
        lr, weight_decay: AdamW (the method's paper: wd 1e-4).
        roi_size: sliding-window ROI for whole-case inference (linked to the data patch size).
        sw_batch_size, overlap: sliding-window settings.
        compute_hd95: also compute HD95 in validation (slower on CPU).
    """

    def __init__(
        self,
        net: Optional[nn.Module] = None,
        inputs: Sequence[str] = (keys.MRI,),
        criterion: Optional[nn.Module] = None,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        roi_size: Sequence[int] = (128, 128, 128),
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        compute_hd95: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "criterion"])
        self.inputs = tuple(inputs)
        self.net = net if net is not None else default_net()
        self.criterion = criterion if criterion is not None else RegionDiceBCE()
        from trifuse.metrics import BratsRegionMetrics

        self.val_metrics = BratsRegionMetrics(hd95=compute_hd95)
        self.last_val_summary: dict[str, float] = {}

    def net_input(self, batch: dict) -> torch.Tensor:
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            raise KeyError(f"batch lacks input(s) {missing}; configure the data module to provide them")
        return torch.cat([batch[k].float() for k in self.inputs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(self.net_input(batch))
        loss = self.criterion(logits, batch[keys.LABEL])
        self.log("train/loss", loss, prog_bar=True, batch_size=logits.shape[0])
        return loss

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits by sliding-window inference (MONAI), Gaussian-weighted blending."""
        roi = [min(r, s) for r, s in zip(self.hparams.roi_size, x.shape[2:])]
        return sliding_window_inference(
            x, roi_size=roi, sw_batch_size=self.hparams.sw_batch_size, predictor=self, overlap=self.hparams.overlap, mode="gaussian"
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.infer(self.net_input(batch))
        loss = self.criterion(logits, batch[keys.LABEL])
        self.log("val/loss", loss, batch_size=1, sync_dist=True)
        pred = (torch.sigmoid(logits) > 0.5).to(torch.uint8)
        spacing = [m["spacing"] for m in batch[keys.META]]
        self.val_metrics.update(pred, batch[keys.LABEL], spacing=spacing, case_ids=batch[keys.CASE_ID])

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()
        self.val_metrics.reset()
        flat = {f"val/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.ndim == 0)}
        self.log_dict(flat, sync_dist=False)  # already synced through torchmetrics state
        self.last_val_summary = {k.removeprefix("val/"): v for k, v in flat.items()}

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.trainer is None or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
