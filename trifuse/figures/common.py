"""Shared helpers for tri-planar figures (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trifuse import keys  # noqa: E402

VIEWS = ("axial", "coronal", "sagittal")
#: overlay colours for raw-label rendering: ED green, NCR red/blue, ET yellow
REGION_COLOURS = {"ED": (0.1, 0.85, 0.1), "NCR": (0.9, 0.1, 0.1), "ET": (1.0, 0.9, 0.0)}


def lesion_centre(label: np.ndarray | None, fallback_shape) -> tuple[int, int, int]:
    """Voxel index through the centre of mass of WT (or the volume centre)."""
    if label is not None and label[keys.WT].any():
        idx = np.argwhere(label[keys.WT] > 0)
        return tuple(int(v) for v in np.round(idx.mean(0)))
    return tuple(s // 2 for s in fallback_shape)


def take_view(vol: np.ndarray, view: str, centre, affine=None) -> np.ndarray:
    """2-D slice of ``vol (X, Y, Z)`` through ``centre``, for display.

    With the volume's ``affine`` the slice is oriented radiologically from the geometry
    (:func:`trifuse.semantic.slices.view_geometry`: superior/anterior up, patient's right
    on the left), whatever the storage order; without it, the BraTS storage order is assumed.
    """
    if affine is not None:
        from trifuse.semantic.slices import view_geometry

        geo = view_geometry(np.asarray(affine, dtype=float), view)
        return np.asarray(geo.slice(vol, centre[geo.slice_axis]))
    x, y, z = centre
    if view == "axial":
        return np.rot90(vol[:, :, z], 2).T[::-1].T
    if view == "coronal":
        return np.rot90(vol[:, y, :])
    if view == "sagittal":
        return np.rot90(vol[x, :, :])[:, ::-1]
    raise ValueError(view)


def label_rgba(label: np.ndarray, view: str, centre, alpha: float = 0.45, affine=None) -> np.ndarray:
    """RGBA overlay of ED (WT∖TC), NCR (TC∖ET) and ET for one view."""
    wt, tc, et = (take_view(label[i].astype(bool), view, centre, affine) for i in range(3))
    rgba = np.zeros(wt.shape + (4,), np.float32)
    for mask, name in ((wt & ~tc, "ED"), (tc & ~et, "NCR"), (et, "ET")):
        rgba[mask, :3] = REGION_COLOURS[name]
        rgba[mask, 3] = alpha
    return rgba


def save_figure(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight", facecolor="black")
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
