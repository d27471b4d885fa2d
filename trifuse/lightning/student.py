"""The student of the three-tier method: MRI in; learns from labels, teachers and priors.

``L = L_seg + λ_resp(t)·L_resp + λ_feat(t)·L_feat + λ_sem(t)·L_sem (+ L_fuse)``

* ``L_seg``: Dice + BCE on WT/TC/ET;
* ``L_resp``: temperature KL to the teachers' region responses, weighted per region by
  teacher quality and cross-modal alignment (:func:`trifuse.losses.distill.teacher_weights`);
* ``L_feat``: ``1 − cos(P(F_student), F_fused)`` at the bottleneck, where ``F_fused`` comes
  from :class:`~trifuse.nets.fusion.CrossModalFusion` over the teachers' bottlenecks;
* ``L_sem``: the student's region attention (WT probability, TC/ET gates) against the priors;
* ``L_fuse``: an auxiliary region head on ``F_fused`` trains the fusion block itself
  (otherwise ``L_feat`` could be met by a collapsed, constant ``F_fused``); its target is
  the label max-pooled to the bottleneck grid.

The teachers live in :class:`~trifuse.lightning.distill.AsyncTeacherDistillation`
(a callback), never in this module. Switches for ablations: ``use_response``,
``use_feature``, ``use_semantic`` (priors in the loss and the network), ``use_film``,
``use_semantic_attention``, and the teacher list of the callback (pixel tier on/off).
"""
from __future__ import annotations

from typing import Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from trifuse import keys
from trifuse.losses import RegionDiceBCELoss
from trifuse.losses.distill import (
    WarmupSchedule,
    feature_cosine_loss,
    response_kd_loss,
    semantic_prior_loss,
    teacher_weights,
)
from trifuse.nets.fusion import CrossModalFusion
from trifuse.nets.student import StudentNet


class StudentModule(L.LightningModule):
    """Args:
        init_filters: student SegResNet width.
        teacher_modalities: teachers whose targets the callback provides (order of fusion inputs).
        teacher_channels: bottleneck channels of the teachers (one int for all, or one per
            teacher; SegResNet with 16 filters: 128).
        fusion_width, fusion_heads, fusion_window: fusion block size.
        temperature: T of L_resp.
        lambda_resp, lambda_feat, lambda_sem: final weights; ``warmup_steps`` ramps each
            (``start_steps`` delays them) linearly.
        use_response, use_feature, use_semantic, use_film, use_semantic_attention: tiers.
        text_dim: pooled description embedding size (the CLIP embed_dim, 128 by default).
        lr, weight_decay: AdamW.
        roi_size, sw_batch_size, overlap: sliding-window inference (roi linked to the patch size).
        clip_ckpt: CLIP checkpoint (``trifuse clip``) used to derive the priors of a new case
            at prediction time (offline description → priors), so ``trifuse predict`` needs
            only the four MRI files.
    """

    def __init__(
        self,
        init_filters: int = 16,
        teacher_modalities: Sequence[str] = ("mri", "us", "ct"),
        teacher_channels: int | Sequence[int] = 128,
        fusion_width: int = 64,
        fusion_heads: int = 4,
        fusion_window: int = 4,
        temperature: float = 2.0,
        lambda_resp: float = 1.0,
        lambda_feat: float = 0.5,
        lambda_sem: float = 0.2,
        warmup_steps: int = 100,
        start_steps: int = 0,
        use_response: bool = True,
        use_feature: bool = True,
        use_semantic: bool = True,
        use_film: bool = True,
        use_semantic_attention: bool = True,
        text_dim: int = 128,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        roi_size: Sequence[int] = (128, 128, 128),
        sw_batch_size: int = 1,
        overlap: float = 0.5,
        compute_hd95: bool = True,
        clip_ckpt: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.inputs = (keys.MRI,)  # inference needs the MRI only (priors are derived from it)
        self.teacher_modalities = tuple(teacher_modalities) if (use_response or use_feature) else ()
        if isinstance(teacher_channels, int):
            teacher_channels = [teacher_channels] * len(teacher_modalities)
        if len(teacher_channels) != len(teacher_modalities):
            raise ValueError(f"teacher_channels {list(teacher_channels)} must give one entry per teacher {list(teacher_modalities)}")
        self.teacher_channels = [int(c) for c in teacher_channels]
        self.student = StudentNet(
            in_channels=len(keys.MODALITIES),
            out_channels=len(keys.REGIONS),
            init_filters=init_filters,
            text_dim=text_dim,
            use_film=use_film and use_semantic,
            use_semantic_attention=use_semantic_attention and use_semantic,
        )
        self.criterion = RegionDiceBCELoss()
        if use_feature and self.teacher_modalities:
            self.fusion = CrossModalFusion(self.teacher_channels, width=fusion_width, num_heads=fusion_heads, window=fusion_window)
            bott = {fi.name: fi.channels for fi in self.student.backbone.feature_info}["bottleneck"]
            self.student_proj = nn.Conv3d(bott, fusion_width, kernel_size=1)
            self.fusion_head = nn.Conv3d(fusion_width, len(keys.REGIONS), kernel_size=1)
        self.schedules = {
            "resp": WarmupSchedule(lambda_resp, warmup_steps, start_steps),
            "feat": WarmupSchedule(lambda_feat, warmup_steps, start_steps),
            "sem": WarmupSchedule(lambda_sem, warmup_steps, start_steps),
        }
        from trifuse.metrics import BratsRegionMetrics

        self.val_metrics = BratsRegionMetrics(hd95=compute_hd95)
        self.distiller = None  # set by AsyncTeacherDistillation (not a submodule: never saved)
        self.last_val_summary: dict[str, float] = {}

    # --- helpers --------------------------------------------------------------------
    @property
    def uses_priors(self) -> bool:
        return bool(self.hparams.use_semantic)

    def check_teachers(self, teachers: dict) -> None:
        """Called by the distillation callback: the teachers must match the configuration."""
        missing = [m for m in self.teacher_modalities if m not in teachers]
        if missing:
            raise ValueError(f"student expects teachers {list(self.teacher_modalities)}; the callback has no {missing}")
        for m, ch in zip(self.teacher_modalities, self.teacher_channels):
            info = {fi.name: fi.channels for fi in teachers[m].net.feature_info}
            if info["bottleneck"] != ch:
                raise ValueError(f"teacher {m}: bottleneck has {info['bottleneck']} channels, student.teacher_channels says {ch}")

    def _semantic_inputs(self, batch: dict):
        if not self.uses_priors:
            return None, None
        if keys.PRIOR not in batch:
            raise KeyError("use_semantic=true needs batch['prior'] and batch['text']: add trifuse.semantic.prior_transforms.LoadPriors to the data module's sample_transforms")
        return batch[keys.PRIOR].float(), batch.get(keys.TEXT)

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.student(x, prior, text)

    # --- training ---------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch[keys.MRI].float()
        label = batch[keys.LABEL]
        prior, text = self._semantic_inputs(batch)
        logits, feats, gates = self.student(x, prior, text, return_features=True)
        losses = {"seg": self.criterion(logits, label)}
        step = self.global_step
        lam = {k: s(step) for k, s in self.schedules.items()}
        targets = None
        if self.teacher_modalities:
            if self.distiller is None:
                raise RuntimeError("no AsyncTeacherDistillation callback: add it to trainer.callbacks or switch use_response/use_feature off")
            targets = self.distiller.targets(batch)
            t_logits = [targets[m]["logits"] for m in self.teacher_modalities]
            alignment = None
            if self.hparams.use_feature:
                fused, alignment, _ = self.fusion([targets[m]["bottleneck"] for m in self.teacher_modalities])
                small = F.adaptive_max_pool3d(label.float(), fused.shape[2:])
                losses["fuse"] = self.criterion(self.fusion_head(fused), small)
                losses["feat"] = feature_cosine_loss(self.student_proj(feats["bottleneck"]), fused)
                for i, m in enumerate(self.teacher_modalities):
                    for j in range(i + 1, len(self.teacher_modalities)):
                        self.log(f"distill/align_{m}_{self.teacher_modalities[j]}", alignment[:, i, j].mean(), batch_size=x.shape[0])
            if self.hparams.use_response:
                w = teacher_weights(t_logits, label, alignment)
                losses["resp"] = response_kd_loss(logits, t_logits, w, self.hparams.temperature)
                for i, m in enumerate(self.teacher_modalities):
                    self.log(f"distill/w_{m}", w[:, i].mean(), batch_size=x.shape[0])
        if self.uses_priors and prior is not None:
            wt = torch.sigmoid(logits[:, keys.WT : keys.WT + 1])
            tc = gates.get("gate_TC", torch.sigmoid(logits[:, keys.TC : keys.TC + 1]))
            et = gates.get("gate_ET", torch.sigmoid(logits[:, keys.ET : keys.ET + 1]))
            losses["sem"] = semantic_prior_loss(torch.cat([wt, tc, et], dim=1), prior)
        total = losses["seg"] + losses.get("fuse", 0.0)
        for k in ("resp", "feat", "sem"):
            if k in losses:
                total = total + lam[k] * losses[k]
        bs = x.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for k, v in losses.items():
            self.log(f"train/loss_{k}", v, batch_size=bs)
        for k, v in lam.items():
            self.log(f"train/lambda_{k}", v, batch_size=bs)
        return total

    # --- inference --------------------------------------------------------------------
    def infer(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Whole-case logits by sliding-window inference.

        The (low-resolution) prior is upsampled to the case grid and travels with the MRI
        as extra channels, so every window sees its own part of it.
        """
        roi = [min(r, s) for r, s in zip(self.hparams.roi_size, x.shape[2:])]
        if prior is None:
            return sliding_window_inference(x, roi, self.hparams.sw_batch_size, lambda w: self.student(w), self.hparams.overlap, mode="gaussian")
        full = F.interpolate(prior.float(), size=x.shape[2:], mode="trilinear", align_corners=False)
        n = x.shape[1]

        def predictor(window: torch.Tensor) -> torch.Tensor:
            pr = F.interpolate(window[:, n:], scale_factor=0.25, mode="trilinear", align_corners=False) if min(window.shape[2:]) >= 8 else window[:, n:]
            return self.student(window[:, :n], pr, text)

        return sliding_window_inference(torch.cat([x, full], dim=1), roi, self.hparams.sw_batch_size, predictor, self.hparams.overlap, mode="gaussian")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prior, text = self._semantic_inputs(batch)
        logits = self.infer(batch[keys.MRI].float(), prior, text)
        self.log("val/loss", self.criterion(logits, batch[keys.LABEL]), batch_size=1, sync_dist=True)
        pred = (torch.sigmoid(logits) > 0.5).to(torch.uint8)
        self.val_metrics.update(pred, batch[keys.LABEL], spacing=[m["spacing"] for m in batch[keys.META]], case_ids=batch[keys.CASE_ID])

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()
        self.val_metrics.reset()
        flat = {f"val/{k}": float(v) for k, v in summary.items() if torch.is_tensor(v) and v.ndim == 0}
        self.log_dict(flat)
        self.last_val_summary = {k.removeprefix("val/"): v for k, v in flat.items()}

    # --- prediction from MRI only ------------------------------------------------------
    def semantic_for_sample(self, sample: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Prior ``(1, 3, d, h, w)`` and text ``(1, E)`` of one prepared (cropped) case.

        Uses ``sample['prior']``/``['text']`` when present; otherwise derives them from the
        MRI alone: the offline describer writes the description, the CLIP model of
        ``clip_ckpt`` turns it and the slices into priors (the ``trifuse semantic`` path).
        """
        if not self.uses_priors:
            return None, None
        dev = self.device
        if keys.PRIOR in sample:
            text = sample.get(keys.TEXT)
            return torch.as_tensor(sample[keys.PRIOR]).float()[None].to(dev), (None if text is None else torch.as_tensor(text).float()[None].to(dev))
        if not self.hparams.clip_ckpt:
            raise ValueError("this student uses semantic priors but its checkpoint names no clip_ckpt; pass model.init_args.clip_ckpt when training")
        from trifuse.semantic.clip import load_clip
        from trifuse.semantic.offline import OfflineDescriber
        from trifuse.semantic.priors import compute_prior

        clip = self.__dict__.get("_clip_model")
        if clip is None:  # kept outside the module tree: never saved into a checkpoint
            clip = load_clip(self.hparams.clip_ckpt, device="cpu")
            object.__setattr__(self, "_clip_model", clip)
        desc = OfflineDescriber().describe(sample)
        res = compute_prior(clip, sample, desc)
        return res.prior.float()[None].to(dev), res.text.float()[None].to(dev)

    @torch.no_grad()
    def predict_sample_regions(self, sample: dict) -> torch.Tensor:
        """Binary region masks ``(1, 3, D, H, W)`` of a prepared case (MRI → priors → student)."""
        prior, text = self.semantic_for_sample(sample)
        x = torch.as_tensor(sample[keys.MRI]).float()[None].to(self.device)
        return (torch.sigmoid(self.infer(x, prior, text)) > 0.5).to(torch.uint8)

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prior, text = self._semantic_inputs(batch)
        return torch.sigmoid(self.infer(batch[keys.MRI].float(), prior, text))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what a reader (predict) needs without instantiating the module; no teacher weights
        checkpoint["trifuse"] = {
            "kind": "student",
            "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
            "inputs": list(self.inputs),
            "regions": list(keys.REGIONS),
            "teachers": list(self.teacher_modalities),
        }

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.trainer or not self.trainer.max_epochs or self.trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
