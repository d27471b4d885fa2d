"""Synthetic BraTS-like cohort on real anatomy (the MNI152 templates shipped in nilearn).

Each case:

1. samples the MNI152 1 mm T1, GM, WM and brain-mask templates onto a BraTS grid
   (240×240×155 at 1 mm, or ~2 mm "small"), through a random affine (rotation, scale,
   translation) plus a smooth random deformation (anatomical variation);
2. grows one glioma (sometimes two: multifocal) with an irregular boundary: a
   necrotic core, an enhancing rim (or solid/nodular enhancement, or none), and oedema
   that spreads preferentially along white matter; tissue is pushed away from the
   lesion (mass effect);
3. renders T1, T1ce, T2 and FLAIR from tissue fractions with literature-like relative
   intensities (WM T1 = 1), partial volume at lesion borders, texture, a smooth
   multiplicative bias field and Rician noise; skull-stripped like BraTS;
4. writes the case in the real BraTS layout and naming, so the same loader serves it.

Everything runs in torch on the whole grid (no per-voxel Python), which keeps a
full-size case at a few seconds on 2 CPU threads.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.io.discovery import case_file_name, case_id_for
from trifuse.io.labels import convention
from trifuse.io.nifti import temp_prefix, write_nifti

SIZES = {
    # name: (shape, spacing mm)
    "full": ((240, 240, 155), 1.0),
    "small": ((120, 120, 78), 2.0),
    "tiny": ((60, 60, 39), 4.0),  # tests and smoke runs
}

#: tissue classes of the intensity model
TISSUES = ("csf", "gm", "wm", "ed", "et", "ncr")

#: relative intensities per contrast (rows T1, T1ce, T2, FLAIR) and tissue (columns TISSUES),
#: normalised to WM on T1 = 1. Orders follow standard glioma MRI appearance: CSF dark on
#: T1/FLAIR and bright on T2; oedema bright on T2/FLAIR; enhancing tumour bright on T1ce
#: only; necrosis dark on T1/T1ce and bright on T2 (e.g. Pope et al., AJNR 2005).
INTENSITY = torch.tensor(
    [
        #  csf   gm    wm    ed    et    ncr
        [0.30, 0.70, 1.00, 0.62, 0.68, 0.38],  # T1
        [0.30, 0.72, 1.00, 0.64, 1.55, 0.36],  # T1ce
        [1.70, 0.90, 0.62, 1.30, 0.98, 1.50],  # T2
        [0.25, 0.88, 0.70, 1.45, 1.05, 0.62],  # FLAIR
    ]
)

#: global intensity scale per contrast (arbitrary scanner units, as in BraTS files)
CONTRAST_SCALE = (900.0, 1100.0, 1000.0, 800.0)

# MNI coordinate (mm) placed at the centre of the BraTS grid
_MNI_CENTRE = (0.0, -18.0, 10.0)


@dataclass
class CaseParams:
    """What a case was built from; stored next to the case for reproducibility."""

    seed: int
    size: str
    rotation_deg: tuple
    scale: tuple
    translation_mm: tuple
    n_lesions: int
    radius_mm: tuple
    enhancement: str
    necrosis_fraction: float
    oedema_extent: float
    mass_effect_mm: float
    noise_sigma: float


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[torch.Tensor, np.ndarray]:
    """MNI152 T1/GM/WM/brain-mask templates as a (1, 4, X, Y, Z) tensor plus their affine."""
    from nilearn import datasets

    loaders = (
        datasets.load_mni152_template,
        datasets.load_mni152_gm_template,
        datasets.load_mni152_wm_template,
        datasets.load_mni152_brain_mask,
    )
    imgs = [f(resolution=1) for f in loaders]
    vol = np.stack([np.asarray(im.get_fdata(), dtype=np.float32) for im in imgs])
    return torch.from_numpy(vol)[None], np.asarray(imgs[0].affine, dtype=np.float64)


@functools.lru_cache(maxsize=1)
def _template_landmarks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deep white-matter voxels (candidate lesion centres) and the brain box, computed once."""
    tmpl, _ = _templates()
    deep = (tmpl[0, 2] > 0.7).nonzero()
    nz = (tmpl[0, 3] > 0.5).nonzero()
    return deep, nz.min(0).values.float(), nz.max(0).values.float()


def brats_affine(shape, spacing: float) -> np.ndarray:
    """BraTS-style affine (x and y flipped, origin at the grid corner, as in the released files)."""
    a = np.diag([-spacing, -spacing, spacing, 1.0])
    a[1, 3] = (shape[1] - 1) * spacing
    return a


def _smooth_noise(gen: torch.Generator, shape, coarse: int, channels: int = 1) -> torch.Tensor:
    """Smooth random field in about [-1, 1]: coarse Gaussian noise, trilinearly upsampled."""
    c = torch.randn((1, channels, coarse, coarse, coarse), generator=gen)
    return F.interpolate(c, size=tuple(shape), mode="trilinear", align_corners=True)[0]


def _rotation(angles_deg) -> torch.Tensor:
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return (rz @ ry @ rx).float()


def _sample_params(rng: np.random.Generator, seed: int, size: str) -> CaseParams:
    n_lesions = 2 if rng.random() < 0.15 else 1
    # log-uniform radius: small lesions (~5 mm) up to large (~32 mm)
    radii = tuple(float(np.exp(rng.uniform(np.log(5.0), np.log(32.0)))) for _ in range(n_lesions))
    enhancement = rng.choice(["ring", "ring", "ring", "solid", "none"])
    return CaseParams(
        seed=seed,
        size=size,
        rotation_deg=tuple(float(x) for x in rng.uniform(-6, 6, 3)),
        scale=tuple(float(x) for x in rng.uniform(0.92, 1.08, 3)),
        translation_mm=tuple(float(x) for x in rng.uniform(-4, 4, 3)),
        n_lesions=n_lesions,
        radius_mm=radii,
        enhancement=str(enhancement),
        necrosis_fraction=float(rng.uniform(0.35, 0.7)) if enhancement == "ring" else float(rng.uniform(0.0, 0.5)),
        oedema_extent=float(rng.uniform(1.4, 2.6)),
        mass_effect_mm=float(rng.uniform(0.2, 0.5)) * radii[0],
        noise_sigma=float(rng.uniform(0.015, 0.04)),
    )


def case_params(seed: int, size: str = "small") -> CaseParams:
    """The parameters :func:`generate_case` draws for ``seed`` (cheap: no volume is built)."""
    rng = np.random.default_rng(seed)
    rng.integers(2**31)  # the torch generator seed is drawn first in generate_case
    return _sample_params(rng, seed, size)


def generate_case(
    seed: int, size: str = "small", year: int = 2021, params: CaseParams | None = None, return_tissue: bool = False
) -> dict:
    """Generate one synthetic case.

    Args:
        seed: all randomness derives from it (same seed → same case, bit for bit).
        size: ``"full"`` (240×240×155, 1 mm) or ``"small"`` (120×120×78, 2 mm).
        year: label convention of ``seg`` (2023: ET = 3; otherwise ET = 4).

    Returns:
        dict with ``t1, t1ce, t2, flair`` (int16, ``(X, Y, Z)``), ``seg`` (uint8, raw labels),
        ``affine`` (4×4), ``spacing`` (mm), ``params`` (:class:`CaseParams` as dict) and
        ``tissue`` (with ``return_tissue``: uint8 map of the dominant tissue, index into
        ``("bg",) + TISSUES``, for tests and physics checks; else ``None``).
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    shape, spacing = SIZES[size]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    p = params or _sample_params(rng, seed, size)
    tmpl, mni_aff = _templates()
    affine = brats_affine(shape, spacing)

    full_shape = shape
    # --- lesion centres: chosen in template space inside deep white matter
    deep, lo, hi = _template_landmarks()
    n_deep = deep.shape[0]
    centres_vox = deep[torch.randint(n_deep, (p.n_lesions,), generator=gen)].float()
    if p.n_lesions > 1:  # a satellite lesion 20–40 mm from the first, still in WM
        d = torch.cdist(deep.float(), centres_vox[:1])[:, 0]
        near = deep[(d > 20) & (d < 40)]
        if len(near):
            centres_vox[1] = near[torch.randint(len(near), (1,), generator=gen)].float()
    # template voxel → output-grid mm (inverse of the mapping below, ignoring deformation)
    rot = _rotation(p.rotation_deg)
    scale = torch.tensor(p.scale)
    trans = torch.tensor(p.translation_mm)
    flip = torch.tensor([-1.0, -1.0, 1.0])  # BraTS x/y flipped relative to MNI (RAS)
    mni_aff_t = torch.from_numpy(mni_aff).float()
    centre_mni = torch.tensor(_MNI_CENTRE)

    def out_to_mni(xyz: torch.Tensor) -> torch.Tensor:
        # output mm (voxel axes) → world RAS mm relative to centre → jittered MNI mm
        world = xyz * flip
        return (world * scale) @ rot.T + trans + centre_mni

    def mni_to_out(mni: torch.Tensor) -> torch.Tensor:
        world = ((mni - trans - centre_mni) @ rot) / scale
        return world * flip

    centres_mni = (mni_aff_t[:3, :3] @ centres_vox.T).T + mni_aff_t[:3, 3]
    centres_out = mni_to_out(centres_mni)  # (L, 3) in output mm

    # --- work only inside the box that can hold brain (the corners of the template's
    # brain box mapped to the output grid, plus room for deformation and mass effect):
    # about 40 % of the BraTS grid, so everything below costs 2-3x less.
    corners = torch.stack([torch.where(torch.tensor(b, dtype=torch.bool), hi, lo) for b in np.ndindex(2, 2, 2)])
    c_out = mni_to_out(corners @ mni_aff_t[:3, :3].T + mni_aff_t[:3, 3])
    half = torch.tensor([(n - 1) / 2 for n in full_shape])
    margin = 6.0 + p.mass_effect_mm
    b_lo = ((c_out.min(0).values - margin) / spacing + half).floor().clamp_min(0).long()
    b_hi = ((c_out.max(0).values + margin) / spacing + half).ceil().long() + 1
    b_hi = torch.minimum(b_hi, torch.tensor(full_shape))
    box = tuple(slice(int(a), int(b)) for a, b in zip(b_lo, b_hi))
    shape = tuple(int(b - a) for a, b in zip(b_lo, b_hi))
    axes = [(torch.arange(int(a), int(b), dtype=torch.float32) - h) * spacing for a, b, h in zip(b_lo, b_hi, half)]
    grid_mm = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (x, y, z, 3) voxel-axis mm

    # --- mass effect: tissue pushed radially away from the main lesion
    c0 = centres_out[0]
    rel = grid_mm - c0
    r = rel.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    r_t = p.radius_mm[0]
    push = p.mass_effect_mm * torch.exp(-(r - r_t).clamp_min(0) / 15.0)
    r_src = (r - push).clamp_min(0)
    src_mm = c0 + rel * (r_src / r)
    # smooth random deformation (~2 mm) for anatomical variation
    disp = _smooth_noise(gen, shape, 6, 3).permute(1, 2, 3, 0) * 2.0
    src_mni = out_to_mni(src_mm + disp)
    # MNI mm → template voxel → grid_sample normalised coordinates
    inv = torch.linalg.inv(mni_aff_t)
    vox = src_mni @ inv[:3, :3].T + inv[:3, 3]
    tshape = torch.tensor(tmpl.shape[2:], dtype=torch.float32)
    norm = vox / (tshape - 1) * 2 - 1
    # grid_sample wants (x, y, z) ordered as (W, H, D) of the input. CPU 3-D grid_sample
    # costs ~0.2 µs per point and channel, which dominated the case time at 1 mm; the
    # sampling map is smooth, so at 1 mm we sample the templates on every other voxel and
    # upsample trilinearly (the templates themselves are smooth at the 2 mm scale).
    step = 2 if spacing < 1.5 else 1
    sub = norm[::step, ::step, ::step].flip(-1)[None]
    sampled = F.grid_sample(tmpl, sub, mode="bilinear", padding_mode="zeros", align_corners=True)
    if step > 1:
        sampled = F.interpolate(sampled, size=shape, mode="trilinear", align_corners=True)
    sampled = sampled[0]
    t1_tmpl, gm, wm_o, mask = sampled
    brain = mask > 0.5
    gm = gm.clamp(0, 1)
    wm_o = wm_o.clamp(0, 1)
    tot = (gm + wm_o).clamp_min(1.0)
    gm, wm_o = gm / tot, wm_o / tot
    csf = (mask.clamp(0, 1) - gm - wm_o).clamp(0, 1)

    # --- lesions: irregular soft masks from a noise-perturbed, anisotropic distance
    shape_noise = _smooth_noise(gen, shape, 8)[0]
    tc_soft = torch.zeros(shape)
    ncr_soft = torch.zeros(shape)
    ed_soft = torch.zeros(shape)
    ed_int = torch.zeros(shape)
    edge = 0.06
    for li in range(p.n_lesions):
        c = centres_out[li]
        aniso = torch.from_numpy(rng.uniform(0.75, 1.3, 3)).float()
        d = ((grid_mm - c) / aniso).norm(dim=-1)
        r_eff = d / p.radius_mm[li] * (1 + 0.22 * shape_noise)
        tc_soft = torch.maximum(tc_soft, torch.sigmoid((1 - r_eff) / edge))
        if p.necrosis_fraction > 0.05:
            ncr_soft = torch.maximum(ncr_soft, torch.sigmoid((p.necrosis_fraction - r_eff) / edge))
        # oedema follows white matter: WM extends the reach, CSF blocks it
        reach = p.oedema_extent * (0.55 + 0.9 * wm_o) * (1 - 0.8 * (csf > 0.6).float())
        ed_soft = torch.maximum(ed_soft, torch.sigmoid((reach - r_eff) / (2 * edge)))
        # oedema signal fades towards its border (vasogenic oedema is graded, not flat)
        ed_int = torch.maximum(ed_int, torch.sigmoid((reach - r_eff) / (0.25 * reach)))
    brain_f = brain.float()
    tc_soft = tc_soft * brain_f
    ed_soft = torch.maximum(ed_soft * brain_f, tc_soft)
    ncr_soft = torch.minimum(ncr_soft, tc_soft)
    if p.enhancement == "none":
        et_soft = torch.zeros(shape)
        ncr_soft = tc_soft  # non-enhancing tumour core (label NCR/NET)
    elif p.enhancement == "solid":  # nodular/solid enhancement with patchy non-enhancing parts
        patch = torch.sigmoid(_smooth_noise(gen, shape, 10)[0] * 4)
        et_soft = (tc_soft - ncr_soft) * patch
        ncr_soft = tc_soft - et_soft
    else:  # ring
        et_soft = tc_soft - ncr_soft
    ed_int = torch.maximum(ed_int * brain_f, tc_soft)
    oed_only = (ed_int - tc_soft).clamp(0, 1)

    # --- tissue fractions (sum to the brain mask) and intensities
    healthy = (1 - ed_int).clamp(0, 1)
    frac = torch.stack([csf * healthy, gm * healthy, wm_o * healthy, oed_only, et_soft, ncr_soft])  # (6, X, Y, Z)
    # smooth fields are drawn on the whole box (same random stream whatever the brain);
    # all per-voxel image work below runs on brain voxels only (~1/3 of the box)
    texture = 1 + 0.06 * _smooth_noise(gen, shape, 24, 4) + 0.03 * _smooth_noise(gen, shape, 48, 4)
    bias = torch.exp(0.15 * _smooth_noise(gen, shape, 4, 4))
    m = brain
    img_b = (INTENSITY @ frac[:, m]) * texture[:, m]  # (4, N)
    # the real template T1 contributes its texture (sulci, deep nuclei) to T1 and T1ce;
    # its 90th percentile in the brain on every 7th voxel (a full sort cost ~0.2 s per case)
    t1_b = t1_tmpl[m]
    vals = t1_b[::7]
    t1_real = t1_b / vals.kthvalue(max(1, int(0.9 * len(vals)))).values.clamp_min(1e-3) if len(vals) else t1_b
    blend = 0.35 * healthy[m]
    img_b[0] = (1 - blend) * img_b[0] + blend * t1_real
    img_b[1] = (1 - blend) * img_b[1] + blend * t1_real
    img_b = img_b * bias[:, m]
    sigma = p.noise_sigma
    n1 = torch.randn(img_b.shape, generator=gen) * sigma
    n2 = torch.randn(img_b.shape, generator=gen) * sigma
    img_b = torch.sqrt((img_b + n1) ** 2 + n2**2)  # Rician magnitude noise (zero outside: skull-stripped)
    scales = torch.tensor(CONTRAST_SCALE)[:, None] * torch.from_numpy(rng.uniform(0.85, 1.15, (4, 1))).float()
    img_b = (img_b * scales).round().clamp(0, 32767).to(torch.int16)
    img_box = torch.zeros((4,) + tuple(shape), dtype=torch.int16)
    img_box[:, m] = img_b
    img = np.zeros((4,) + tuple(full_shape), np.int16)
    img[(slice(None),) + box] = img_box.numpy()

    # --- labels in the year's convention
    conv = convention(year)
    seg_box = np.zeros(shape, np.uint8)
    ed_m = (ed_soft > 0.5) & brain
    tc_m = (tc_soft > 0.5) & brain
    et_m = tc_m & (et_soft > ncr_soft) & (et_soft > 0.25)
    seg_box[ed_m.numpy()] = conv.ed
    seg_box[(tc_m & ~et_m).numpy()] = conv.ncr
    seg_box[et_m.numpy()] = conv.et
    seg = np.zeros(full_shape, np.uint8)
    seg[box] = seg_box

    dominant = None
    if return_tissue:
        dominant = np.zeros(full_shape, np.uint8)
        dominant[box] = torch.cat([1 - brain_f[None], frac]).argmax(0).to(torch.uint8).numpy()
    return {
        "t1": img[0],
        "t1ce": img[1],
        "t2": img[2],
        "flair": img[3],
        "seg": seg,
        "affine": affine,
        "spacing": (spacing,) * 3,
        "params": asdict(p),
        "tissue": dominant,
    }


def case_seed(seed: int, index: int) -> int:
    """Per-case seed derived from the cohort seed (stable across Python runs)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:4], "little")


def write_case_folder(out_dir: str | Path, case_id: str, case: dict, year: int, ext: str = ".nii.gz", with_seg: bool = True) -> Path:
    """Write a generated case in BraTS layout, atomically (temp folder + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / case_id
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(case_id), dir=out_dir))  # writer-tagged: swept if killed
    try:
        names = list(keys.MODALITIES) + (["seg"] if with_seg else [])
        for name in names:
            write_nifti(tmp / case_file_name(case_id, year, name, ext), case[name], case["affine"])
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def synthesize_cohort(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    layout: int = 2021,
    size: str = "small",
    ext: str = ".nii.gz",
    progress=None,
) -> list[Path]:
    """Write ``n`` cases in ``layout``'s BraTS naming under ``out_dir``; resumable.

    A case folder that already holds all five files is skipped, so a second run
    only fills in what is missing.
    """
    layout = int(layout)
    out = []
    for i in range(n):
        case_id = case_id_for(layout, i)
        folder = Path(out_dir) / case_id
        expected = [folder / case_file_name(case_id, layout, m, ext) for m in list(keys.MODALITIES) + ["seg"]]
        status = "exists"
        if not all(p.exists() for p in expected):
            case = generate_case(case_seed(seed, i), size=size, year=layout)
            write_case_folder(out_dir, case_id, case, layout, ext)
            status = "written"
        out.append(folder)
        if progress:
            progress(i + 1, n, case_id, status)
    return out
