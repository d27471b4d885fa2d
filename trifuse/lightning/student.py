"""The student of the three-tier method: MRI in; learns from labels, teachers and priors.

``L = L_seg + λ_resp(t)·L_resp + λ_feat(t)·L_feat + λ_sem(t)·L_sem (+ L_fuse)``

* ``L_seg``: Dice + BCE on WT/TC/ET; with the deep-supervised backbone
  (``backbone="segresnet_ds"``) over every output level, weighted 1, 1/2, 1/4, … and
  normalised to sum to 1 (:func:`trifuse.losses.deep_supervision_weights`, ``"exp"``); the
  other losses read the full-resolution level only;
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

from typing import Mapping, Optional, Sequence, Union

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
from trifuse.lightning.validation_pp import ValidationPostprocessing
from trifuse.nets.fusion import CrossModalFusion
from trifuse.nets.student import StudentNet, full_resolution


LAMBDAS = ("resp", "feat", "sem")


def _per_lambda(value: Union[int, Mapping[str, int]], name: str) -> dict[str, int]:
    """One int for every λ, or a mapping ``{resp, feat, sem} → int`` (missing λ: 0)."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(LAMBDAS))
        if unknown:
            raise ValueError(f"{name}: unknown λ {unknown}; use {list(LAMBDAS)}")
        return {k: int(value.get(k, 0)) for k in LAMBDAS}
    return {k: int(value) for k in LAMBDAS}


class StudentModule(ValidationPostprocessing, L.LightningModule):
    """Args:
        init_filters: student SegResNet width.
        backbone: ``"segresnet"`` (MONAI SegResNet, the default) or ``"segresnet_ds"`` (MONAI
            SegResNetDS with deep supervision, :class:`~trifuse.nets.backbone.SegResNetDSBackbone`).
        dsdepth: deep-supervision levels of ``"segresnet_ds"`` (ignored for ``"segresnet"``).
        batch_dice: pool the Dice of ``L_seg`` over the batch (nnU-Net batch Dice).
        teacher_modalities: teachers whose targets the callback provides (order of fusion inputs).
        teacher_channels: bottleneck channels of the teachers (one int for all, or one per
            teacher; SegResNet with 16 filters: 128).
        fusion_width, fusion_heads, fusion_window: fusion block size.
        temperature: T of L_resp.
        lambda_resp, lambda_feat, lambda_sem: final weights of L_resp, L_feat, L_sem.
        warmup_steps, start_steps: each λ is 0 before its start step, then ramps to its value
            over its warm-up (optimizer steps). One int for all three, or a mapping per λ
            (``{resp: 200, feat: 500, sem: 200}``; λ not named get 0).
        lambda_shape: ramp shape, ``"linear"`` or ``"cosine"``.
        use_response, use_feature, use_semantic, use_film, use_semantic_attention: tiers.
        text_dim: pooled description embedding size (the CLIP embed_dim, 128 by default).
        lr, weight_decay: AdamW; ``lr`` is the peak of the one-cycle schedule.
        pct_start: share of the run spent warming the learning rate up (one-cycle with cosine
            annealing per optimizer step, as the teachers; the method's paper: 0.2). The
            fusion block, FiLM and gates start from fresh weights, so the student needs the
            warm-up as much as the teachers did. ``scheduler="cosine"`` keeps a per-epoch
            cosine without warm-up, ``"none"`` a constant rate.
        roi_size, sw_batch_size, overlap: sliding-window inference (roi linked to the patch size; windows in
            pairs by default, as :class:`~trifuse.lightning.teacher.TeacherModule`).
        postprocessing: decide the BraTS post-processing (:mod:`trifuse.postprocess`) on the
            validation cases at each validation epoch, as the teachers do; the decision and the
            training spacing go into the checkpoint, and ``trifuse predict`` applies them.
        clip_ckpt: CLIP checkpoint (``trifuse clip``) of the training priors. At fit time it
            is checked against the priors' provenance and embedded in every checkpoint with
            their PriorConfig and describer identity (``checkpoint["trifuse"]["semantic"]``),
            so ``trifuse predict`` needs only the four MRI files and derives a new case's
            priors as the training priors were made (same CLIP, settings and describer).
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
        warmup_steps: Union[int, Mapping[str, int]] = 100,
        start_steps: Union[int, Mapping[str, int]] = 0,
        lambda_shape: str = "linear",
        use_response: bool = True,
        use_feature: bool = True,
        use_semantic: bool = True,
        use_film: bool = True,
        use_semantic_attention: bool = True,
        text_dim: int = 128,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        scheduler: str = "onecycle",
        pct_start: float = 0.2,
        roi_size: Sequence[int] = (128, 128, 128),
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        compute_hd95: bool = True,
        clip_ckpt: Optional[str] = None,
        backbone: str = "segresnet",
        dsdepth: int = 3,
        batch_dice: bool = False,
        postprocessing: bool = True,
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
            backbone=backbone,
            dsdepth=dsdepth,
        )
        # a list of deep-supervision levels is weighted by ds_weights (normalised to sum to 1)
        self.criterion = RegionDiceBCELoss(batch=batch_dice, ds_weights="exp")
        if use_feature and self.teacher_modalities:
            self.fusion = CrossModalFusion(self.teacher_channels, width=fusion_width, num_heads=fusion_heads, window=fusion_window)
            bott = {fi.name: fi.channels for fi in self.student.backbone.feature_info}["bottleneck"]
            self.student_proj = nn.Conv3d(bott, fusion_width, kernel_size=1)
            self.fusion_head = nn.Conv3d(fusion_width, len(keys.REGIONS), kernel_size=1)
        if scheduler not in ("onecycle", "cosine", "none"):
            raise ValueError(f"scheduler must be onecycle, cosine or none, got {scheduler!r}")
        values = {"resp": lambda_resp, "feat": lambda_feat, "sem": lambda_sem}
        warm, start = _per_lambda(warmup_steps, "warmup_steps"), _per_lambda(start_steps, "start_steps")
        self.schedules = {k: WarmupSchedule(v, warm[k], start[k], lambda_shape) for k, v in values.items()}
        from trifuse.metrics import BratsRegionMetrics

        self.val_metrics = BratsRegionMetrics(hd95=compute_hd95)
        self.distiller = None  # set by AsyncTeacherDistillation (not a submodule: never saved)
        self.last_val_summary: dict[str, float] = {}
        self.init_validation_pp(postprocessing)

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
        """Full-resolution region logits ``(B, 3, D, H, W)`` (in any mode; training uses every level)."""
        return full_resolution(self.student(x, prior, text))

    # --- training ---------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch[keys.MRI].float()
        label = batch[keys.LABEL]
        prior, text = self._semantic_inputs(batch)
        levels, feats, gates = self.student(x, prior, text, return_features=True)
        losses = {"seg": self.criterion(levels, label)}  # every deep-supervision level
        logits = full_resolution(levels)  # the distillation and semantic losses: full resolution only
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
            return sliding_window_inference(x, roi, self.hparams.sw_batch_size, lambda w: self(w), self.hparams.overlap, mode="gaussian")
        full = F.interpolate(prior.float(), size=x.shape[2:], mode="trilinear", align_corners=False)
        n = x.shape[1]

        def predictor(window: torch.Tensor) -> torch.Tensor:
            # window: (sw_batch_size, 4 + P, *roi); the case's one text embedding serves every window
            pr = F.interpolate(window[:, n:], scale_factor=0.25, mode="trilinear", align_corners=False) if min(window.shape[2:]) >= 8 else window[:, n:]
            tx = None if text is None else text.expand(window.shape[0], -1)
            return self(window[:, :n], pr, tx)

        return sliding_window_inference(torch.cat([x, full], dim=1), roi, self.hparams.sw_batch_size, predictor, self.hparams.overlap, mode="gaussian")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        prior, text = self._semantic_inputs(batch)
        logits = self.infer(batch[keys.MRI].float(), prior, text)
        self.log("val/loss", self.criterion(logits, batch[keys.LABEL]), batch_size=1, sync_dist=True)
        pred = (torch.sigmoid(logits) > 0.5).to(torch.uint8)
        spacing = [m["spacing"] for m in batch[keys.META]]
        self.val_metrics.update(pred, batch[keys.LABEL], spacing=spacing, case_ids=batch[keys.CASE_ID])
        self.pp_update(pred, batch[keys.LABEL], spacing)

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()
        self.val_metrics.reset()
        flat = {f"val/{k}": float(v) for k, v in summary.items() if torch.is_tensor(v) and v.ndim == 0}
        self.log_dict(flat)
        self.last_val_summary = {k.removeprefix("val/"): v for k, v in flat.items()}
        self.decide_postprocessing()

    def on_fit_start(self) -> None:
        self.record_train_spacing()

    # --- prediction from MRI only ------------------------------------------------------
    def setup(self, stage: str) -> None:
        # the sample keys this module reads: the data module skips the transforms of the others
        # (Lightning runs callbacks' setup first, so the distiller is attached by now)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "needed_keys"):
            need = {keys.PRIOR, keys.TEXT} if self.uses_priors else set()
            if self.distiller is not None:
                need |= set(self.distiller.sample_keys)
            dm.needed_keys = need
        # provenance of the training priors (CLIP export, PriorConfig, describer), checked and
        # kept for the checkpoint: the DataModule has bound LoadPriors' folder by now
        if stage == "fit" and self.uses_priors and self.hparams.clip_ckpt:
            from trifuse.semantic.provenance import build_bundle

            dm = getattr(self.trainer, "datamodule", None)
            dirs = {str(t.priors_dir) for t in getattr(dm, "sample_transforms", []) or []
                    if getattr(t, "priors_dir", None) is not None and hasattr(t, "bind_dataset")}
            self._semantic_bundle = build_bundle(self.hparams.clip_ckpt, next(iter(sorted(dirs)), None))

    def set_describer(self, describer: Optional[str] = "as-trained") -> Optional[dict]:
        """Choose the describer of prediction-time priors (``"as-trained"`` or ``"offline"``) and check it now.

        Returns the describer identity (``None`` without priors). Raises
        :class:`~trifuse.semantic.provenance.DescriberMismatchError` when the training
        describer is unavailable and no override is given.
        """
        if not self.uses_priors:
            return None
        from trifuse.semantic.case_priors import CasePriors

        cp = CasePriors(self.__dict__.get("_semantic_bundle"), describer, clip_ckpt=self.hparams.clip_ckpt)
        ident = cp.check()
        self.__dict__["_case_priors"] = cp  # outside the module tree: never saved as weights
        return ident

    def semantic_for_sample(self, sample: dict) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Prior ``(1, 3, d, h, w)`` and text ``(1, E)`` of one prepared (cropped) case.

        Uses ``sample['prior']``/``['text']`` when present; otherwise derives them from the
        MRI alone as the training priors were made (:class:`~trifuse.semantic.case_priors.CasePriors`:
        the checkpoint's embedded CLIP and PriorConfig, and the training describer unless
        :meth:`set_describer` chose ``"offline"``).
        """
        if not self.uses_priors:
            return None, None
        dev = self.device
        if keys.PRIOR in sample:
            text = sample.get(keys.TEXT)
            return torch.as_tensor(sample[keys.PRIOR]).float()[None].to(dev), (None if text is None else torch.as_tensor(text).float()[None].to(dev))
        if "_case_priors" not in self.__dict__:
            self.set_describer("as-trained")
        res = self.__dict__["_case_priors"](sample)
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
            "spacing": self.train_spacing,
            "postprocessing": self.postprocessing_decision,
        }
        if self.uses_priors:  # self-contained: CLIP export, PriorConfig and describer of the training priors
            bundle = self.__dict__.get("_semantic_bundle")
            if bundle is None and self.hparams.clip_ckpt:
                from pathlib import Path

                from trifuse.semantic.provenance import build_bundle

                if Path(self.hparams.clip_ckpt).is_file():
                    bundle = build_bundle(self.hparams.clip_ckpt)
                    self._semantic_bundle = bundle
            checkpoint["trifuse"]["semantic"] = bundle

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("trifuse") or {}
        self.train_spacing = meta.get("spacing")
        self.postprocessing_decision = meta.get("postprocessing") or {}
        bundle = meta.get("semantic")
        if bundle is not None:
            self._semantic_bundle = bundle

    def configure_optimizers(self):
        """AdamW with a one-cycle (warm-up + cosine) rate per optimizer step, like the teachers.

        The cycle's length is ``trainer.estimated_stepping_batches`` (steps per rank × epochs),
        filled in by :func:`~trifuse.lightning.teacher.build_scheduler`.
        """
        from functools import partial

        from trifuse.lightning.teacher import CosineAnnealing, OneCycleCosine, build_scheduler

        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        kind = self.hparams.scheduler
        if kind == "none" or self.trainer is None:
            return opt
        factory = partial(OneCycleCosine, pct_start=self.hparams.pct_start) if kind == "onecycle" else CosineAnnealing
        return {"optimizer": opt, "lr_scheduler": build_scheduler(factory, opt, self.trainer)}
