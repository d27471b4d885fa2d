"""A small analytic head phantom for tests, benchmarks and figures of the pixel tier.

Ellipsoidal brain with a folded cortex (grey-matter shell cut by CSF sulci), white
matter, two lateral ventricles and an off-centre glioma (necrotic core, enhancing
rim, oedema). Each tissue's MRI intensities follow the assumed contrast profile of
:data:`trifuse.physics.tissues.DEFAULT_TISSUE_MODEL` plus noise, z-scored over the
brain like a cached sample. Labels are included only so callers can check
physics outputs per tissue; the physics itself never reads them.
"""
from __future__ import annotations

from typing import Sequence

import torch

from trifuse import keys
from trifuse.physics.tissues import BRAIN_TISSUES, DEFAULT_TISSUE_MODEL

__all__ = ["make_head_phantom", "TISSUE_CODE"]

#: integer codes of the phantom's tissue map (0 = outside the brain)
TISSUE_CODE = {name: i + 1 for i, name in enumerate(BRAIN_TISSUES)}


def make_head_phantom(
    shape: Sequence[int] = (48, 48, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    noise: float = 0.25,
    lesion: bool = True,
    margin_mm: float = 6.0,
) -> dict:
    """Build a phantom sample dict.

    Args:
        shape: (D, H, W) voxels.
        spacing: voxel size in mm.
        seed: noise seed.
        noise: intensity noise sd in z-score units of the profile.
        lesion: include the tumour.
        margin_mm: gap between the brain and the volume border (room for the skull).

    Returns:
        dict with ``keys.MRI`` (4, D, H, W) float32 z-scored over the brain,
        ``keys.BRAIN`` (1, D, H, W) bool, ``keys.SEG`` (1, D, H, W) uint8 (2021
        convention: NCR 1, ED 2, ET 4), ``keys.LABEL`` (3, D, H, W) uint8 WT/TC/ET,
        ``"tissue"`` (1, D, H, W) uint8 codes of :data:`TISSUE_CODE`,
        ``keys.CASE_ID`` and ``keys.META``.
    """
    g = torch.Generator().manual_seed(int(seed))
    d, h, w = (int(n) for n in shape)
    sp = torch.tensor([float(s) for s in spacing])
    zz, yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) * s for n, s in zip((d, h, w), sp)), indexing="ij")
    ext = torch.tensor([d, h, w], dtype=torch.float32) * sp
    c = (ext - sp) / 2
    rad = ext / 2 - margin_mm
    pz, py, px = (zz - c[0]) / rad[0], (yy - c[1]) / rad[1], (xx - c[2]) / rad[2]
    rho = torch.sqrt(pz**2 + py**2 + px**2)  # 1 at the brain surface
    brain = rho <= 1.0
    # depth below the surface in mm (approximately)
    depth_mm = (1 - rho) * float(rad.min())
    tissue = torch.zeros(d, h, w, dtype=torch.uint8)
    tissue[brain] = TISSUE_CODE["white_matter"]
    ctx = brain & (depth_mm < 3.5)
    tissue[ctx] = TISSUE_CODE["grey_matter"]
    # sulci: thin CSF clefts through the cortex along a few angular directions
    az = torch.atan2(py, px)
    el = torch.atan2(pz, torch.sqrt(px**2 + py**2))
    sulci = brain & (depth_mm < 3.0) & ((torch.cos(9 * az) * torch.cos(7 * el)) > 0.93)
    tissue[sulci] = TISSUE_CODE["csf"]
    tissue[brain & (depth_mm < 0.8)] = TISSUE_CODE["csf"]  # subarachnoid CSF rim
    # lateral ventricles
    for side in (-1, 1):
        v = ((pz / 0.35) ** 2 + ((py - 0.0) / 0.12) ** 2 + ((px - side * 0.15) / 0.08) ** 2) <= 1
        tissue[v & brain] = TISSUE_CODE["csf"]
    seg = torch.zeros(d, h, w, dtype=torch.uint8)
    if lesion:
        lc = c + torch.tensor([0.15, 0.35, -0.25]) * rad
        r = torch.sqrt((zz - lc[0]) ** 2 + (yy - lc[1]) ** 2 + (xx - lc[2]) ** 2)
        rt = 0.22 * float(rad.min())
        oed = brain & (r <= 1.8 * rt)
        enh = brain & (r <= rt)
        nec = brain & (r <= 0.6 * rt)
        tissue[oed] = TISSUE_CODE["oedema"]
        tissue[enh] = TISSUE_CODE["enhancing"]
        tissue[nec] = TISSUE_CODE["necrosis"]
        seg[oed], seg[enh], seg[nec] = 2, 4, 1
    means = torch.tensor(DEFAULT_TISSUE_MODEL.means)  # (6, 4)
    mri = torch.zeros(4, d, h, w)
    for k, name in enumerate(BRAIN_TISSUES):
        m = tissue == TISSUE_CODE[name]
        mri[:, m] = means[k][:, None]
    mri = mri + noise * torch.randn(mri.shape, generator=g)
    mri = mri * brain
    # z-score per channel over brain voxels, 0 outside (as the cache does)
    vals = mri[:, brain]
    mri = ((mri - vals.mean(1)[:, None, None, None]) / vals.std(1)[:, None, None, None]) * brain
    wt = seg > 0
    tc = (seg == 1) | (seg == 4)
    et = seg == 4
    return {
        keys.MRI: mri.float(),
        keys.BRAIN: brain[None],
        keys.SEG: seg[None],
        keys.LABEL: torch.stack([wt, tc, et]).to(torch.uint8),
        "tissue": tissue[None],
        keys.CASE_ID: f"phantom_{seed:03d}",
        keys.META: {
            "spacing": [float(s) for s in spacing],
            "affine": [[float(spacing[0]), 0, 0, 0], [0, float(spacing[1]), 0, 0], [0, 0, float(spacing[2]), 0], [0, 0, 0, 1]],
            "year": 2021,
            "crop_box": [[0, d], [0, h], [0, w]],
            "shape": [d, h, w],
            "applied": [],
        },
    }

