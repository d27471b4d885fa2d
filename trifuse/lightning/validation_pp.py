"""What teachers and the student share around validation: the BraTS post-processing decided on
the validation cases (nnU-Net's ``determine_postprocessing``) and the training spacing, both
kept in the checkpoint's ``trifuse`` block for :class:`trifuse.inference.Predictor`."""
from __future__ import annotations

from typing import Optional

import torch


class ValidationPostprocessing:
    """Mixin for a LightningModule: call :meth:`init_validation_pp` in ``__init__``,
    :meth:`pp_update` per validation case, :meth:`decide_postprocessing` at the end of the
    validation epoch and :meth:`record_train_spacing` at fit start."""

    def init_validation_pp(self, postprocessing: bool = True) -> None:
        from trifuse.postprocess import PostprocessingSearch

        self.postprocessing = bool(postprocessing)
        self._pp_search = PostprocessingSearch()
        #: the post-processing decided on the last validation epoch (saved in checkpoints)
        self.postprocessing_decision: dict = {}
        #: median voxel spacing (mm) of the training cases (saved in checkpoints; predict resamples to it)
        self.train_spacing: Optional[list[float]] = None

    def pp_update(self, pred: torch.Tensor, label: torch.Tensor, spacing) -> None:
        """``pred``/``label`` ``(B, 3, D, H, W)`` binary; one spacing per case."""
        if not self.postprocessing or self.trainer.sanity_checking:
            return
        for b in range(pred.shape[0]):
            self._pp_search.update(pred[b].bool().cpu(), label[b].cpu(), spacing[b])

    def decide_postprocessing(self) -> None:
        """Decide the post-processing on this epoch's validation cases (all ranks gathered)."""
        if not self.postprocessing:
            return
        cases = self._pp_search.state()
        self._pp_search.reset()
        if self.trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, cases)
            cases = [c for part in gathered for c in part]
        if not cases:
            return
        self.postprocessing_decision = self._pp_search.decide(cases)
        post = {f"val/post_dice_{r}": v["post"] for r, v in self.postprocessing_decision["val_dice"].items()}
        post["val/post_dice_mean"] = sum(post.values()) / len(post)
        self.log_dict(post, sync_dist=False)
        self.last_val_summary.update({k.removeprefix("val/"): v for k, v in post.items()})

    def record_train_spacing(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        spacing = getattr(dm, "target_spacing", None) if dm is not None else None
        if spacing:
            self.train_spacing = [float(v) for v in spacing]
