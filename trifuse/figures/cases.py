"""``trifuse figures cases``: truth and prediction of each held-out case in three views.

One row per case, titled with the case's Dice per region (:func:`trifuse.metrics.functional.compute_region_dice`,
the BraTS conventions of ``trifuse evaluate``). Columns: axial, coronal and sagittal slices
through the tumour where it is widest (:func:`~trifuse.figures.common.tumour_centre` of the
true WT, else of the predicted one), shown radiologically from the affine
(:func:`~trifuse.semantic.slices.view_geometry`), each as a pair: the truth, then the
prediction. FLAIR in grey with the regions filled in the BraTS label colours (ED = WT∖TC
green, NCR = TC∖ET red, ET yellow); the prediction panel also outlines the true WT (white,
dashed). Slices are cropped to the brain's bounding box.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trifuse import keys
from trifuse.figures.common import (VIEWS, grey_slice, labelled_slice, region_legend, row_axes, row_figure,
                                    save_with_boxes, take_view, tumour_centre)

OVERLAY_ALPHA = 0.5
COLUMNS = tuple((view, kind) for view in VIEWS for kind in ("truth", "prediction"))


@dataclass
class CaseRow:
    """What one row shows: the case, its scores, and the three views' slices.

    Attributes:
        case_id: the case.
        dice: region → Dice (``None`` for every region when the prediction file is missing; it is then scored as empty).
        note: extra text of the row title (a missing prediction).
        flair, brain: ``(X, Y, Z)`` FLAIR and brain mask, cropped to the brain box.
        truth, pred: ``(3, X, Y, Z)`` bool regions (WT, TC, ET), cropped alike.
        affine, spacing: the case's geometry (orientation of the views, pixel aspect).
        centre: the voxel the three slices pass through (cropped grid).
        origin: the crop's first voxel in the case's grid (slice numbers are shown in that grid).
    """

    case_id: str
    dice: dict
    flair: np.ndarray
    brain: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    affine: np.ndarray
    spacing: tuple
    centre: tuple = field(default=())
    note: str = ""
    origin: tuple = (0, 0, 0)

    def title(self) -> str:
        scores = " · ".join(f"{r} {self.dice[r]:.3f}" for r in keys.REGIONS)
        return f"{self.case_id}    Dice {scores}" + (f"    ({self.note})" if self.note else "")


def brain_crop(brain: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Slices of the brain's bounding box plus ``margin`` voxels (the whole volume without brain)."""
    if not brain.any():
        return tuple(slice(0, s) for s in brain.shape)
    idx = np.argwhere(brain)
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(slice(max(0, int(a) - margin), min(s, int(b) + margin)) for a, b, s in zip(lo, hi, brain.shape))


def case_row(case_id: str, flair, brain, truth, pred, affine, spacing, note: str = "") -> CaseRow:
    """Score ``pred`` against ``truth`` (whole grid) and crop everything to the brain box."""
    import torch

    from trifuse.metrics.functional import compute_region_dice

    truth = np.asarray(truth).astype(bool)
    pred = np.asarray(pred).astype(bool)
    d = compute_region_dice(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])[0]
    sl = brain_crop(np.asarray(brain, dtype=bool))
    full = (slice(None),) + sl
    row = CaseRow(case_id, {r: float(d[i]) for i, r in enumerate(keys.REGIONS)}, np.asarray(flair, np.float32)[sl],
                  np.asarray(brain, bool)[sl], truth[full], pred[full], np.asarray(affine, float),
                  tuple(float(s) for s in spacing), note=note, origin=tuple(int(s.start) for s in sl))
    row.centre = tumour_centre(row.truth[keys.WT], row.pred[keys.WT], fallback_shape=row.flair.shape)
    return row


def render_cases_figure(rows: list[CaseRow], out_png: str | Path, title: str = "held-out cases") -> dict:
    """Draw one row per case (see the module docstring) and write ``out_png``.

    Returns:
        ``{"png": path, "rows": [case ids], "cases": the rows, "panels": {(case_id, view, kind): RGB (R, C, 3) float array
        exactly as drawn}, "boxes": {same key: (x0, y0, x1, y1) pixel box in the PNG}}``.
    """
    from trifuse.semantic.slices import view_geometry

    if not rows:
        raise ValueError("no case to draw")
    fig, subs = row_figure(len(rows), len(COLUMNS), row_in=2.45, footer_in=0.35)
    panels, axes = {}, {}
    for row, sub in zip(rows, subs):
        geos = {view: view_geometry(row.affine, view, row.spacing) for view in VIEWS}
        titles = [f"{view} {row.centre[geos[view].slice_axis] + row.origin[geos[view].slice_axis]} · {kind}"
                  for view, kind in COLUMNS]
        for ax, (view, kind) in zip(row_axes(sub, row.title(), titles), COLUMNS):
            grey, _ = grey_slice(row.flair, row.brain, view, row.centre, row.affine)
            rgb = labelled_slice(grey, row.truth if kind == "truth" else row.pred, view, row.centre, row.affine, OVERLAY_ALPHA)
            key = (row.case_id, view, kind)
            panels[key], axes[key] = rgb, ax
            ax.imshow(rgb, aspect=geos[view].row_mm / geos[view].col_mm, interpolation="nearest")
            if kind == "prediction":
                t = take_view(row.truth[keys.WT], view, row.centre, row.affine).astype(float)
                if t.max() > 0:
                    ax.contour(t, levels=[0.5], colors=["white"], linewidths=0.8, linestyles="dashed")
    from matplotlib.lines import Line2D

    dashed = Line2D([], [], color="white", linestyle="--", linewidth=0.8, label="true WT outline")
    region_legend(subs[-1], extra=[dashed], loc="center", ncol=4)
    fig.suptitle(f"{title}: FLAIR with truth | prediction per view", color="white", fontsize=11, y=1.0, va="bottom")
    png, boxes = save_with_boxes(fig, axes, out_png)
    return {"png": png, "rows": [r.case_id for r in rows], "cases": rows, "panels": panels, "boxes": boxes}


def cases_figure_from_folders(data_dir: str | Path, pred_dir: str | Path, out_png: str | Path, max_cases: int = 8,
                              case: str | None = None) -> dict:
    """Read each case of ``data_dir`` (with its labels) and ``pred_dir/<case_id>.nii.gz``; draw the figure.

    A missing prediction is drawn (and scored) as empty, as ``trifuse evaluate`` scores it; a
    prediction on another grid or with labels outside the case's convention is refused.

    Raises:
        FileNotFoundError: no prediction folder.
        ValueError: no case with labels (or no case ``case``); an unusable prediction file.
    """
    from trifuse.io.discovery import discover_cases
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case
    from trifuse.metrics.report import _checked_prediction, _find_prediction

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"{pred_dir}: prediction folder does not exist (run trifuse predict first)")
    records = [r for r in discover_cases(data_dir) if r.seg is not None and (case is None or r.case_id == case)]
    if not records:
        raise ValueError(f"{data_dir}: no case with a reference segmentation" + (f" named {case}" if case else ""))
    rows = []
    for rec in records[: max(1, int(max_cases))]:
        decoded = decode_case(rec, require_seg=True)
        seg = np.asarray(decoded.seg.data)
        truth = labels_to_regions(seg, rec.year)
        path = _find_prediction(pred_dir, rec.case_id)
        if path is None:
            pred, note = np.zeros_like(truth), "no prediction file: scored as empty"
        else:
            pred, note = labels_to_regions(_checked_prediction(path, rec, seg.shape, decoded.reference.affine), rec.year), ""
        stack = np.stack([v.data for v in decoded.images])
        rows.append(case_row(rec.case_id, stack[keys.FLAIR], (stack != 0).any(0), truth, pred,
                             decoded.reference.affine, decoded.reference.spacing, note))
        del decoded, stack
    return render_cases_figure(rows, out_png, title=f"{len(rows)} held-out case(s) of {Path(data_dir).name}, predictions {pred_dir}")
