"""BraTS region metrics as a torchmetrics ``Metric`` (DDP-safe accumulation of per-case scores).

Per-case Dice and HD95 are kept as ``"cat"`` states, so under DDP every rank's cases are
gathered before averaging: the result is the mean over *all* cases, never a mean of per-rank
means (which is biased when ranks hold different numbers of cases).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from trifuse import keys
from trifuse.metrics.functional import HD95Mode, batch_region_dice_hd95

InputType = Literal["auto", "logits", "probs", "binary"]

__all__ = ["BratsRegionMetrics", "binarize"]


def binarize(preds: torch.Tensor, input_type: InputType = "auto", threshold: float = 0.5) -> torch.Tensor:
    """Turn network outputs into binary region masks.

    Args:
        preds: ``(B, C, *spatial)`` logits, sigmoid probabilities or binary masks.
        input_type: ``"logits"`` (sigmoid then threshold, i.e. ``logit > logit(threshold)``),
            ``"probs"`` (threshold), ``"binary"`` (non-zero), or ``"auto"``: bool/integer
            dtypes are binary, floats within ``[0, 1]`` are probabilities, other floats logits.
        threshold: probability threshold.

    Returns:
        bool tensor, same shape and device.
    """
    if input_type == "auto":
        if preds.dtype == torch.bool or not preds.is_floating_point():
            input_type = "binary"
        elif preds.numel() and (preds.min() < 0 or preds.max() > 1):
            input_type = "logits"
        else:
            input_type = "probs"
    if input_type == "binary":
        return preds != 0
    if input_type == "probs":
        return preds > threshold
    if input_type == "logits":
        return torch.sigmoid(preds.float()) > threshold
    raise ValueError(f"input_type must be auto, logits, probs or binary; got {input_type!r}")


class BratsRegionMetrics(Metric):
    """Per-region Dice and HD95 over cases, with BraTS conventions (see :mod:`trifuse.metrics.functional`).

    Example::

        metric = BratsRegionMetrics()
        metric.update(logits, batch["label"], spacing=[m["spacing"] for m in batch["meta"]])
        metric.compute()  # {"dice_WT": tensor(..), ..., "dice_mean": .., "hd95_mean": ..}

    Each ``update`` call must receive whole cases (validation on full volumes or
    sliding-window outputs), since Dice/HD95 are per-case quantities.

    Args:
        regions: channel names, default WT, TC, ET.
        input_type: how ``preds`` are binarised (see :func:`binarize`).
        threshold: probability threshold.
        spacing: default voxel spacing in mm (array-axis order) when ``update`` gets none.
        hd95: compute HD95 (CPU-bound, a fraction of a second per full case); if ``False``
            only Dice is reported.
        hd95_mode: ``"pooled"`` (brats-evaluation) or ``"max_directed"`` (MONAI).
        empty_hd95: HD95 in mm when exactly one mask is empty.
        return_per_case: also put ``"per_case_dice"`` and ``"per_case_hd95"`` ``(N, C)``
            tensors into the output of :meth:`compute` (not loggable as scalars).
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``).
    """

    is_differentiable = False
    higher_is_better = None  # Dice higher, HD95 lower
    full_state_update = False

    dice: list[torch.Tensor]
    hd95: list[torch.Tensor]

    def __init__(
        self,
        regions: Sequence[str] = keys.REGIONS,
        input_type: InputType = "auto",
        threshold: float = 0.5,
        spacing: Sequence[float] | None = None,
        hd95: bool = True,
        hd95_mode: HD95Mode = "pooled",
        empty_hd95: float = keys.HD95_EMPTY_MM,
        return_per_case: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.regions = tuple(regions)
        self.input_type = input_type
        self.threshold = threshold
        self.default_spacing = None if spacing is None else tuple(float(s) for s in spacing)
        self.compute_hd95 = hd95
        self.hd95_mode = hd95_mode
        self.empty_hd95 = float(empty_hd95)
        self.return_per_case = return_per_case
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hd95", default=[], dist_reduce_fx="cat")
        # case ids are strings and cannot be synced across ranks; kept rank-locally for rows()
        self._case_ids: list[str] = []

    def update(self, preds: torch.Tensor, target: torch.Tensor, spacing=None, case_ids: Sequence[str] | None = None) -> None:
        """Score a batch of whole cases.

        Args:
            preds: ``(B, C, *spatial)`` logits, probabilities or binary masks.
            target: ``(B, C, *spatial)`` binary region masks.
            spacing: per-batch spacing (see :func:`trifuse.metrics.functional.per_case_spacing`);
                defaults to the constructor's ``spacing``.
            case_ids: optional ids, used by :meth:`rows`.
        """
        if preds.shape != target.shape:
            raise ValueError(f"preds and target shapes differ: {tuple(preds.shape)} vs {tuple(target.shape)}")
        if preds.shape[1] != len(self.regions):
            raise ValueError(f"expected {len(self.regions)} channels {self.regions}, got shape {tuple(preds.shape)}")
        mask = binarize(preds, self.input_type, self.threshold)
        res = batch_region_dice_hd95(
            mask,
            target,
            self.default_spacing if spacing is None else spacing,
            hd95=self.compute_hd95,
            hd95_mode=self.hd95_mode,
            empty_hd95=self.empty_hd95,
        )
        # flat 1-D states in the metric's dtype: torchmetrics fills a rank that saw no case with
        # an empty 1-D tensor of ``self.dtype``, which must concatenate with the others
        self.dice.append(res["dice"].reshape(-1).to(device=self.device, dtype=self.dtype))
        self.hd95.append(res["hd95"].reshape(-1).to(device=self.device, dtype=self.dtype))
        if case_ids is not None:
            if len(case_ids) != preds.shape[0]:
                raise ValueError(f"got {len(case_ids)} case ids for a batch of {preds.shape[0]}")
            self._case_ids.extend(str(c) for c in case_ids)

    def per_case(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All (synced) per-case scores: ``(dice, hd95)``, each ``(N, C)`` float64."""
        c = len(self.regions)

        def cat(state) -> torch.Tensor:
            if isinstance(state, list) and not state:
                return torch.zeros(0, c, dtype=torch.float64, device=self.device)
            return dim_zero_cat(state).to(torch.float64).reshape(-1, c)

        return cat(self.dice), cat(self.hd95)

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over all cases: ``dice_<R>``, ``hd95_<R>`` per region, and ``dice_mean``/``hd95_mean``.

        ``*_mean`` is the mean over regions of the per-region means (= mean over all
        case×region scores). NaN when no case was seen.
        """
        dice, hd = self.per_case()
        out: dict[str, torch.Tensor] = {}
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=dice.device)
        for i, r in enumerate(self.regions):
            out[f"dice_{r}"] = dice[:, i].mean() if dice.shape[0] else nan
        out["dice_mean"] = dice.mean() if dice.shape[0] else nan
        if self.compute_hd95:
            for i, r in enumerate(self.regions):
                out[f"hd95_{r}"] = hd[:, i].mean() if hd.shape[0] else nan
            out["hd95_mean"] = hd.mean() if hd.shape[0] else nan
        if self.return_per_case:
            out["per_case_dice"] = dice
            out["per_case_hd95"] = hd
        return out

    def rows(self) -> list[dict]:
        """Per-case rows ``{"case_id", "region", "dice", "hd95"}`` (the ``per_case.csv`` layout).

        Case ids come from ``update(case_ids=...)`` when every case got one on this process
        (single process, or called before syncing); otherwise cases are numbered ``"0"``, ``"1"``, ...
        """
        dice, hd = self.per_case()
        ids = self._case_ids if len(self._case_ids) == dice.shape[0] else [str(i) for i in range(dice.shape[0])]
        return [
            {"case_id": ids[n], "region": r, "dice": float(dice[n, i]), "hd95": float(hd[n, i])}
            for n in range(dice.shape[0])
            for i, r in enumerate(self.regions)
        ]

    def reset(self) -> None:
        super().reset()
        self._case_ids = []
