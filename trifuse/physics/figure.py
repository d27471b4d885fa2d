"""Tri-planar figure of the pixel tier: T1ce, FLAIR, simulated US (as trained and native), synthetic CT.

``render_physics_figure(sample, out_png)`` draws a 3×6 grid: rows are the axial,
coronal and sagittal planes through the probe's target (the FLAIR-abnormal centroid
by default, red +; the probe face centre projected on the plane is the cyan o in the
US columns); columns T1ce, FLAIR, the simulated US exactly as a teacher sees it in
training (the configs' probe, working resolution ``ProbeConfig().working_mm``), the
same probe and seed rendered at native resolution, and the two channels of the
synthetic CT as the network receives them (brain and bone windows of
:data:`trifuse.keys.CT_WINDOWS`, each in [0, 1]). ``us``/``ct`` entries of the sample
are used as the training view if present, else computed with the default transforms.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from trifuse import keys
from trifuse.physics.ct import CTMixtureModel

__all__ = ["render_physics_figure", "physics_panels", "plane_axes"]



def plane_axes(affine) -> dict[str, int]:
    """Array axis normal to each anatomical plane, from the affine (BraTS default if None).

    Returns:
        ``{"axial": i, "coronal": j, "sagittal": k}``.
    """
    if affine is None:
        return {"sagittal": 0, "coronal": 1, "axial": 2}
    a = np.asarray(affine, dtype=float)[:3, :3]
    # world axis (0 = x/L-R, 1 = y/A-P, 2 = z/S-I) each array axis mostly moves along
    world = np.abs(a).argmax(0)
    if sorted(world.tolist()) != [0, 1, 2]:
        return {"sagittal": 0, "coronal": 1, "axial": 2}
    inv = {int(w): i for i, w in enumerate(world)}
    return {"sagittal": inv[0], "coronal": inv[1], "axial": inv[2]}


def _slice(vol: np.ndarray, axis: int, index: int) -> np.ndarray:
    s = np.take(vol, index, axis=axis)
    return s.T  # rows = the later array axis, displayed with origin="lower"


def physics_panels(sample: dict, ct_model: CTMixtureModel | str | None = None, seed: int = 0, probe=None) -> dict:
    """The volumes of the pixel-tier figure (what :func:`render_physics_figure` draws).

    Returns:
        dict with ``"columns"``: list of ``(title, volume (D, H, W) ndarray, cmap, (lo, hi) or None)``
        (T1ce, FLAIR, US as trained, US native, one per CT window), ``"us_columns"`` (their
        indices), ``"target"``/``"centre"`` (mm), ``"index"`` (voxel through the target),
        ``"spacing"``, ``"planes"`` and ``"sample"`` (with the training-view US and CT).
    """
    from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT
    from trifuse.physics.ultrasound import place_probe, ProbeConfig
    from trifuse.physics.tissues import spacing_tensor

    s = dict(sample)
    s[keys.META] = dict(s.get(keys.META, {}))
    s[keys.META]["applied"] = list(s[keys.META].get("applied", []))
    train_probe = probe or ProbeConfig()
    if keys.US not in s:
        s = SimulateUltrasound(train_probe, seed=seed)(s)
    if keys.CT not in s:
        s = SynthesizeCT(ct_model)(s)
    native_cfg = dataclasses.replace(train_probe, resolution_mm=None)
    native = SimulateUltrasound(native_cfg, seed=seed)({k: v for k, v in s.items() if k != keys.US})
    mri = torch.as_tensor(s[keys.MRI]).float()
    us = torch.as_tensor(s[keys.US]).float()[0].numpy()
    us_native = torch.as_tensor(native[keys.US]).float()[0].numpy()
    ct = torch.as_tensor(s[keys.CT]).float().numpy()
    spacing = s[keys.META].get("spacing", (1.0, 1.0, 1.0))
    # slice through the probe target (recorded by the US transform, else recomputed)
    target = centre = None
    for rec in reversed(s[keys.META]["applied"]):
        if rec.get("name") == "SimulateUltrasound" and "target_mm" in rec:
            target, centre = rec["target_mm"], rec.get("centre_mm")
            break
    if target is None:
        geom = place_probe(mri[None], torch.as_tensor(s[keys.BRAIN]).bool()[None], spacing_tensor(spacing, 1), ProbeConfig())
        target, centre = geom.target[0].tolist(), geom.origin[0].tolist()
    idx = [int(np.clip(round(t / float(sp)), 0, n - 1)) for t, sp, n in zip(target, spacing, mri.shape[1:])]
    res = train_probe.working_mm
    cols = [("T1ce", mri[keys.T1CE].numpy(), "gray", None), ("FLAIR", mri[keys.FLAIR].numpy(), "gray", None),
            (f"US as trained ({res:g} mm)" if res else "US as trained", us, "gray", (0.0, 1.0)),
            ("US native resolution", us_native, "gray", (0.0, 1.0))]
    for c, (name, lo, hi) in enumerate(keys.CT_WINDOWS):
        cols.append((f"CT {name} window [{lo:g}, {hi:g}] HU", ct[c], "gray", (0.0, 1.0)))
    return {"columns": cols, "us_columns": (2, 3), "target": target, "centre": centre, "index": idx, "spacing": spacing,
            "planes": plane_axes(s[keys.META].get("affine")), "sample": s}


def render_physics_figure(sample: dict, out_png: str | os.PathLike, ct_model: CTMixtureModel | str | None = None, seed: int = 0,
                          dpi: int = 110, probe=None) -> Path:
    """Render the pixel-tier figure for one sample.

    Args:
        sample: sample dict (unbatched) with ``keys.MRI``, ``keys.BRAIN`` and
            ``keys.META``; ``keys.US``/``keys.CT`` are computed if absent.
        out_png: output path (written atomically).
        ct_model: CT mixture (or path to one) used when the sample has no CT.
        seed: speckle seed when the US is computed here.
        probe: :class:`~trifuse.physics.ultrasound.ProbeConfig` of the training view
            (default: the default probe at its working resolution, as the configs);
            the native column renders it with ``resolution_mm=None``.
        dpi: figure resolution.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = physics_panels(sample, ct_model, seed, probe)
    cols, us_cols, target, centre = p["columns"], p["us_columns"], p["target"], p["centre"]
    idx, spacing, planes, s = p["index"], p["spacing"], p["planes"], p["sample"]
    fig, axs = plt.subplots(3, len(cols), figsize=(3.1 * len(cols), 9.5), facecolor="black")
    for r, plane in enumerate(("axial", "coronal", "sagittal")):
        ax_i = planes[plane]
        for c, (title, vol, cmap, lim) in enumerate(cols):
            img = _slice(vol, ax_i, idx[ax_i])
            if lim is None:
                lo, hi = np.percentile(img[img != 0], [1, 99]) if np.any(img != 0) else (0, 1)
            else:
                lo, hi = lim
            # keep physical aspect ratio for anisotropic voxels
            other = [a for a in range(3) if a != ax_i]
            aspect = float(spacing[other[1]]) / float(spacing[other[0]])
            im = axs[r, c].imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
            # target (+) and the probe face centre projected on the plane (o)
            tv = [float(t) / float(sp) for t, sp in zip(target, spacing)]
            axs[r, c].plot([tv[other[0]]], [tv[other[1]]], "+", color="red", ms=8, mew=1.2)
            if centre is not None and c in us_cols:
                cv = [float(t) / float(sp) for t, sp in zip(centre, spacing)]
                axs[r, c].plot([cv[other[0]]], [cv[other[1]]], "o", color="cyan", ms=4, mfc="none")
            axs[r, c].set_xticks([])
            axs[r, c].set_yticks([])
            if r == 0:
                axs[r, c].set_title(title, color="white", fontsize=9)
            if c == 0:
                axs[r, c].set_ylabel(f"{plane} {idx[ax_i]}", color="white")
            if c == len(cols) - 1:
                cb = fig.colorbar(im, ax=axs[r, c], fraction=0.046, pad=0.02)
                cb.ax.tick_params(colors="white", labelsize=7)
    fig.suptitle(f"{s.get(keys.CASE_ID, '')}  pixel tier: simulated US and synthetic CT", color="white")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    from trifuse.io.nifti import atomic_target

    try:
        with atomic_target(out, "figure") as tmp:  # tagged temporary, swept after a kill
            fig.savefig(tmp, dpi=dpi, facecolor="black", format="png")
    finally:
        plt.close(fig)
    return out
