"""Per-release BraTS label conventions and region conversions.

Labels are never hard-coded as "ET = 4": every conversion goes through a
:class:`LabelConvention` looked up by year.

* 2020/2021: NCR = 1, ED = 2, ET = 4
* 2023:      NCR = 1, ED = 2, ET = 3

Regions (channel order :data:`trifuse.keys.REGIONS`): WT = NCR ∪ ED ∪ ET,
TC = NCR ∪ ET, ET = ET.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np

from trifuse import keys


@dataclass(frozen=True)
class LabelConvention:
    """Integer values of the three tumour sub-regions in a raw label map."""

    year: int
    ncr: int
    ed: int
    et: int

    @property
    def values(self) -> tuple[int, ...]:
        """All legal values, background included."""
        return (0, self.ncr, self.ed, self.et)

    @property
    def region_labels(self) -> dict[str, tuple[int, ...]]:
        """Raw labels that make up each region (nnU-Net style, declared as data)."""
        return {"WT": (self.ncr, self.ed, self.et), "TC": (self.ncr, self.et), "ET": (self.et,)}


CONVENTIONS: dict[int, LabelConvention] = {
    2020: LabelConvention(2020, ncr=1, ed=2, et=4),
    2021: LabelConvention(2021, ncr=1, ed=2, et=4),
    2023: LabelConvention(2023, ncr=1, ed=2, et=3),
}


def convention(year: int) -> LabelConvention:
    """Return the label convention of a BraTS release.

    Raises:
        ValueError: for a year without a known convention.
    """
    try:
        return CONVENTIONS[int(year)]
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"no BraTS label convention for year {year!r}; known: {sorted(CONVENTIONS)}") from None


def _torch_if_tensor(x):
    """The torch module if ``x`` is a tensor, else ``None``.

    torch is not imported for numpy inputs, so preprocessing workers stay light (no ~250 MB
    torch import per process); if torch was never imported, ``x`` cannot be a tensor.
    """
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else None


def labels_to_regions(seg, year: int):
    """Raw label map → nested region masks.

    Args:
        seg: integer label map, shape ``(D, H, W)`` or ``(1, D, H, W)`` (numpy or torch).
        year: BraTS release whose convention ``seg`` follows.

    Returns:
        uint8 array/tensor of shape ``(3, D, H, W)`` in order WT, TC, ET.
    """
    torch = _torch_if_tensor(seg)
    is_torch = torch is not None
    if seg.ndim == 4:
        if seg.shape[0] != 1:
            raise ValueError(f"expected a single-channel label map, got shape {tuple(seg.shape)}")
        seg = seg[0]
    # one table lookup per voxel (values outside 0..255 are not labels: validation rejects them)
    lut = _region_lut(int(year))
    if is_torch:
        idx = seg.to(torch.int64).clamp(0, 255)
        return torch.from_numpy(lut).to(seg.device)[:, idx]
    seg = np.asarray(seg)
    if seg.dtype != np.uint8:
        seg = np.clip(seg, 0, 255).astype(np.uint8)
    return lut[:, seg]


@functools.lru_cache(maxsize=None)
def _region_lut(year: int) -> np.ndarray:
    """``(3, 256)`` uint8 table: region membership of every raw label value."""
    conv = convention(year)
    lut = np.zeros((len(keys.REGIONS), 256), np.uint8)
    for r, region in enumerate(keys.REGIONS):
        lut[r, list(conv.region_labels[region])] = 1
    return lut


def regions_to_labels(regions, year: int):
    """Nested region masks (or probabilities ≥ 0.5) → raw label map.

    Goes in nested order, as nnU-Net's ``regions_class_order`` does: WT → ED, then
    TC → NCR, then ET → ET, each step overwriting the previous one. Non-nested
    predictions are thereby resolved by the order (a voxel in ET is ET).

    Args:
        regions: ``(3, D, H, W)`` binary masks in order WT, TC, ET (numpy or torch, any dtype;
            non-boolean values are thresholded at 0.5).
        year: target BraTS release.

    Returns:
        uint8 label map of shape ``(D, H, W)``.
    """
    conv = convention(year)
    torch = _torch_if_tensor(regions)
    is_torch = torch is not None
    if regions.shape[0] != len(keys.REGIONS):
        raise ValueError(f"expected {len(keys.REGIONS)} region channels, got shape {tuple(regions.shape)}")
    if is_torch:
        r = regions > 0.5 if regions.dtype != torch.bool else regions
        out = torch.zeros(r.shape[1:], dtype=torch.uint8, device=r.device)
    else:
        r = np.asarray(regions)
        r = r > 0.5 if r.dtype != bool else r
        out = np.zeros(r.shape[1:], dtype=np.uint8)
    wt, tc, et = r[keys.WT], r[keys.TC], r[keys.ET]
    out[wt] = conv.ed
    out[tc] = conv.ncr
    out[et] = conv.et
    return out
