"""Tissue model of the pixel tier: what each voxel is made of, from MRI alone.

Two parts:

* :data:`TISSUES`, a table of acoustic and radiological properties per tissue
  (speed of sound, density, attenuation, backscatter, Hounsfield units), and
* :class:`TissueModel` / :func:`tissue_posteriors`, soft tissue posteriors
  ``(B, K, D, H, W)`` over the six brain classes from z-scored 4-contrast MRI,
  image-only (labels are never used).

Skull, scalp, air and the coupling saline are not inferred from intensities: BraTS
volumes are skull-stripped, so those tissues are placed geometrically around the
brain mask (:func:`outside_distance_mm`, :func:`head_layers`).

Sources of the table (values in :data:`TISSUES` are rounded, "tuned but cited"):

* F. A. Duck, *Physical Properties of Tissue: A Comprehensive Reference Book*,
  Academic Press, 1990 — speed of sound, density and attenuation of brain, CSF,
  soft tissue, saline and bone.
* ImFusion Suite, ultrasound simulation tissue presets for brain (grey/white
  matter, CSF, tumour), used in e.g. ReMIND / DiffUS brain simulations.
* S. Pichardo, V. W. Sin, K. Hynynen, "Multi-frequency characterization of the
  speed of sound and attenuation coefficient for longitudinal transmission of
  freshly excised human skulls", Phys. Med. Biol. 56(1):219, 2011 — cortical skull.
* Radiology HU tables (e.g. W. R. Webb, W. E. Brant, N. M. Major, *Fundamentals of
  Body CT*, 4th ed., 2015; brain CT grey/white matter, CSF, oedema, necrosis).
* Backscatter (echogenicity) levels are qualitative, from intra-operative brain
  ultrasound reports: G. Unsgård et al., "Intra-operative 3D ultrasound in
  neurosurgery", Acta Neurochir 148:235, 2006 (high-grade gliomas hyperechoic with
  a hypo/anechoic necrotic core, oedema mildly hyperechoic, CSF anechoic, white
  matter slightly brighter than cortex).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from trifuse import keys

__all__ = [
    "Tissue",
    "TISSUES",
    "TISSUE_NAMES",
    "BRAIN_TISSUES",
    "HEAD_TISSUES",
    "TissueModel",
    "DEFAULT_TISSUE_MODEL",
    "tissue_posteriors",
    "outside_distance_mm",
    "coarse_distance_mm",
    "HeadConfig",
    "head_layers",
    "downsample",
    "upsample",
    "coarse_factors",
    "head_posteriors",
    "spacing_tensor",
    "map_voxels",
    "voxel_chunk",
]


@dataclass(frozen=True)
class Tissue:
    """Physical properties of one tissue.

    Attributes:
        name: short identifier, e.g. ``"grey_matter"``.
        c: speed of sound in m/s.
        rho: density in kg/m^3.
        alpha: attenuation coefficient in dB/(cm·MHz) (linear in frequency).
        scatter_db: backscatter (speckle) level in dB relative to a perfect
            reflector, per sample; <= -80 means anechoic. Order of magnitude: a
            backscatter coefficient of ~1e-3 /(cm·sr) over a ~0.5 mm cell and a
            ~0.1 sr aperture gives ~-53 dB, so brain tissue interfaces (R ≈ -30 to
            -40 dB) stand out above the speckle as in real B-mode images.
        hu_range: (low, high) Hounsfield units, non-contrast CT.
        hu_mean: mean HU used by the CT model.
        hu_sd: standard deviation in HU (about a quarter of the range).
    """

    name: str
    c: float
    rho: float
    alpha: float
    scatter_db: float
    hu_range: tuple[float, float]
    hu_mean: float
    hu_sd: float

    @property
    def impedance(self) -> float:
        """Characteristic acoustic impedance Z = rho·c in MRayl (10^6 kg/(m^2·s))."""
        return self.rho * self.c / 1e6


def _t(name, c, rho, alpha, scatter_db, lo, hi, mean=None, sd=None) -> Tissue:
    mean = (lo + hi) / 2 if mean is None else mean
    sd = max((hi - lo) / 4, 1.0) if sd is None else sd
    return Tissue(name, c, rho, alpha, scatter_db, (lo, hi), mean, sd)


#: The tissue table (DESIGN.md "Pixel tier"). Brain tissues first, in the channel
#: order of :func:`tissue_posteriors`; geometric tissues after them.
TISSUES: dict[str, Tissue] = {
    # Duck 1990: CSF is water-like (c 1515 m/s, rho 1007, alpha ~0.002 dB/cm/MHz); HU 0-15.
    "csf": _t("csf", 1515.0, 1007.0, 0.002, -90.0, 0.0, 15.0),
    # Duck 1990 / ImFusion: cortex c 1560 m/s, rho 1047; HU 37-45.
    "grey_matter": _t("grey_matter", 1560.0, 1047.0, 0.6, -55.0, 37.0, 45.0),
    # Duck 1990 / ImFusion: white matter c 1550 m/s, rho 1024; HU 20-30.
    "white_matter": _t("white_matter", 1550.0, 1024.0, 0.6, -52.0, 20.0, 30.0),
    # Oedema: water-rich, lower c/alpha than parenchyma (ImFusion preset); HU 16-30.
    "oedema": _t("oedema", 1540.0, 1030.0, 0.4, -49.0, 16.0, 30.0),
    # Enhancing/solid tumour: c 1530-1570 (mid value), rho 1050; hyperechoic
    # (Unsgård 2006). HU 30-45 without contrast (70-90 with iodinated contrast).
    "enhancing": _t("enhancing", 1550.0, 1050.0, 0.7, -43.0, 30.0, 45.0),
    # Necrosis: liquefied, hypoechoic; HU 10-25.
    "necrosis": _t("necrosis", 1520.0, 1020.0, 0.3, -62.0, 10.0, 25.0),
    # Pichardo 2011: cortical skull c 2800-3600 m/s (mid 3100), rho 1900, alpha 7.8
    # dB/cm/MHz; HU 700-1900 (diploë low, inner/outer tables high).
    "skull": _t("skull", 3100.0, 1900.0, 7.8, -30.0, 700.0, 1900.0, mean=1300.0, sd=250.0),
    # Air at 20 °C: c 343 m/s, rho 1.2 -> Z = 412 Rayl (DiffUS uses 400 Rayl).
    "air": _t("air", 343.0, 1.2, 1.6, -90.0, -1000.0, -1000.0, mean=-1000.0, sd=5.0),
    # Scalp as generic soft tissue (Duck 1990: c 1540 m/s, rho 1050, ~0.75 dB/cm/MHz);
    # skin/muscle HU 20-60 (subcutaneous fat ignored). Only reached beyond the skull.
    "scalp": _t("scalp", 1540.0, 1050.0, 0.75, -48.0, 20.0, 60.0),
    # Coupling medium: 0.9 % saline at 37 °C (Duck 1990: c ~1534 m/s, rho ~1005,
    # alpha ~0.0022 dB/cm/MHz) -> Z ~ 1.54 MRayl; HU of water.
    "saline": _t("saline", 1534.0, 1005.0, 0.0022, -90.0, 0.0, 10.0, mean=5.0, sd=2.0),
}

TISSUE_NAMES: tuple[str, ...] = tuple(TISSUES)
#: classes inferred from MRI intensities (channels of :func:`tissue_posteriors`)
BRAIN_TISSUES: tuple[str, ...] = ("csf", "grey_matter", "white_matter", "oedema", "enhancing", "necrosis")
#: channels of :func:`head_posteriors`: brain tissues then geometric ones
HEAD_TISSUES: tuple[str, ...] = BRAIN_TISSUES + ("skull", "scalp", "air", "saline")


# ---------------------------------------------------------------------------------
# Image-only tissue posteriors
# ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TissueModel:
    """Diagonal-Gaussian contrast profiles of the brain tissues in z-score space.

    The MRI of a sample is z-scored per contrast over brain voxels (DESIGN.md, "The
    sample"), so the profile is a statement about *relative* brightness within the
    brain of each contrast (channel order T1, T1ce, T2, FLAIR):

    ============  =====  =====  =====  =====  ==========================================
    tissue        T1     T1ce   T2     FLAIR  reading
    ============  =====  =====  =====  =====  ==========================================
    csf           -1.8   -1.5   +2.5   -1.5   T2 very bright, FLAIR suppressed, T1 dark
    grey matter   -0.3   -0.2   +0.3   +0.3   intermediate, slightly darker T1 than WM
    white matter  +0.8   +0.6   -0.7   -0.3   T1 bright, T2/FLAIR dark
    oedema        -0.4   -0.2   +1.0   +1.7   FLAIR bright and T2 bright, no enhancement
    enhancing     -0.6   +2.5   +0.6   +1.2   T1ce bright (gadolinium uptake)
    necrosis      -1.6   -1.0   +2.0   +0.3   T1/T1ce dark core, T2 bright, FLAIR mixed
    ============  =====  =====  =====  =====  ==========================================

    Posteriors are ``softmax_k(log π_k + log N(x; μ_k, σ_k²) / temperature)``; the
    temperature > 1 softens them (partial volume). These profiles are assumptions
    about typical glioma MRI, not fitted values; :func:`trifuse.physics.ct.fit_ct_mixture`
    fits data-driven components for the CT model.

    Attributes:
        names: tissue names, length K.
        means: (K, 4) profile means in z-score units.
        sds: (K, 4) profile standard deviations in z-score units.
        priors: (K,) prior class fractions within the brain.
    """

    names: tuple[str, ...]
    means: tuple[tuple[float, ...], ...]
    sds: tuple[tuple[float, ...], ...]
    priors: tuple[float, ...]

    def tensors(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(means (K,4), sds (K,4), log_priors (K,))`` as tensors."""
        m = torch.tensor(self.means, device=device, dtype=dtype)
        s = torch.tensor(self.sds, device=device, dtype=dtype)
        p = torch.tensor(self.priors, device=device, dtype=dtype)
        return m, s, torch.log(p / p.sum())

    def log_likelihood_of(self, x: torch.Tensor) -> torch.Tensor:
        """Diagonal Gaussian log-likelihood ``(N, K)`` of profile vectors ``x`` (N, 4)."""
        m, s, _ = self.tensors(x.device, x.dtype)
        d = (x[:, None, :] - m[None]) / s[None]
        return -0.5 * (d**2).sum(-1) - torch.log(s).sum(-1)[None] - 0.5 * x.shape[-1] * math.log(2 * math.pi)


DEFAULT_TISSUE_MODEL = TissueModel(
    names=BRAIN_TISSUES,
    means=(
        (-1.8, -1.5, 2.5, -1.5),
        (-0.3, -0.2, 0.3, 0.3),
        (0.8, 0.6, -0.7, -0.3),
        (-0.4, -0.2, 1.0, 1.7),
        (-0.6, 2.5, 0.6, 1.2),
        (-1.6, -1.0, 2.0, 0.3),
    ),
    sds=(
        (0.6, 0.6, 0.8, 0.6),
        (0.5, 0.5, 0.5, 0.5),
        (0.5, 0.5, 0.5, 0.5),
        (0.6, 0.6, 0.6, 0.7),
        (0.7, 0.9, 0.6, 0.7),
        (0.6, 0.9, 0.6, 0.8),
    ),
    priors=(0.10, 0.40, 0.38, 0.06, 0.03, 0.03),
)


def voxel_chunk(device) -> int:
    """Voxels per chunk for per-voxel models (mixtures, MLPs) over flattened volumes.

    On CPU, 64 k-voxel chunks keep every intermediate in cache and below glibc's
    mmap threshold (no page faults from fresh multi-10-MB allocations): about 3×
    faster than one pass over a whole brain. GPUs prefer large chunks.
    """
    return 1 << 16 if torch.device(device).type == "cpu" else 1 << 21


def map_voxels(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply ``fn`` to chunks of the last (voxel) dimension of ``x`` and concatenate.

    A loop over a few dozen chunks, never over voxels; differentiable.
    """
    n = voxel_chunk(x.device)
    if x.shape[-1] <= n:
        return fn(x)
    return torch.cat([fn(c) for c in x.split(n, -1)], -1)


def _diag_quadratic_weights(model: TissueModel, temperature: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear weights over features [x², x] and bias giving the posterior logits.

    log π_k + log N(x; m_k, s_k²)/T = Σ_c (−x_c²/(2 s²) + x_c m/s²)/T + const_k.
    """
    m, s, logp = model.tensors(device, dtype)
    inv = 1.0 / s**2  # (K, C)
    w = torch.cat([-0.5 * inv, m * inv], 1) / temperature  # (K, 2C)
    b = logp - (0.5 * (m * m * inv).sum(1) + torch.log(s).sum(1)) / temperature  # (K,)
    return w, b


def tissue_logits_flat(x: torch.Tensor, model: TissueModel = DEFAULT_TISSUE_MODEL, temperature: float = 1.5) -> torch.Tensor:
    """Posterior logits ``(B, K, V)`` of flattened features ``x`` (B, C, V).

    One matrix product over the features [x², x] in channel-first layout: on CPU this
    is several times faster than a softmax/einsum over a trailing dimension of size K.
    """
    w, b = _diag_quadratic_weights(model, temperature, x.device, x.dtype)
    feats = torch.cat([x * x, x], 1)  # (B, 2C, V)
    return torch.matmul(w, feats) + b.view(1, -1, 1)


def tissue_posteriors(
    mri: torch.Tensor,
    brain: torch.Tensor,
    model: TissueModel = DEFAULT_TISSUE_MODEL,
    temperature: float = 1.5,
) -> torch.Tensor:
    """Soft brain-tissue posteriors from z-scored MRI, image-only.

    ``p_k(x) = softmax_k(log π_k + log N(x; μ_k, diag σ_k²) / temperature)``.

    Args:
        mri: (B, 4, D, H, W) or (4, D, H, W) float, z-scored per contrast over the
            brain, channel order :data:`trifuse.keys.MODALITIES`.
        brain: (B, 1, D, H, W) or (1, D, H, W) bool/float brain mask.
        model: contrast profiles (see :class:`TissueModel` for the assumed profile).
        temperature: divides the log-likelihood before the softmax (>1 = softer).

    Returns:
        (B, K, D, H, W) float posteriors over ``model.names`` (K = 6 by default),
        summing to 1 inside the brain and 0 outside. Unbatched input gives (K, D, H, W).
    """
    unbatched = mri.dim() == 4
    if unbatched:
        mri, brain = mri[None], brain[None]
    k, c = len(model.names), len(model.means[0])
    if mri.shape[1] != c:
        raise ValueError(f"mri has {mri.shape[1]} channels, the tissue model expects {c}")
    b = mri.shape[0]
    post = map_voxels(lambda x: torch.softmax(tissue_logits_flat(x, model, temperature), dim=1), mri.reshape(b, c, -1))
    post = post.reshape(b, k, *mri.shape[2:]) * brain.to(mri.dtype)
    return post[0] if unbatched else post


# ---------------------------------------------------------------------------------
# Geometric head layers around the (skull-stripped) brain
# ---------------------------------------------------------------------------------
def spacing_tensor(spacing, batch: int, device=None) -> torch.Tensor:
    """Normalise a spacing argument to a (B, 3) float32 tensor in mm (D, H, W order).

    Accepts 3 numbers, a (3,) / (B, 3) tensor, or a list of B triples.
    """
    t = torch.as_tensor(spacing, dtype=torch.float32, device=device)
    if t.dim() == 1:
        t = t.view(1, 3).expand(batch, 3)
    if t.shape != (batch, 3):
        raise ValueError(f"spacing must be 3 numbers or (B={batch}, 3), got shape {tuple(t.shape)}")
    return t


def _or_shifted(dst: torch.Tensor, src: torch.Tensor, dim: int) -> None:
    """dst |= src shifted by ±1 voxel along ``dim`` (in place: the max-pool of a binary mask)."""
    n = src.shape[dim]
    if n > 1:
        dst.narrow(dim, 1, n - 1).logical_or_(src.narrow(dim, 0, n - 1))
        dst.narrow(dim, 0, n - 1).logical_or_(src.narrow(dim, 1, n - 1))


def _dilation_levels(mask: torch.Tensor, spacing: Sequence[float], max_mm: float) -> tuple[torch.Tensor, float, int]:
    """Count, per voxel, the dilation steps it spent inside the growing mask.

    Returns:
        ``(count uint8, step_mm, n_steps)``: a voxel that joined at step i has
        count n_steps + 1 − i (mask voxels n_steps + 1, never reached 0). Counting
        with one in-place add per step keeps the op count minimal.
    """
    sp = [float(v) for v in spacing]
    step = min(sp)
    cur = mask.bool().clone()
    n = min(int(math.ceil(max_mm / step - 1e-6)), 250)
    count = cur.to(torch.uint8)
    for i in range(1, n + 1):  # loop over dilation steps (a few), never voxels
        axes = [a for a in range(3) if math.floor(i * step / sp[a] + 1e-6) > math.floor((i - 1) * step / sp[a] + 1e-6)]
        if i % 2 == 1:  # cross: union of 1-D dilations of the current mask
            new = cur.clone()
            for a in axes:
                _or_shifted(new, cur, a + 2)
        else:  # box: composition of 1-D dilations
            new = cur
            for a in axes:
                nxt = new.clone()
                _or_shifted(nxt, new, a + 2)
                new = nxt
        cur = new
        count.add_(cur)
    return count, step, n


def coarse_factors(spacing: Sequence[float], coarse_mm: float | None) -> tuple[int, int, int]:
    """Integer pooling factor per axis so the coarse voxel is about ``coarse_mm``."""
    if not coarse_mm:
        return (1, 1, 1)
    return tuple(max(1, int(round(coarse_mm / float(s)))) for s in spacing)


def downsample(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Average-pool a (B, C, D, H, W) tensor by integer factors.

    Trailing partial blocks (sizes not divisible by the factor) average their valid
    voxels only (``ceil_mode``, no padding copy).
    """
    if tuple(factors) == (1, 1, 1):
        return x
    return F.avg_pool3d(x, kernel_size=tuple(factors), stride=tuple(factors), ceil_mode=True)


def upsample(x: torch.Tensor, factors: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`downsample` by trilinear interpolation, cropped to ``shape``.

    Voxel centres line up: coarse voxel j sits at fine index (j + 0.5)·f − 0.5.
    """
    if tuple(factors) == (1, 1, 1):
        return x[..., : shape[0], : shape[1], : shape[2]]
    size = [n * f for n, f in zip(x.shape[2:], factors)]
    y = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
    return y[..., : shape[0], : shape[1], : shape[2]]


def coarse_distance_mm(mask: torch.Tensor, spacing: Sequence[float], max_mm: float, coarse_mm: float | None = 2.0
                       ) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Distance (mm) outside a mask on a grid pooled to about ``coarse_mm``.

    Returns:
        ``(distance (B, 1, d, h, w) float, pooling factors)``; beyond ``max_mm`` the
        distance is capped just above ``max_mm``. Upsample with :func:`upsample`.
    """
    fac = coarse_factors(spacing, coarse_mm)
    sp_c = [float(s) * f for s, f in zip(spacing, fac)]
    mask_c = downsample(mask.float(), fac) >= 0.5 if fac != (1, 1, 1) else mask.bool()
    count, step, n = _dilation_levels(mask_c, sp_c, max_mm + max(sp_c))
    # joined at step i = n + 1 - count; never reached (count 0) -> n + 1 steps (beyond)
    dist_c = (n + 1 - count.float()) * step
    if fac != (1, 1, 1):
        # coarse level 0 straddles the boundary: distances are to coarse-voxel centres
        dist_c = (dist_c - 0.5 * step).clamp_min(0)
    return dist_c, fac


def outside_distance_mm(mask: torch.Tensor, spacing: Sequence[float], max_mm: float, coarse_mm: float | None = 2.0) -> torch.Tensor:
    """Approximate Euclidean distance (mm) from a binary mask, by dilations.

    Alternating 6-connected ("cross") and 26-connected ("box") one-voxel dilations
    grow an octagonal ball, within about 8 % of the Euclidean distance; each step is a
    few shifted boolean ORs (the max-pool of a binary mask), so the cost is
    O(steps · voxels) with no Python loop over voxels. torch has no distance
    transform and scipy's would leave the device, hence this. The dilation runs on a
    grid pooled to about ``coarse_mm`` (8× fewer voxels at 1 mm) and the distance is
    trilinearly upsampled; skull and scalp are several mm thick, so the ~1 mm error
    is immaterial. Anisotropic spacing: an axis is dilated only when the accumulated
    radius reaches its next voxel.

    Args:
        mask: (B, 1, D, H, W) bool.
        spacing: voxel size in mm, (D, H, W) order.
        max_mm: stop growing at this distance.
        coarse_mm: working voxel size for the dilations (``None``: native grid).

    Returns:
        (B, 1, D, H, W) float32: 0 inside the mask, the distance in mm outside,
        ``inf`` beyond ``max_mm``.
    """
    dist_c, fac = coarse_distance_mm(mask, spacing, max_mm, coarse_mm)
    dist = upsample(dist_c, fac, mask.shape[2:]).masked_fill(mask.bool(), 0.0)
    return dist.masked_fill(dist > max_mm, float("inf"))


@dataclass(frozen=True)
class HeadConfig:
    """Thickness of the geometric layers placed around the brain mask (mm).

    The BraTS brain mask already contains most extra-axial CSF, so the CSF gap is
    thin. Adult skull thickness is about 5-8 mm (mean ~6.5 mm); scalp ~4-6 mm.
    Set a thickness to 0 to drop the layer.

    Attributes:
        csf_mm, skull_mm, scalp_mm: layer thicknesses.
        coarse_mm: voxel size of the grid the layer distances are computed on.
    """

    csf_mm: float = 1.0
    skull_mm: float = 6.5
    scalp_mm: float = 4.0
    coarse_mm: float | None = 2.0

    @property
    def total_mm(self) -> float:
        return self.csf_mm + self.skull_mm + self.scalp_mm


def head_layers(brain: torch.Tensor, spacing: Sequence[float], head: HeadConfig = HeadConfig()) -> dict[str, torch.Tensor]:
    """Masks of the geometric head layers around a skull-stripped brain.

    Args:
        brain: (B, 1, D, H, W) bool brain mask.
        spacing: voxel size in mm (D, H, W).
        head: layer thicknesses.

    Returns:
        dict with (B, 1, D, H, W) tensors: ``"distance"`` (mm outside the brain,
        float, inf far away), bool masks ``"csf"``, ``"skull"``, ``"scalp"``, ``"air"``,
        and ``"skull_depth"`` (float in [0, 1]: position across the skull thickness,
        0 at the inner table, 1 at the outer table; 0 elsewhere).
    """
    brain = brain.bool()
    d = outside_distance_mm(brain, spacing, head.total_mm, head.coarse_mm)
    g, s = head.csf_mm, head.skull_mm
    outside = ~brain
    csf = outside & (d <= g)
    skull = (d > g) & (d <= g + s)
    scalp = (d > g + s) & (d <= head.total_mm)
    air = torch.isinf(d)
    skull_depth = torch.where(skull, ((d - g) / max(s, 1e-6)).clamp(0, 1), torch.zeros_like(d))
    return {"distance": d, "csf": csf, "skull": skull, "scalp": scalp, "air": air, "skull_depth": skull_depth}


def head_posteriors(
    mri: torch.Tensor,
    brain: torch.Tensor,
    spacing: Sequence[float],
    head: HeadConfig = HeadConfig(),
    window: torch.Tensor | None = None,
    model: TissueModel = DEFAULT_TISSUE_MODEL,
    temperature: float = 1.5,
    layers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Posteriors over :data:`HEAD_TISSUES` for the whole field of view.

    Brain voxels get :func:`tissue_posteriors`; outside voxels get one-hot geometric
    tissues (thin CSF gap counted as ``csf``, skull, scalp, air), except inside the
    craniotomy ``window`` where everything outside the brain is coupling saline.

    Args:
        mri: (B, 4, D, H, W) z-scored MRI.
        brain: (B, 1, D, H, W) bool.
        spacing: voxel size in mm.
        head: layer thicknesses.
        window: optional (B, 1, D, H, W) bool craniotomy region (outside-brain voxels
            there become saline).
        model, temperature: see :func:`tissue_posteriors`.
        layers: precomputed :func:`head_layers` output (to share work with the CT).

    Returns:
        (B, 10, D, H, W) float posteriors summing to 1 everywhere.
    """
    brain = brain.bool()
    post = tissue_posteriors(mri, brain, model, temperature)
    lay = head_layers(brain, spacing, head) if layers is None else layers
    win = torch.zeros_like(brain) if window is None else (window.bool() & ~brain)
    dt = post.dtype
    csf = post[:, :1] + (lay["csf"] & ~win).to(dt)
    geo = [(lay["skull"] & ~win), (lay["scalp"] & ~win), (lay["air"] & ~win), win]
    return torch.cat([csf, post[:, 1:]] + [g.to(dt) for g in geo], dim=1)


def modality_index(name: str) -> int:
    """Channel index of a modality name in ``sample[MRI]`` (e.g. ``"flair"`` -> 3)."""
    return keys.MODALITIES.index(name)
