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
#: legend text of each overlay colour: the label it paints and the region difference it is
REGION_LEGEND = {"ED": "ED = WT∖TC", "NCR": "NCR = TC∖ET", "ET": "ET"}
#: resolution of every PNG :func:`save_figure` writes (and of :func:`panel_boxes`)
DPI = 110


def lesion_centre(label: np.ndarray | None, fallback_shape) -> tuple[int, int, int]:
    """Voxel index through the centre of mass of WT (or the volume centre)."""
    if label is not None and label[keys.WT].any():
        idx = np.argwhere(label[keys.WT] > 0)
        return tuple(int(v) for v in np.round(idx.mean(0)))
    return tuple(s // 2 for s in fallback_shape)


def tumour_centre(*wts, fallback_shape) -> tuple[int, int, int]:
    """Voxel through the largest cross-sections of the first non-empty WT mask of ``wts``.

    Along each axis the index whose slice holds the most WT voxels, so each of the three
    views passes through the tumour where it is widest; without any tumour the volume centre.
    """
    for wt in wts:
        wt = None if wt is None else np.asarray(wt, dtype=bool)
        if wt is not None and wt.any():
            return tuple(int(np.argmax(wt.sum(axis=tuple(b for b in range(3) if b != a)))) for a in range(3))
    return tuple(int(s) // 2 for s in fallback_shape)


def grey01(img: np.ndarray, mask: np.ndarray, pct=(1.0, 99.0)) -> np.ndarray:
    """A slice windowed to [0, 1] over the ``mask`` pixels' percentiles; 0 outside the mask."""
    img = np.asarray(img, dtype=np.float32)
    vals = img[mask] if mask.any() else img.ravel()
    lo, hi = np.percentile(vals, pct) if vals.size else (0.0, 1.0)
    out = np.clip((img - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)
    return np.where(mask, out, 0.0).astype(np.float32)


def blend(grey: np.ndarray, rgba: np.ndarray) -> np.ndarray:
    """RGB ``(R, C, 3)``: the grey slice with the RGBA overlay alpha-blended on it (pixel exact)."""
    a = rgba[..., 3:4]
    return ((1.0 - a) * grey[..., None] + a * rgba[..., :3]).astype(np.float32)


def grey_slice(vol: np.ndarray, brain: np.ndarray, view: str, centre, affine=None) -> tuple[np.ndarray, np.ndarray]:
    """``(grey, brain)`` slices of one view: ``vol`` windowed to [0, 1] over the brain (:func:`grey01`)."""
    b2 = take_view(np.asarray(brain, dtype=bool), view, centre, affine)
    return grey01(take_view(vol, view, centre, affine), b2), b2


def labelled_slice(grey: np.ndarray, regions: np.ndarray, view: str, centre, affine=None, alpha: float = 0.5) -> np.ndarray:
    """RGB: the grey slice with ``regions`` (3, X, Y, Z) painted in the label colours (:func:`label_rgba`)."""
    return blend(grey, label_rgba(regions, view, centre, alpha=alpha, affine=affine))


def row_figure(n_rows: int, n_cols: int, col_in: float = 2.2, row_in: float = 2.5, footer_in: float = 0.0):
    """A black figure of ``n_rows`` row subfigures, plus a footer subfigure when ``footer_in`` > 0 (inches)."""
    fig = plt.figure(figsize=(col_in * n_cols, row_in * n_rows + footer_in + 0.4), facecolor="black")
    ratios = [row_in] * n_rows + ([footer_in] if footer_in else [])
    subs = list(np.atleast_1d(fig.subfigures(len(ratios), 1, height_ratios=ratios, hspace=0.0)))
    for sub in subs:
        sub.set_facecolor("none")  # an opaque subfigure would hide what the parent figure draws
    return fig, subs


def row_axes(sub, title: str, titles) -> list:
    """One row of a :func:`row_figure`: its title at the left, then a bare panel per column title, hanging from one line."""
    sub.suptitle(title, color="white", fontsize=9.5, x=0.01, ha="left")
    axes = list(np.atleast_1d(sub.subplots(1, len(titles))))
    sub.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, wspace=0.04)
    for ax, t in zip(axes, titles):
        ax.set_anchor("N")  # panels of different heights hang from one line
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_facecolor("black")
        ax.set_title(t, color="white", fontsize=8.5)
    return axes


def region_legend(ax_or_fig, **kw):
    """Legend of the ED / NCR / ET overlay colours."""
    from matplotlib.patches import Patch

    handles = [Patch(color=REGION_COLOURS[k], label=REGION_LEGEND[k]) for k in ("ED", "NCR", "ET")]
    kw = {"facecolor": "black", "edgecolor": "gray", "labelcolor": "white", "fontsize": 8, **kw}
    return ax_or_fig.legend(handles=handles + kw.pop("extra", []), **kw)


def panel_boxes(fig, axes: dict) -> dict:
    """Pixel box ``(x0, y0, x1, y1)`` (top-left origin) of each axes in the PNG :func:`save_figure` writes.

    Call right before :func:`save_figure` (it lays the figure out at :data:`DPI` and crops it
    as ``bbox_inches="tight"`` does), so tests can read a panel back out of the PNG.
    """
    import matplotlib as mpl

    fig.set_dpi(DPI)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer).padded(mpl.rcParams["savefig.pad_inches"])
    left, top = tight.x0 * DPI, tight.y1 * DPI
    out = {}
    for key, ax in axes.items():
        b = ax.get_window_extent(renderer)
        out[key] = (b.x0 - left, top - b.y1, b.x1 - left, top - b.y0)
    return out


def save_with_boxes(fig, axes: dict, out_png: str | Path) -> tuple[Path, dict]:
    """:func:`save_figure` and the PNG pixel box of each of ``axes`` (:func:`panel_boxes`)."""
    boxes = panel_boxes(fig, axes)
    return save_figure(fig, out_png), boxes


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
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight", facecolor="black")
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
