"""The feature tier's expert teachers: one :class:`TeacherModule` per modality (MRI, US, CT).

A teacher is a region-segmentation model (WT, TC, ET; one sigmoid per nested region) on
one modality, or on a configured list of inputs. It trains on random patches and
validates whole cropped cases with MONAI sliding-window inference, logging per-region
Dice and HD95 through :class:`trifuse.metrics.BratsRegionMetrics` (a torchmetrics
``Metric``: DDP ranks gather per-case scores, never per-rank means). Its backbone
returns multi-scale features (:meth:`TeacherModule.features`), which the student's
distillation reads.

Every part is passed in (LightningCLI ``class_path`` configs, kaiko-ai eva style):

.. code-block:: yaml

    model:
      class_path: trifuse.lightning.teacher.TeacherModule
      init_args:
        modality: us
        net: {class_path: trifuse.nets.SegResNetBackbone, init_args: {in_channels: 1}}
        optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3, weight_decay: 1.0e-4}}
        scheduler: {class_path: trifuse.lightning.teacher.OneCycleCosine, init_args: {pct_start: 0.2}}

Checkpoints: under LightningCLI the saved hyper-parameters are the *config* (class paths
and init args), so ``TeacherModule.load_from_checkpoint(path)`` rebuilds the network
without further arguments. A module built in Python with live ``nn.Module`` arguments
leaves those out of the hyper-parameters (``save_hyperparameters(ignore=[...])``: their
weights are in the state dict) and they must be passed again to ``load_from_checkpoint``
unless they were the defaults.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections import OrderedDict
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from monai.inferers import sliding_window_inference
from torch import nn
from torchmetrics import Metric

from trifuse import keys
from trifuse.lightning.validation_pp import ValidationPostprocessing
from trifuse.schedules import one_cycle_pct_start

#: channels of each image key of the sample (DESIGN.md, "The sample")
INPUT_CHANNELS = {keys.MRI: len(keys.MODALITIES), keys.US: 1, keys.CT: keys.CT_CHANNELS}

#: sample transforms that derive a non-MRI input from the MRI (pixel tier)
INPUT_TRANSFORMS = {
    keys.US: "trifuse.physics.transforms.SimulateUltrasound",
    keys.CT: "trifuse.physics.transforms.SynthesizeCT",
}


def input_channels(inputs: Sequence[str]) -> int:
    """Channels of the network input made by concatenating ``inputs`` (e.g. ``["mri", "us"]`` → 5)."""
    unknown = [k for k in inputs if k not in INPUT_CHANNELS]
    if unknown:
        raise ValueError(f"unknown input key(s) {unknown}; choose from {list(INPUT_CHANNELS)}")
    return sum(INPUT_CHANNELS[k] for k in inputs)


def resolve_inputs(modality: str, inputs: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """The input keys of a teacher: ``inputs`` if given, else its own modality."""
    if modality not in keys.TEACHER_MODALITIES:
        raise ValueError(f"modality must be one of {list(keys.TEACHER_MODALITIES)}, got {modality!r}")
    out = tuple(inputs) if inputs else (modality,)
    input_channels(out)  # validates the keys
    return out


# --- optimisation defaults -------------------------------------------------------------
def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW, weight decay 1e-4 (the method's paper); lr 2e-4 (the paper's 5e-5 is for 300+ epochs)."""
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-4)


class OneCycleCosine(torch.optim.lr_scheduler.OneCycleLR):
    """One-cycle schedule with cosine annealing (Smith & Topin 2019), per optimizer step.

    ``max_lr`` defaults to the optimizer's configured learning rate and ``total_steps`` is
    filled in by :class:`TeacherModule` from ``trainer.estimated_stepping_batches``, so a
    config only states the shape of the cycle. The method's paper uses ``pct_start=0.2``.

    Unlike torch's ``OneCycleLR`` it holds the final rate instead of raising when stepped
    past ``total_steps`` (a run resumed with a larger ``max_epochs`` keeps training).

    Args:
        optimizer: the wrapped optimizer.
        total_steps: length of the cycle in optimizer steps (required; see above).
        pct_start: fraction of the cycle spent warming up.
        max_lr: peak rate; default the optimizer's ``lr`` per parameter group.
        div_factor: initial rate = ``max_lr / div_factor``.
        final_div_factor: final rate = initial rate / ``final_div_factor``.
        cycle_momentum: cycle Adam's beta1 inversely to the rate (torch default).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: Optional[int] = None,
        pct_start: float = 0.2,
        max_lr: Optional[float] = None,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        cycle_momentum: bool = True,
    ):
        if total_steps is None:
            raise ValueError("OneCycleCosine needs total_steps (TeacherModule fills it in from the trainer)")
        total_steps = max(int(total_steps), 1)
        pct_start = one_cycle_pct_start(pct_start, total_steps)  # tiny runs: no warm-up ending at step 0 (0 / 0)
        peak = max_lr if max_lr is not None else [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        super().__init__(
            optimizer,
            max_lr=peak,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy="cos",
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            cycle_momentum=cycle_momentum,
        )

    def get_lr(self):
        if self.last_epoch >= self.total_steps:  # torch defines the cycle up to total_steps - 1
            return [group["lr"] for group in self.optimizer.param_groups]
        return super().get_lr()


class CosineAnnealing(torch.optim.lr_scheduler.CosineAnnealingLR):
    """Cosine annealing per epoch (Loshchilov & Hutter, SGDR, ICLR 2017) over the whole run.

    ``T_max`` defaults to ``trainer.max_epochs`` (filled in by :class:`TeacherModule`), so a
    config need not repeat the run length.

    Args:
        optimizer: the wrapped optimizer.
        T_max: epochs of the half cosine (required; see above).
        eta_min: final learning rate.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: Optional[int] = None, eta_min: float = 0.0):
        if T_max is None:
            raise ValueError("CosineAnnealing needs T_max (TeacherModule fills it in from the trainer)")
        super().__init__(optimizer, T_max=max(int(T_max), 1), eta_min=eta_min)


def _factory_target(factory) -> tuple[Any, dict]:
    """The class or function a (jsonargparse) partial wraps, and the keywords it already binds."""
    if isinstance(factory, functools.partial):
        # jsonargparse binds e.g. partial(call, instantiator, cls, **init_args): the class is a positional
        classes = [a for a in factory.args if inspect.isclass(a)]
        return (classes[0] if classes else factory.func), dict(factory.keywords)
    return factory, {}


def build_scheduler(factory, optimizer: torch.optim.Optimizer, trainer, interval: Optional[str] = None) -> dict:
    """Instantiate a scheduler factory, filling in the run length it needs.

    A factory whose target takes ``total_steps`` (one-cycle) gets
    ``trainer.estimated_stepping_batches`` and steps per optimizer step; one that takes
    ``T_max`` (cosine annealing) gets ``trainer.max_epochs`` and steps per epoch. Values
    already bound in the config win.

    Returns:
        Lightning's ``lr_scheduler`` config dict.
    """
    target, bound = _factory_target(factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs: dict[str, Any] = {}
    auto_interval = "epoch"
    if "total_steps" in params and bound.get("total_steps") is None:
        steps = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if not math.isfinite(steps):
            raise ValueError(f"{getattr(target, '__name__', target)} needs total_steps: set trainer.max_epochs or max_steps")
        kwargs["total_steps"] = int(steps)
        auto_interval = "step"
    elif inspect.isclass(target) and issubclass(target, torch.optim.lr_scheduler.OneCycleLR):
        auto_interval = "step"
    if "T_max" in params and bound.get("T_max") is None:
        epochs = trainer.max_epochs if trainer is not None else None
        if not epochs or epochs < 0:
            raise ValueError(f"{getattr(target, '__name__', target)} needs T_max: set trainer.max_epochs")
        kwargs["T_max"] = int(epochs)
    return {"scheduler": factory(optimizer, **kwargs), "interval": interval or auto_interval}


def _under_lightning_cli() -> bool:
    """True while LightningCLI instantiates the module: its hparams are then the config dump.

    Lightning sets this context (a private ``ContextVar``) so that ``save_hyperparameters``
    stores class paths and init args instead of live objects; that is what lets
    ``load_from_checkpoint`` rebuild the network from the checkpoint alone.
    """
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # pragma: no cover - a future Lightning without it: treat as plain Python
        return False
    return _given_hyperparameters.get() is not None


def default_net(in_channels: int = 4, out_channels: int = len(keys.REGIONS)) -> nn.Module:
    """The default backbone: MONAI SegResNet with feature taps, 16 initial filters."""
    from trifuse.nets.backbone import SegResNetBackbone

    return SegResNetBackbone(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, init_filters=16)


class TeacherModule(ValidationPostprocessing, L.LightningModule):
    """An expert teacher of the feature tier: WT/TC/ET region segmentation from one modality.

    Args:
        modality: ``"mri"``, ``"us"`` or ``"ct"``: what the teacher is an expert on (its
            name in logs and checkpoints, and its default input).
        inputs: sample keys concatenated along channels as the network input; default
            ``[modality]``. Non-MRI keys need the pixel tier's transform in the data module
            (``SimulateUltrasound`` writes ``us``, ``SynthesizeCT`` writes ``ct``).
        net: network ``(B, C_in, D, H, W) → (B, 3, D, H, W)`` logits; with
            ``forward(x, return_features=True)`` returning ``(logits, features)`` (see
            :mod:`trifuse.nets.backbone`) for :meth:`features`. Default
            :class:`~trifuse.nets.SegResNetBackbone` (16 filters) with ``C_in`` from ``inputs``.
        criterion: loss on ``(logits, label)``; default
            :class:`~trifuse.losses.RegionDiceBCELoss` (soft Dice + BCE per region).
        optimizer: ``params → Optimizer`` (LightningCLI ``OptimizerCallable``); default
            AdamW (lr 2e-4, weight decay 1e-4).
        scheduler: ``optimizer → LRScheduler`` or ``None``; default :class:`OneCycleCosine`.
            ``total_steps``/``T_max`` are filled in from the trainer (:func:`build_scheduler`).
        metrics: validation metric; default :class:`~trifuse.metrics.BratsRegionMetrics`
            (Dice and HD95 in mm, BraTS empty-mask conventions).
        roi_size: sliding-window ROI ``(D, H, W)`` in voxels (linked to the data patch size).
        sw_batch_size: windows per forward pass in sliding-window inference (2: on CPU, torch's fp32
            ``Conv3d`` runs a batch of one window on one core, :class:`~trifuse.lightning.target_cache.TeacherTargetCache`).
        overlap: sliding-window overlap fraction (Gaussian blending).
        threshold: sigmoid probability above which a voxel belongs to a region.
        scheduler_interval: ``"step"`` or ``"epoch"``; default chosen by :func:`build_scheduler`.
        keep_val_example: keep tri-planar slices of the first validation case (rank 0) for
            the overlay image of :class:`~trifuse.lightning.callbacks.ValidationMedia`.
        val_tta: average the 8 mirrorings in validation (nnU-Net test-time mirroring; 8×
            the validation cost, so off by default; ``trifuse predict`` mirrors by default).
        postprocessing: decide the BraTS post-processing (:mod:`trifuse.postprocess`) on
            every validation epoch and store the decision in the checkpoint, where
            :class:`trifuse.inference.Predictor` applies it. ``val/*`` metrics are *without*
            it; ``val/post_dice_*`` with it.

    Shapes:
        batches are dicts of ``(B, C, D, H, W)`` tensors (DESIGN.md "The sample"); the
        network input is ``(B, sum(channels of inputs), D, H, W)``, the output
        ``(B, 3, D, H, W)`` logits in region order WT, TC, ET.
    """

    def __init__(
        self,
        modality: str = "mri",
        inputs: Optional[Sequence[str]] = None,
        net: Optional[nn.Module] = None,
        criterion: Optional[nn.Module] = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: Optional[LRSchedulerCallable] = OneCycleCosine,
        metrics: Optional[Metric] = None,
        roi_size: Sequence[int] = (128, 128, 128),
        sw_batch_size: int = 2,
        overlap: float = 0.5,
        threshold: float = 0.5,
        scheduler_interval: Optional[str] = None,
        keep_val_example: bool = True,
        val_tta: bool = False,
        postprocessing: bool = True,
    ):
        super().__init__()
        live = {"net": net, "criterion": criterion, "optimizer": optimizer, "scheduler": scheduler, "metrics": metrics}
        # Live objects (modules, callables) never go into hparams: modules are in the state
        # dict, and a checkpoint must load with torch.load(weights_only=True). Under
        # LightningCLI the saved values are config dicts instead, which is what we want.
        ignore = [] if _under_lightning_cli() else [k for k, v in live.items() if v is not None]
        self.save_hyperparameters(ignore=ignore)
        self.modality = modality
        self.inputs = resolve_inputs(modality, inputs)
        self.in_channels = input_channels(self.inputs)
        self.net = net if net is not None else default_net(self.in_channels)
        have = getattr(self.net, "in_channels", None)
        if have is not None and int(have) != self.in_channels:
            raise ValueError(
                f"teacher {modality!r}: net has in_channels={have} but inputs {list(self.inputs)} give "
                f"{self.in_channels} channel(s); set model.init_args.net.init_args.in_channels={self.in_channels}"
            )
        if criterion is None:
            from trifuse.losses import RegionDiceBCELoss

            criterion = RegionDiceBCELoss()
        self.criterion = criterion
        if metrics is None:
            from trifuse.metrics import BratsRegionMetrics

            metrics = BratsRegionMetrics(threshold=threshold)
        self.val_metrics = metrics
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.roi_size = tuple(int(r) for r in roi_size)
        self.sw_batch_size = sw_batch_size
        self.overlap = overlap
        self.threshold = threshold
        self.scheduler_interval = scheduler_interval
        self.keep_val_example = keep_val_example
        self.val_tta = val_tta
        self.init_validation_pp(postprocessing)
        #: ``{transform name: record}`` of the data module's pixel-tier transforms at fit start
        #: (:meth:`trifuse.physics.transforms.SimulateUltrasound.record`), kept in the checkpoint
        self.pixel_tier: dict = {}
        #: per-region validation means of the last validation epoch (``dice_WT``, ``hd95_mean``, ...)
        self.last_val_summary: dict[str, float] = {}
        #: per-case rows ``{case_id, region, dice, hd95}`` of the last validation epoch (all ranks)
        self.last_val_rows: list[dict] = []
        #: tri-planar slices of the first validation case (see :mod:`trifuse.lightning.images`)
        self.val_example: Optional[dict] = None

    # --- network ------------------------------------------------------------------------
    def net_input(self, batch: dict) -> torch.Tensor:
        """Concatenate the configured inputs of a batch: ``(B, C_in, D, H, W)`` float32."""
        missing = [k for k in self.inputs if k not in batch]
        if missing:
            hints = [f"{k}: add {INPUT_TRANSFORMS[k]} to data.init_args.sample_transforms" for k in missing if k in INPUT_TRANSFORMS]
            raise KeyError(
                f"teacher {self.modality!r}: batch lacks input(s) {missing}" + (" (" + "; ".join(hints) + ")" if hints else "")
            )
        return torch.cat([batch[k].float() for k in self.inputs], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Region logits ``(B, 3, D, H, W)`` of an input ``(B, C_in, D, H, W)``."""
        out = self.net(x)
        if isinstance(out, (list, tuple)):  # deep-supervision heads: the first is full resolution
            out = out[0]
        elif out.ndim == x.ndim + 1:  # DynUNet's stacked deep-supervision output (training mode)
            out = out[:, 0]
        return out

    def features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Multi-scale features of the backbone for distillation.

        Args:
            x: ``(B, C_in, D, H, W)`` network input (see :meth:`net_input`).

        Returns:
            ordered dict ``enc0 … bottleneck … dec0`` (see :mod:`trifuse.nets.backbone`), each
            ``(B, C_l, D / s_l, H / s_l, W / s_l)``.

        Raises:
            TypeError: the network has no feature taps (e.g. a plain MONAI network).
        """
        try:
            out = self.net(x, return_features=True)
        except TypeError as exc:
            raise TypeError(
                f"{type(self.net).__name__} has no feature taps; use trifuse.nets.SegResNetBackbone or DynUNetBackbone"
            ) from exc
        return out[1]

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume logits ``(B, 3, D, H, W)`` by MONAI sliding-window inference (Gaussian blending)."""
        roi = [min(r, s) for r, s in zip(self.roi_size, x.shape[2:])]
        return sliding_window_inference(
            x, roi_size=roi, sw_batch_size=self.sw_batch_size, predictor=self, overlap=self.overlap, mode="gaussian"
        )

    def infer_tta(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`infer` averaged over the 8 mirrorings (logits)."""
        from trifuse.inference import mirror_axes

        outs = []
        for axes in mirror_axes(3):
            dims = [2 + a for a in axes]
            out = self.infer(x.flip(dims) if dims else x).float()
            outs.append(out.flip(dims) if dims else out)
        return torch.stack(outs).mean(0)

    def predict_regions(self, x: torch.Tensor) -> torch.Tensor:
        """Binary region masks ``(B, 3, D, H, W)`` (bool) of a whole volume."""
        return torch.sigmoid(self.infer(x).float()) > self.threshold

    # --- training -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = self.net_input(batch)
        out = self.net(x)  # keep deep-supervision heads for the loss
        loss = self.criterion(out, batch[keys.LABEL])
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.net_input(batch)
        logits = self.infer_tta(x) if self.val_tta else self.infer(x)
        label = batch[keys.LABEL]
        loss = self.criterion(logits, label)
        self.log("val/loss", loss, batch_size=x.shape[0], sync_dist=True)
        pred = torch.sigmoid(logits.float()) > self.threshold
        spacing = [m["spacing"] for m in batch[keys.META]]
        self.val_metrics.update(pred, label, spacing=spacing, case_ids=batch[keys.CASE_ID])
        self.pp_update(pred, label, spacing)
        if batch_idx == 0 and self.keep_val_example and self.global_rank == 0 and not self.trainer.sanity_checking:
            from trifuse.lightning.images import triplanar_example

            show = keys.FLAIR if self.inputs[0] == keys.MRI else 0
            self.val_example = triplanar_example(
                x[0, show], label[0], pred[0], case_id=batch[keys.CASE_ID][0], spacing=spacing[0], modality=self.inputs[0]
            )

    def on_validation_epoch_end(self) -> None:
        summary = self.val_metrics.compute()  # synced across ranks by torchmetrics
        rows = self.val_metrics.rows()  # this rank's cases, with their ids
        self.val_metrics.reset()
        if self.trainer is not None and self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        flat = {k: float(v) for k, v in summary.items() if torch.is_tensor(v) and v.ndim == 0}
        # identical on every rank after the metric's sync: no further reduction
        self.log_dict({f"val/{k}": v for k, v in flat.items()}, sync_dist=False)
        self.last_val_summary = flat
        self.last_val_rows = rows
        self.decide_postprocessing()

    def on_fit_start(self) -> None:
        self.record_train_spacing()
        dm = getattr(self.trainer, "datamodule", None)
        # the pixel tier as trained (fitted US mapper, CT mixture): prediction rebuilds it from the checkpoint
        records = {}
        for t in getattr(dm, "sample_transforms", None) or []:
            rec = t.record() if callable(getattr(t, "record", None)) else None
            if rec is not None:
                records[rec["transform"]] = rec
        if records:
            self.pixel_tier = records

    # --- inference (LightningCLI predict) --------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Region masks of whole cropped cases: ``{"case_id": [...], "regions": (B, 3, D, H, W) uint8}``."""
        regions = self.predict_regions(self.net_input(batch)).to(torch.uint8).cpu()
        return {keys.CASE_ID: batch[keys.CASE_ID], "regions": regions, keys.META: batch.get(keys.META)}

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self):
        opt = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return opt
        sched = build_scheduler(self.scheduler_factory, opt, self.trainer, self.scheduler_interval)
        return {"optimizer": opt, "lr_scheduler": sched}

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # what a reader (student, predict) needs without instantiating the module
        checkpoint["trifuse"] = {
            "kind": "teacher",
            "modality": self.modality,
            "inputs": list(self.inputs),
            "in_channels": self.in_channels,
            "regions": list(keys.REGIONS),
            "roi_size": list(self.roi_size),
            "spacing": self.train_spacing,
            "postprocessing": self.postprocessing_decision,
            "pixel_tier": self.pixel_tier,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("trifuse") or {}
        self.train_spacing = meta.get("spacing")
        self.postprocessing_decision = meta.get("postprocessing") or {}
        self.pixel_tier = meta.get("pixel_tier") or {}
