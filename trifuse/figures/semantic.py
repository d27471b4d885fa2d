"""``trifuse figures semantic``: MRI, per-region attention of each view, the fused prior, overlays.

Rows: axial, coronal, sagittal slices through the lesion, shown radiologically (the
describers' :func:`~trifuse.semantic.slices.view_geometry`: subject's right on the image
left; sagittal anterior left). Columns:

1. FLAIR, 2. T1ce (with the view's description text under the row label),
3–5. that view's attention ``σ(F^d_r)`` for WT, TC, ET (the similarity volume of this
   view alone, before the three views are fused),
6. the fused prior ``σ(F_3D)`` for WT, as stored by ``trifuse semantic``,
7. overlay: FLAIR with the fused WT/TC/ET priors as contours at 0.5 (green, red,
   yellow) and, when labels exist, the true WT outline (white, dashed).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.figures.common import plt, save_figure

VIEWS = ("axial", "coronal", "sagittal")
PRIOR_COLOURS = {"WT": (0.1, 0.9, 0.1), "TC": (1.0, 0.15, 0.15), "ET": (1.0, 0.9, 0.0)}


def _upsample(vol: np.ndarray | torch.Tensor, shape) -> np.ndarray:
    """(C, d, h, w) → (C, *shape) trilinear (cell-centred, like the prior grid)."""
    t = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    return F.interpolate(t[None], size=tuple(shape), mode="trilinear", align_corners=False)[0].numpy()


def _centre(sample: Mapping[str, Any], prior_full: np.ndarray) -> tuple[int, int, int]:
    """Where the three slices pass: through the image-derived abnormality (FLAIR/T2, the slices the
    describers saw: :func:`~trifuse.semantic.slices.find_abnormality`), never through the labels;
    without one, through the fused WT prior's weighted centroid."""
    from trifuse.semantic.slices import find_abnormality, sample_arrays

    mri, brain, geo = sample_arrays(sample)
    abn = find_abnormality(mri, brain, geo.spacing)
    if abn.found:
        return tuple(int(round(float(c))) for c in abn.slice_centre)
    w = np.clip(prior_full[keys.WT] - 0.5, 0, None)
    if w.sum() <= 0:
        return tuple(s // 2 for s in prior_full.shape[1:])
    grid = np.indices(w.shape).reshape(3, -1)
    return tuple(int(round(float((g * w.ravel()).sum() / w.sum()))) for g in grid)


def render_semantic_figure(sample: Mapping[str, Any], prior: np.ndarray | torch.Tensor,
                           view_maps: Mapping[str, np.ndarray | torch.Tensor] | None, out_png: str | Path,
                           description=None, title: str | None = None) -> Path:
    """Draw the figure (see module docstring).

    Args:
        sample: cropped case sample (``mri`` (4, D, H, W), ``brain``, ``meta`` with affine
            and spacing; ``label`` optional).
        prior: (3, d, h, w) fused prior in [0, 1] (the stored one).
        view_maps: view → (3, d, h, w) per-view similarity ``F^d`` (before σ); ``None``
            leaves columns 3–5 empty.
        out_png: output path.
        description: the case :class:`~trifuse.semantic.schema.Description` (texts shown).
        title: figure title.
    """
    from trifuse.semantic.schema import to_text
    from trifuse.semantic.slices import sample_arrays, view_geometry

    mri, brain, geo = sample_arrays(sample)
    shape = brain.shape
    prior_full = _upsample(np.asarray(prior, dtype=np.float32), shape)
    views_full = {v: 1 / (1 + np.exp(-_upsample(m, shape))) for v, m in (view_maps or {}).items()}
    label = np.asarray(sample[keys.LABEL]).astype(bool) if keys.LABEL in sample else None
    centre = _centre(sample, prior_full)
    cols = ["FLAIR", "T1ce", "WT attention (view)", "TC attention (view)", "ET attention (view)",
            "fused prior F_3D (WT)", "overlay: fused priors"]
    fig, axes = plt.subplots(3, len(cols), figsize=(2.6 * len(cols), 3.3 * 3), facecolor="black")
    heat = None
    for r, view in enumerate(VIEWS):
        vg = view_geometry(geo.affine, view, geo.spacing)
        idx = int(centre[vg.slice_axis])
        aspect = vg.row_mm / vg.col_mm
        b2 = vg.slice(brain, idx)

        def gray(ax, ch):
            img = vg.slice(mri[ch], idx)
            lo, hi = (np.percentile(img[b2], [1, 99]) if b2.any() else (0, 1))
            ax.imshow(np.ma.masked_where(~b2, img), cmap="gray", vmin=lo, vmax=hi, aspect=aspect,
                      interpolation="nearest")

        for c in range(len(cols)):
            ax = axes[r, c]
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], color="white", fontsize=9)
        gray(axes[r, 0], keys.FLAIR)
        gray(axes[r, 1], keys.T1CE)
        for k, region in enumerate(keys.REGIONS):
            ax = axes[r, 2 + k]
            gray(ax, keys.FLAIR)
            if view in views_full:
                m = vg.slice(views_full[view][k], idx)
                heat = ax.imshow(np.ma.masked_where(~b2, m), cmap="inferno", vmin=0, vmax=1, alpha=0.6,
                                 aspect=aspect, interpolation="bilinear")
            else:
                ax.text(0.5, 0.5, "no CLIP\ncheckpoint", color="gray", ha="center", va="center", transform=ax.transAxes)
        ax = axes[r, 5]
        gray(ax, keys.FLAIR)
        heat = ax.imshow(np.ma.masked_where(~b2, vg.slice(prior_full[keys.WT], idx)), cmap="inferno", vmin=0, vmax=1,
                         alpha=0.6, aspect=aspect, interpolation="bilinear")
        ax = axes[r, 6]
        gray(ax, keys.FLAIR)
        for k, region in enumerate(keys.REGIONS):
            m = vg.slice(prior_full[k], idx)
            if m.max() > 0.5 > m.min():  # nested widths: coinciding contours stay visible
                ax.contour(m, levels=[0.5], colors=[PRIOR_COLOURS[region]], linewidths=(2.6, 1.7, 0.9)[k])
        if label is not None:
            t = vg.slice(label[keys.WT], idx).astype(float)
            if t.max() > 0:
                ax.contour(t, levels=[0.5], colors=["white"], linewidths=0.9, linestyles="dashed")
        ax.set_aspect(aspect)
        text = view
        if description is not None and view in description.views:
            text += "\n" + textwrap.fill(to_text(description, view).split(":", 1)[-1].strip(), 30)
        axes[r, 0].set_ylabel(text, color="white", fontsize=7)
    if heat is not None:
        cax = fig.add_axes([0.92, 0.3, 0.008, 0.4])
        cb = fig.colorbar(heat, cax=cax)
        cb.ax.tick_params(colors="white", labelsize=7)
        cb.set_label("σ(similarity contrast)", color="white", fontsize=8)
    legend = "contours at 0.5: WT green, TC red, ET yellow; true WT white dashed" if label is not None else \
        "contours at 0.5: WT green, TC red, ET yellow"
    fig.suptitle(f"{title or sample.get(keys.CASE_ID, '')}  —  semantic priors ({legend})", color="white", fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.9, wspace=0.04, hspace=0.06)
    return save_figure(fig, out_png)


def semantic_figure_from_data(data_dir: str | Path, out_png: str | Path, case: str | None = None,
                              cache_dir: str | Path | None = None, descriptions_dir: str | Path | None = None,
                              priors_dir: str | Path | None = None, clip_ckpt: str | Path | None = None) -> Path:
    """Load a case, its stored prior and (if the checkpoint exists) per-view maps; draw the figure.

    Defaults follow the stages: cache ``<data>/../cache/<name>``, descriptions
    ``<data>/../descriptions/<name>``, priors ``<data>/../priors/<name>``, checkpoint
    ``runs/clip/<name>/clip.pt``.

    Raises:
        FileNotFoundError: no prior for the case (run ``trifuse semantic``).
    """
    from trifuse.io.cache import load_sample
    from trifuse.semantic.clip_data import default_clip_dir, default_descriptions_dir, default_priors_dir, resolve_cache
    from trifuse.semantic.describe import load_descriptions
    from trifuse.semantic.priors import PriorConfig, compute_prior, load_prior, prior_path

    cache, ids = resolve_cache(data_dir, cache_dir)
    priors_dir = Path(priors_dir) if priors_dir else default_priors_dir(data_dir)
    if case is None:
        have = [c for c in ids if prior_path(priors_dir, c).exists()]
        if not have:
            raise FileNotFoundError(f"no priors in {priors_dir} (run `trifuse semantic --data {data_dir}` first)")
        case = have[0]
    elif case not in ids:
        raise ValueError(f"case {case} is not in {cache}")
    path = prior_path(priors_dir, case)
    if not path.exists():
        raise FileNotFoundError(f"no semantic prior for case {case} in {priors_dir} (run `trifuse semantic` first)")
    stored = load_prior(path)
    sample = load_sample(cache, case)
    ddir = Path(descriptions_dir) if descriptions_dir else default_descriptions_dir(data_dir)
    desc = load_descriptions(ddir).get(case) if ddir.is_dir() else None
    ckpt = Path(clip_ckpt) if clip_ckpt else Path(stored["meta"].get("clip_checkpoint") or default_clip_dir(data_dir) / "clip.pt")
    if not ckpt.exists():
        ckpt = default_clip_dir(data_dir) / "clip.pt"
    view_maps = None
    if ckpt.exists():
        from trifuse.semantic.clip import load_clip

        cfg = dict(stored["meta"].get("config") or {"factor": int(stored["meta"].get("factor", 4))})
        cfg["views"] = tuple(cfg.get("views", VIEWS))
        res = compute_prior(load_clip(ckpt), sample, desc, PriorConfig(**cfg))
        view_maps = res.views
    return render_semantic_figure(sample, stored["prior"].astype(np.float32), view_maps, out_png, desc, title=case)
