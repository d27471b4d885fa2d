"""``trifuse figures cohort``: the four contrasts of one case in three views with the labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trifuse import keys
from trifuse.figures.common import VIEWS, label_rgba, lesion_centre, plt, save_figure, take_view


def render_cohort_figure(sample: dict, out_png: str | Path) -> Path:
    """Rows: axial, coronal, sagittal through the lesion. Columns: T1, T1ce, T2, FLAIR, FLAIR + labels.

    Args:
        sample: a sample dict (``mri`` (4, X, Y, Z), ``label`` (3, X, Y, Z), ``case_id``).
    """
    mri = np.asarray(sample[keys.MRI], dtype=np.float32)
    label = np.asarray(sample[keys.LABEL]) if keys.LABEL in sample else None
    centre = lesion_centre(label, mri.shape[1:])
    meta = sample.get(keys.META, {})
    spacing = meta.get("spacing", (1, 1, 1))
    affine = meta.get("affine")
    titles = ["T1", "T1ce", "T2", "FLAIR", "FLAIR + labels"]
    fig, axes = plt.subplots(3, 5, figsize=(15, 9.5), facecolor="black")
    for r, view in enumerate(VIEWS):
        aspect = {"axial": spacing[1] / spacing[0], "coronal": spacing[2] / spacing[0], "sagittal": spacing[2] / spacing[1]}[view]
        for c in range(5):
            ax = axes[r, c]
            ax.set_facecolor("black")
            ch = min(c, 3)
            img = take_view(mri[ch], view, centre, affine)
            brain = img != 0
            lo, hi = (np.percentile(img[brain], [0.5, 99.5]) if brain.any() else (0, 1))
            ax.imshow(np.ma.masked_where(~brain, img), cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            if c == 4 and label is not None:
                ax.imshow(label_rgba(label, view, centre, affine=affine), aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(titles[c], color="white")
            if c == 0:
                ax.set_ylabel(view, color="white")
    fig.suptitle(f"{sample.get(keys.CASE_ID, '')}  (ED green, NCR red, ET yellow)", color="white")
    return save_figure(fig, out_png)
