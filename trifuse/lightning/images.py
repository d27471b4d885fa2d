"""Tri-planar overlay images of a prediction, for loggers (W&B) and PNG files.

Two steps, so the heavy part stays cheap inside ``validation_step``: :func:`triplanar_example`
cuts three orthogonal planes through the tumour (small 2-D numpy arrays, on the CPU), and
:func:`render_triplanar` draws them with matplotlib (Agg, no display) into an RGB array.
Planes are named by array axis (the native BraTS grid is not reoriented): axis 0, 1 and 2
of ``(D, H, W)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from trifuse import keys

#: region colours (RGB in [0, 1]): WT green, TC yellow, ET red (the usual BraTS palette)
REGION_COLOURS = {"WT": (0.1, 0.8, 0.2), "TC": (1.0, 0.85, 0.0), "ET": (0.9, 0.1, 0.1)}


def _centre(*masks: Optional[torch.Tensor]) -> list[int]:
    """Voxel index through which to cut: centroid of the first non-empty WT mask, else the volume centre."""
    for m in masks:
        if m is not None and bool(m[keys.WT].any()):
            idx = torch.nonzero(m[keys.WT]).float().mean(0)
            return [int(round(float(i))) for i in idx]
    ref = next(m for m in masks if m is not None)
    return [s // 2 for s in ref.shape[1:]]


def _planes(vol: torch.Tensor, centre: Sequence[int]) -> list[np.ndarray]:
    """Three planes through ``centre`` of a ``(..., D, H, W)`` tensor, as float32 numpy arrays."""
    v = vol.detach().float().cpu()
    d, h, w = centre
    return [v[..., d, :, :].numpy(), v[..., :, h, :].numpy(), v[..., :, :, w].numpy()]


def triplanar_example(
    image: torch.Tensor,
    label: Optional[torch.Tensor],
    pred: torch.Tensor,
    case_id: str = "",
    spacing: Optional[Sequence[float]] = None,
    modality: str = "",
) -> dict:
    """Cut an image, its reference and its prediction along three planes through the tumour.

    Args:
        image: ``(D, H, W)`` intensity volume (e.g. the FLAIR channel, or the US/CT input).
        label: ``(3, D, H, W)`` reference region masks (WT, TC, ET), or ``None``.
        pred: ``(3, D, H, W)`` predicted region masks.
        case_id, modality: shown in the title.
        spacing: voxel size in mm (array-axis order), for the aspect ratio.

    Returns:
        dict with ``image`` / ``label`` / ``pred`` lists of 3 planes (numpy; masks ``(3, a, b)``),
        ``centre``, ``spacing``, ``case_id``, ``modality``.
    """
    centre = _centre(label, pred)
    return {
        "image": _planes(image, centre),
        "label": _planes(label, centre) if label is not None else None,
        "pred": _planes(pred, centre),
        "centre": centre,
        "spacing": [float(s) for s in (spacing or (1.0, 1.0, 1.0))],
        "case_id": str(case_id),
        "modality": modality,
    }


def _overlay(ax, image: np.ndarray, masks: Optional[np.ndarray], aspect: float) -> None:
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    ax.imshow(np.rot90(image), cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
    if masks is not None:
        for i, region in enumerate(keys.REGIONS):  # nested, largest first: smaller regions drawn on top
            m = np.rot90(masks[i] > 0.5)
            if m.any():
                rgba = np.zeros(m.shape + (4,), np.float32)
                rgba[m] = (*REGION_COLOURS[region], 0.45)
                ax.imshow(rgba, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def render_triplanar(example: dict, title: Optional[str] = None, dpi: int = 80) -> np.ndarray:
    """Draw a :func:`triplanar_example`: rows reference / prediction, columns the three planes.

    Returns:
        ``(H, W, 3)`` uint8 RGB image (what ``wandb.Image`` and ``logger.log_image`` accept).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [("reference", example["label"])] if example.get("label") is not None else []
    rows.append(("prediction", example["pred"]))
    sd, sh, sw = example["spacing"]
    # after rot90 a plane (a, b) shows b horizontally and a vertically: aspect = spacing_a / spacing_b
    aspects = [sw / sh, sw / sd, sh / sd]
    fig = Figure(figsize=(3 * 2.6, len(rows) * 2.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, (name, masks) in enumerate(rows):
        for c in range(3):
            _overlay(axes[r][c], example["image"][c], None if masks is None else masks[c], aspects[c])
            if c == 0:
                axes[r][c].set_ylabel(name)
            if r == 0:
                axes[r][c].set_title(f"axis {c} = {example['centre'][c]}", fontsize=9)
    fig.suptitle(title or f"{example['case_id']} ({example['modality']}): WT green, TC yellow, ET red", fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3])
