"""The foundation stage's plain MRI model, now a thin front of :class:`TeacherModule`.

``SegmentationModule`` keeps its original signature (``lr``, ``weight_decay``,
``compute_hd95``) for configs written against it; new configs use
:class:`trifuse.lightning.teacher.TeacherModule` directly (``configs/demo_mri.yaml`` does).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import nn

from trifuse import keys
from trifuse.lightning.teacher import TeacherModule, default_net

__all__ = ["SegmentationModule", "TeacherModule", "default_net"]


class SegmentationModule(TeacherModule):
    """Region segmentation of WT/TC/ET from a configurable set of input keys (MRI by default).

    Args:
        net: network ``(B, in_channels, D, H, W) → (B, 3, D, H, W)`` logits; default
            :func:`~trifuse.lightning.teacher.default_net`.
        inputs: sample keys concatenated along channels as the network input.
        criterion: loss on ``(logits, label)``; default Dice + BCE per region.
        lr, weight_decay: AdamW (the method's paper: wd 1e-4), cosine annealing per epoch.
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
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        compute_hd95: bool = True,
    ):
        from trifuse.metrics import BratsRegionMetrics

        modality = inputs[0] if len(inputs) == 1 and inputs[0] in keys.TEACHER_MODALITIES else keys.MRI
        super().__init__(
            modality=modality,
            inputs=inputs,
            net=net,
            criterion=criterion,
            optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay),
            scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR),
            metrics=BratsRegionMetrics(hd95=compute_hd95),
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
        )

    def configure_optimizers(self):
        trainer = self._trainer  # ``self.trainer`` raises when detached
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 0:
            return self.optimizer_factory(self.parameters())  # no run length: no schedule (as before)
        return super().configure_optimizers()
