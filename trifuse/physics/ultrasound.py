"""Differentiable ray-based intra-operative brain ultrasound simulator.

Pipeline (DESIGN.md, "Pixel tier"), batched, vectorised over rays and voxels, one
code path for CPU and GPU:

1. **Probe placement** (:func:`place_probe`): by default a craniotomy on the brain
   surface nearest the centroid of FLAIR-abnormal voxels (FLAIR z > threshold), the
   beam axis pointing inward to that centroid. The face sits ``standoff_mm`` outside
   the brain, in saline. Outside-brain voxels near the face (a cone around the beam
   axis, :func:`craniotomy_window`) are the saline-filled craniotomy; everywhere else
   the brain is wrapped in CSF gap, skull, scalp and air
   (:func:`trifuse.physics.tissues.head_layers`).
2. **Acoustic maps** (:mod:`trifuse.physics.acoustic`): impedance Z (MRayl),
   attenuation α (dB/cm/MHz) and backscatter per voxel, learnable through θ_mapper.
3. **Rays** (:func:`ray_points`): a 3-D probe — a 2-D grid of rays over the face
   (lateral × elevation). ``"linear"``: parallel rays from a flat face imaging a
   rectangular slab. ``"sector"``: rays diverging from a virtual apex behind a
   convex face imaging a pyramidal fan. The maps are sampled along each ray with
   trilinear ``grid_sample``. Samples before a ray enters the volume are saline
   (the probe is never in air); after it leaves, air.
4. **Physics along each ray** (:func:`trace_rays`), single bounce: intensity
   reflection R_i = ((Z_i − Z_{i−1}) / (Z_i + Z_{i−1}))², one-way transmission
   T_i = Π_{j<i} (1 − R_j) (the cumulative product, evaluated as
   exp(cumsum(log(1 − R))) for stability and finite gradients), round-trip
   attenuation exp(−2 μ f z) with μ = α·ln(10)/10 the intensity coefficient
   (:func:`trifuse.physics.acoustic.db_to_intensity_nepers`) integrated along the
   path. Echo amplitude a_i = T_i · exp(−μ f z_i) · (r_i + √s_i · (√(1−κ²) + κ ξ_i)):
   a specular echo with the signed amplitude coefficient r_i = (Z_i − Z_{i−1}) /
   (Z_i + Z_{i−1}) (r² = R), plus tissue backscatter s_i times multiplicative speckle:
   ξ_i is a circular complex Gaussian, so |ξ| is Rayleigh distributed (κ = 1: fully
   developed speckle; J. W. Goodman, *Speckle Phenomena in Optics*, 2007); κ < 1
   (default 0.6) models a working voxel that spans several real speckle cells.
   Shadowing behind strong reflectors comes from T_i alone.
5. **PSF** (:func:`psf_blur`): the echo field is convolved with a separable Gaussian
   PSF (the envelope of the Gabor pulse axially, the beam profile laterally and in
   elevation), then detected as intensity |·|²: the convolution model of B-mode
   imaging (J. C. Bamber, R. J. Dickinson, "Ultrasonic B-scanning: a computer
   simulation", Phys. Med. Biol. 25:463, 1980). Speckle grain = PSF size.
6. **TGC and log compression**: gain exp(+2 g μ_ref f z) compensates a fraction g of
   the nominal brain attenuation (so depth darkening stays visible), then
   ``(10·log10(I) + gain + DR) / DR`` clipped to [0, 1].
7. **Scan conversion** (:func:`scan_convert`): each voxel of the field of view is
   mapped into probe coordinates (depth, lateral, elevation; or radius and two angles
   for the sector) and the ray image is sampled there (trilinear). The output is
   (B, 1, D, H, W) in [0, 1], zero outside the imaged slab/fan.

**Resolution and cost.** :func:`simulate_ultrasound` works on a grid of about
``ProbeConfig.resolution_mm`` (average-pooled MRI), cropped to the field of view's
bounding box; rays are one working voxel apart at full depth, samples one working
voxel apart along the ray; the result is scan-converted on the working grid and
trilinearly upsampled to the native grid (inside the field of view only). At the
default 2 mm this is ~8× cheaper than 1 mm (speckle grain ~2 mm); set
``resolution_mm=None`` to simulate at native resolution (figures, GPU). All steps are
differentiable with respect to the acoustic maps, hence θ_mapper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from trifuse import keys
from trifuse.physics.acoustic import AcousticMaps, ImpedanceMapper, db_to_intensity_nepers, geometry_labels
from trifuse.physics.tissues import TISSUES, HeadConfig, coarse_factors, downsample, head_layers, spacing_tensor, upsample

__all__ = [
    "ProbeConfig",
    "ProbeGeometry",
    "place_probe",
    "perturb_probe",
    "craniotomy_window",
    "fov_box",
    "ray_points",
    "sample_rays",
    "trace_rays",
    "psf_blur",
    "psf_samples",
    "log_compress",
    "ray_image",
    "scan_convert",
    "render_ultrasound",
    "simulate_fov",
    "simulate_ultrasound",
    "UltrasoundSimulator",
    "SALINE_IMPEDANCE",
]

#: coupling medium impedance, MRayl (0.9 % saline, Duck 1990)
SALINE_IMPEDANCE = TISSUES["saline"].impedance
AIR_IMPEDANCE = TISSUES["air"].impedance


@dataclass(frozen=True)
class ProbeConfig:
    """Probe and imaging settings.

    Positions are in mm in array-axis order (D, H, W), measured from the centre of
    voxel (0, 0, 0) of the (cropped) volume, i.e. ``index * spacing``.

    Attributes:
        geometry: ``"sector"`` (convex face, pyramidal fan; default, like the small
            craniotomy probes of intra-operative neuro-US) or ``"linear"`` (flat face,
            parallel rays, a slab).
        frequency_mhz: centre frequency; 7 MHz is typical for intra-operative
            cranial imaging down to ~8 cm.
        depth_mm: imaging depth from the face.
        width_mm: face extent, lateral (linear: slab width).
        elevation_mm: face extent, elevation (linear: slab thickness). The sector
            face is a spherical cap whose radius follows from ``width_mm`` and
            ``angle_deg``.
        angle_deg: sector opening, lateral.
        elevation_angle_deg: sector opening, elevation (3-D pyramid).
        resolution_mm: working voxel size of the simulation (see module docstring);
            ``None`` = native voxels; ``"psf"`` = chosen from the PSF (twice the lateral
            σ at this frequency, so that the PSF is at least half a sample wide on
            every axis and survives the sampling; :attr:`working_mm`).
        n_rays: (lateral, elevation) ray counts; ``None``: one working voxel apart at
            full depth, capped at ``max_rays``.
        samples_per_ray: samples along each ray; ``None``: one per working voxel.
        max_rays: cap per direction for automatic ray counts.
        centre_mm: probe face centre; ``None``: default craniotomy placement.
        direction: beam axis (normalised internally); ``None``: toward the target.
        target_mm: point to image; ``None``: the FLAIR-abnormal centroid.
        lateral: lateral axis hint; ``None``: the array axis most orthogonal to the beam.
        standoff_mm: face distance outside the brain surface (in saline).
        flair_threshold: z-score above which FLAIR counts as abnormal.
        window_margin_mm: craniotomy radius beyond the face footprint.
        window_depth_mm: how deep below the face the craniotomy opening reaches
            (skull thickness plus the gap to a curved brain surface).
        psf_sigma_mm: Gaussian PSF σ (axial, lateral, elevation) in mm at
            ``psf_reference_mhz``: axial ≈ the pulse envelope (~1.5 cycles), lateral ≈
            λ·F#, elevation worse (fixed elevation lens). Every term is proportional to
            the wavelength, so the PSF used is σ·f_ref/f (:attr:`psf_mm`).
        psf_reference_mhz: frequency at which ``psf_sigma_mm`` is given.
        speckle_contrast: κ in [0, 1], the random fraction of the scatter amplitude,
            √s·(√(1−κ²) + κ·ξ): κ = 1 is fully developed (Rayleigh) speckle of one
            resolution cell; a 1-2 mm working voxel spans several real speckle cells
            (~0.3 mm at 7 MHz), so its speckle is partially developed (Rician, lower
            contrast). The mean backscatter intensity is s for every κ.
        dynamic_range_db: log-compression display range.
        gain_db: overall display gain.
        tgc_fraction: fraction of the nominal attenuation that TGC compensates.
        tgc_alpha: nominal attenuation for TGC, dB/(cm·MHz).
    """

    geometry: str = "sector"
    frequency_mhz: float = 7.0
    depth_mm: float = 80.0
    width_mm: float = 24.0
    elevation_mm: float = 24.0
    angle_deg: float = 60.0
    elevation_angle_deg: float = 60.0
    resolution_mm: float | str | None = 2.0
    n_rays: tuple[int, int] | None = None
    samples_per_ray: int | None = None
    max_rays: int = 160
    centre_mm: tuple[float, float, float] | None = None
    direction: tuple[float, float, float] | None = None
    target_mm: tuple[float, float, float] | None = None
    lateral: tuple[float, float, float] | None = None
    standoff_mm: float = 1.0
    flair_threshold: float = 2.0
    window_margin_mm: float = 5.0
    window_depth_mm: float = 15.0
    psf_sigma_mm: tuple[float, float, float] = (0.4, 0.7, 1.2)
    psf_reference_mhz: float = 7.0
    speckle_contrast: float = 0.6
    dynamic_range_db: float = 60.0
    gain_db: float = 18.0
    tgc_fraction: float = 0.85
    tgc_alpha: float = 0.6

    def __post_init__(self):
        if self.geometry not in ("linear", "sector"):
            raise ValueError(f"probe geometry must be 'linear' or 'sector', got {self.geometry!r}")
        if self.depth_mm <= 0 or self.frequency_mhz <= 0:
            raise ValueError("probe depth_mm and frequency_mhz must be positive")
        if self.geometry == "sector" and not (0 < self.angle_deg < 180 and 0 < self.elevation_angle_deg < 180):
            raise ValueError("sector angles must lie in (0, 180) degrees")
        if isinstance(self.resolution_mm, str) and self.resolution_mm != "psf":
            raise ValueError(f"resolution_mm must be a number, None or 'psf', got {self.resolution_mm!r}")

    @property
    def psf_mm(self) -> tuple[float, float, float]:
        """PSF σ (axial, lateral, elevation) in mm at ``frequency_mhz`` (∝ wavelength)."""
        k = self.psf_reference_mhz / self.frequency_mhz
        return tuple(float(v) * k for v in self.psf_sigma_mm)

    @property
    def working_mm(self) -> float | None:
        """Working voxel size in mm (``None``: native): ``resolution_mm``, or 2 σ_lateral for ``"psf"``."""
        if isinstance(self.resolution_mm, str):
            return 2.0 * self.psf_mm[1]
        return self.resolution_mm

    @property
    def apex_offset_mm(self) -> float:
        """Sector: distance from the virtual apex to the face (radius of the convex face)."""
        return (self.width_mm / 2) / math.sin(math.radians(self.angle_deg) / 2)

    def resolve(self, spacing: Sequence[float]) -> tuple[int, int, int]:
        """Ray counts ``(n_lateral, n_elevation, samples_per_ray)`` for a working voxel size."""
        pitch = min(float(s) for s in spacing)
        # "psf": samples along the ray also from the (axial) PSF, so it survives the sampling
        ax_pitch = min(pitch, 2.0 * self.psf_mm[0]) if isinstance(self.resolution_mm, str) else pitch
        nd = self.samples_per_ray or int(math.ceil(self.depth_mm / ax_pitch)) + 1
        if self.n_rays is not None:
            return int(self.n_rays[0]), int(self.n_rays[1]), int(nd)
        if self.geometry == "linear":
            extents = (self.width_mm, self.elevation_mm)
        else:
            r = self.apex_offset_mm + self.depth_mm
            extents = (r * math.radians(self.angle_deg), r * math.radians(self.elevation_angle_deg))
        nl, ne = (min(self.max_rays, int(math.ceil(e / pitch)) + 1) for e in extents)
        return nl, ne, int(nd)


@dataclass
class ProbeGeometry:
    """Resolved probe pose per batch item, in mm of the volume frame.

    Attributes:
        origin: (B, 3) face centre (D, H, W order).
        axes: (B, 3, 3) orthonormal rows: axial (beam), lateral, elevation.
        target: (B, 3) imaged point.
    """

    origin: torch.Tensor
    axes: torch.Tensor
    target: torch.Tensor

    def item(self, i: int) -> dict:
        """JSON-friendly record of item ``i`` (for ``meta["applied"]``)."""
        r = lambda t: [round(float(v), 3) for v in t]  # noqa: E731
        return {"centre_mm": r(self.origin[i]), "direction": r(self.axes[i, 0]), "lateral": r(self.axes[i, 1]),
                "target_mm": r(self.target[i])}

    def select(self, i: int) -> "ProbeGeometry":
        """Item ``i`` as a batch of one."""
        return ProbeGeometry(self.origin[i : i + 1], self.axes[i : i + 1], self.target[i : i + 1])


# ---------------------------------------------------------------------------------
# Grid helpers. A grid is (shape, spacing (B, 3), offset (B, 3)): voxel j of the grid
# sits at offset + j * spacing mm of the volume frame (crops and pooled grids).
# ---------------------------------------------------------------------------------
def _coords_mm(shape: Sequence[int], spacing: torch.Tensor, offset: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-axis voxel-centre coordinates, each (B, n_axis) in mm."""
    out = []
    for a, n in enumerate(shape):
        c = torch.arange(n, device=spacing.device, dtype=torch.float32)[None] * spacing[:, a : a + 1]
        out.append(c if offset is None else c + offset[:, a : a + 1])
    return out


def _masked_centroid(mask: torch.Tensor, cs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid in mm (B, 3) of a (B, D, H, W) bool mask, and its voxel count (B,)."""
    m = mask.float()
    n = m.sum((1, 2, 3))
    cen = torch.stack(
        [(m.sum((2, 3)) * cs[0]).sum(1), (m.sum((1, 3)) * cs[1]).sum(1), (m.sum((1, 2)) * cs[2]).sum(1)], 1
    ) / n.clamp_min(1)[:, None]
    return cen, n


def _frame(direction: torch.Tensor, lateral_hint: torch.Tensor | None) -> torch.Tensor:
    """Orthonormal (B, 3, 3) rows (axial, lateral, elevation) from a beam direction."""
    ax = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-8)
    if lateral_hint is None:
        eye = torch.eye(3, device=ax.device, dtype=ax.dtype)
        hint = eye[ax.abs().argmin(1)]  # the array axis least aligned with the beam
    else:
        hint = lateral_hint.to(ax).expand_as(ax)
    lat = hint - (hint * ax).sum(1, keepdim=True) * ax
    lat = lat / lat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    el = torch.cross(ax, lat, dim=1)
    return torch.stack([ax, lat, el], 1)


def _surface(brain: torch.Tensor) -> torch.Tensor:
    """Brain voxels with a non-brain 6-neighbour; outside the volume counts as non-brain."""
    p = F.pad(brain.to(torch.uint8), (1, 1, 1, 1, 1, 1)).bool()
    c = p[:, 1:-1, 1:-1, 1:-1]
    inner = c & p[:, 2:, 1:-1, 1:-1] & p[:, :-2, 1:-1, 1:-1] & p[:, 1:-1, 2:, 1:-1] & p[:, 1:-1, :-2, 1:-1] \
        & p[:, 1:-1, 1:-1, 2:] & p[:, 1:-1, 1:-1, :-2]
    return c & ~inner


def _pool_mri(mri: torch.Tensor, brain: torch.Tensor, fac: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool MRI over brain voxels only (no dilution by the zero background)."""
    if tuple(fac) == (1, 1, 1):
        return mri, brain.bool()
    w = downsample(brain.to(mri.dtype), fac)
    # the sample contract has MRI = 0 outside the brain, so pooling MRI and dividing by
    # the pooled mask averages brain voxels only
    m = downsample(mri, fac) / w.clamp_min(1e-6)
    return m, w >= 0.5


def place_probe(mri: torch.Tensor, brain: torch.Tensor, spacing: torch.Tensor, config: ProbeConfig = ProbeConfig(),
                coarse_mm: float | None = 2.0) -> ProbeGeometry:
    """Resolve the probe pose for each batch item.

    Default (nothing fixed in ``config``): target = centroid of brain voxels with
    FLAIR z > ``flair_threshold`` (the brain centroid if fewer than 10 such voxels);
    face centre = the brain-surface voxel nearest the target, moved ``standoff_mm``
    outward; the beam points from there to the target. Brain voxels on the volume
    border count as surface, so a patch cut from inside the brain is imaged from its
    border. Runs on a grid subsampled to about ``coarse_mm`` (placement to ~1 mm).

    Args:
        mri: (B, 4, D, H, W) z-scored MRI.
        brain: (B, 1, D, H, W) bool.
        spacing: (B, 3) mm.
        config: probe settings; fixed ``centre_mm``/``direction``/``target_mm`` win.
        coarse_mm: working voxel size for the search.

    Returns:
        :class:`ProbeGeometry` in the volume frame.
    """
    b = mri.shape[0]
    dev = mri.device
    # a strided subsample (no copy of the full volume) is precise enough to place a probe
    fac = coarse_factors(spacing[0].tolist(), coarse_mm)
    sub = (slice(None), slice(None, None, fac[0]), slice(None, None, fac[1]), slice(None, None, fac[2]))
    br = brain[:, 0].bool()[sub]
    flair = mri[:, keys.FLAIR][sub]
    sp = spacing * torch.tensor(fac, device=dev, dtype=spacing.dtype)
    cs = _coords_mm(br.shape[1:], sp)
    t_brain, _ = _masked_centroid(br, cs)
    if config.target_mm is not None:
        target = torch.tensor(config.target_mm, device=dev, dtype=torch.float32).expand(b, 3)
    else:
        t_abn, n_abn = _masked_centroid(br & (flair > config.flair_threshold), cs)
        target = torch.where((n_abn >= 10)[:, None], t_abn, t_brain)
    if config.centre_mm is not None:
        surface_pt = torch.tensor(config.centre_mm, device=dev, dtype=torch.float32).expand(b, 3)
    else:
        d2 = ((cs[0] - target[:, 0:1]) ** 2)[:, :, None, None] + ((cs[1] - target[:, 1:2]) ** 2)[:, None, :, None] \
            + ((cs[2] - target[:, 2:3]) ** 2)[:, None, None, :]
        d2 = d2.masked_fill(~_surface(br), float("inf"))
        flat = d2.flatten(1).argmin(1)
        dims = br.shape[1:]
        idx = torch.stack([flat // (dims[1] * dims[2]), (flat // dims[2]) % dims[1], flat % dims[2]], 1)
        surface_pt = idx.float() * sp
    if config.direction is not None:
        direction = torch.tensor(config.direction, device=dev, dtype=torch.float32).expand(b, 3)
    else:
        direction = target - surface_pt
        # target on the surface itself: point toward the brain centroid instead
        small = direction.norm(dim=1, keepdim=True) < 1e-3
        direction = torch.where(small, t_brain - surface_pt, direction)
        small = direction.norm(dim=1, keepdim=True) < 1e-3
        direction = torch.where(small, torch.tensor([1.0, 0.0, 0.0], device=dev).expand(b, 3), direction)
    hint = None if config.lateral is None else torch.tensor(config.lateral, device=dev, dtype=torch.float32)[None]
    axes = _frame(direction.float(), hint)
    if config.centre_mm is not None:
        origin = surface_pt
    else:
        # refine on the native grid: walk outward from the (coarse) surface voxel to the
        # first point outside the brain (or the volume), then add the standoff
        step = 0.5 * float(spacing.min())
        # long enough to leave the volume from any voxel (beyond the volume counts as outside)
        extent = float((torch.tensor(brain.shape[2:], dtype=torch.float32) * spacing[0].cpu()).norm())
        n_steps = int(math.ceil(max(2 * max(float(f) * float(sv) for f, sv in zip(fac, spacing[0])), extent) / step)) + 2
        k = torch.arange(n_steps, device=dev, dtype=torch.float32)
        pts = surface_pt[:, None] - k[None, :, None] * step * axes[:, None, 0]  # (B, K, 3)
        idx = torch.round(pts / spacing[:, None]).long()
        dims = torch.tensor(brain.shape[2:], device=dev)
        inside_vol = ((idx >= 0) & (idx < dims)).all(-1)
        idx = torch.minimum(idx.clamp_min(0), dims - 1)
        bi = torch.arange(b, device=dev)[:, None].expand_as(idx[..., 0])
        in_brain = brain[bi, 0, idx[..., 0], idx[..., 1], idx[..., 2]] & inside_vol
        out_of_brain = ~in_brain
        # first step outside; a walk that never leaves the brain (argmax of all-False is
        # 0, the surface voxel itself) falls back to its last step
        first_out = torch.where(out_of_brain.any(1), out_of_brain.float().argmax(1), torch.full_like(out_of_brain[:, 0], n_steps - 1, dtype=torch.long))
        edge = pts[torch.arange(b, device=dev), first_out]
        origin = edge - config.standoff_mm * axes[:, 0]
    return ProbeGeometry(origin.float(), axes, target.float())


def perturb_probe(geom: ProbeGeometry, tilt_deg: torch.Tensor, azimuth_rad: torch.Tensor, shift_mm: torch.Tensor) -> ProbeGeometry:
    """Tilt and slide a probe (random placement, as a hand-held probe moves).

    Args:
        geom: pose to perturb.
        tilt_deg: (B,) tilt of the beam axis away from its direction.
        azimuth_rad: (B,) direction of the tilt in the lateral/elevation plane.
        shift_mm: (B, 2) face shift along the lateral and elevation axes.

    Returns:
        A new :class:`ProbeGeometry` (same target).
    """
    ax, la, el = geom.axes[:, 0], geom.axes[:, 1], geom.axes[:, 2]
    t = torch.deg2rad(tilt_deg.to(ax))[:, None]
    perp = torch.cos(azimuth_rad.to(ax))[:, None] * la + torch.sin(azimuth_rad.to(ax))[:, None] * el
    new_ax = torch.cos(t) * ax + torch.sin(t) * perp
    origin = geom.origin + shift_mm[:, 0:1].to(ax) * la + shift_mm[:, 1:2].to(ax) * el
    # keep the lateral axis as close as possible to the old one
    lat = la - (la * new_ax).sum(1, keepdim=True) * new_ax
    lat = lat / lat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    axes = torch.stack([new_ax, lat, torch.cross(new_ax, lat, dim=1)], 1)
    return ProbeGeometry(origin, axes, geom.target)


def _probe_coords(shape: Sequence[int], spacing: torch.Tensor, offset: torch.Tensor, axes: torch.Tensor, point: torch.Tensor) -> list[torch.Tensor]:
    """Coordinates (B, D, H, W) of every voxel along the probe axes, relative to ``point`` (B, 3)."""
    cs = _coords_mm(shape, spacing, offset)
    out = []
    for r in range(3):
        e = axes[:, r]  # (B, 3)
        comps = [(cs[a] - point[:, a : a + 1]) * e[:, a : a + 1] for a in range(3)]
        out.append(comps[0][:, :, None, None] + comps[1][:, None, :, None] + comps[2][:, None, None, :])
    return out


def craniotomy_window(shape: Sequence[int], spacing: torch.Tensor, geom: ProbeGeometry, config: ProbeConfig,
                      offset: torch.Tensor | None = None) -> torch.Tensor:
    """Craniotomy region: a cone around the beam axis, from behind the face to ``window_depth_mm``.

    Its radius is the face half-diagonal plus ``window_margin_mm`` at the face and
    widens with the fan half-angle for sector probes. Only voxels outside the brain
    are affected by it (they become saline: bone removed, cavity irrigated).

    Returns:
        (B, 1, D, H, W) bool.
    """
    offset = torch.zeros_like(spacing) if offset is None else offset
    u, v, w = _probe_coords(shape, spacing, offset, geom.axes, geom.origin)
    r0 = math.hypot(config.width_mm / 2, config.elevation_mm / 2) + config.window_margin_mm
    slope = 0.0 if config.geometry == "linear" else math.tan(math.radians(max(config.angle_deg, config.elevation_angle_deg) / 2))
    back = config.apex_offset_mm if config.geometry == "sector" else 0.0
    radius = r0 + slope * u.clamp_min(0)
    win = (u >= -back - 2.0) & (u <= config.window_depth_mm) & (v * v + w * w <= radius * radius)
    return win[:, None]


# ---------------------------------------------------------------------------------
# Rays
# ---------------------------------------------------------------------------------
def _ray_params(config: ProbeConfig, nl: int, ne: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if config.geometry == "linear":
        lat = torch.linspace(-config.width_mm / 2, config.width_mm / 2, nl, device=device)
        el = torch.linspace(-config.elevation_mm / 2, config.elevation_mm / 2, ne, device=device)
    else:
        lat = torch.linspace(-1, 1, nl, device=device) * math.radians(config.angle_deg) / 2
        el = torch.linspace(-1, 1, ne, device=device) * math.radians(config.elevation_angle_deg) / 2
    return lat, el


def ray_points(geom: ProbeGeometry, config: ProbeConfig, nl: int, ne: int, nd: int) -> torch.Tensor:
    """Sample positions of all rays.

    Returns:
        (B, Ne, Nl, Nd, 3) positions in mm (volume frame, D, H, W order); sample k of
        a ray is k·depth/(Nd−1) mm from the face along the ray.
    """
    dev = geom.origin.device
    lat, el = _ray_params(config, nl, ne, dev)
    t = torch.linspace(0, config.depth_mm, nd, device=dev)
    ax, la, ev = geom.axes[:, 0], geom.axes[:, 1], geom.axes[:, 2]  # (B, 3)
    v = lambda e: e[:, None, None, None, :]  # noqa: E731  (B,1,1,1,3)
    if config.geometry == "linear":
        start = geom.origin[:, None, None, None, :] + lat[None, None, :, None, None] * v(la) + el[None, :, None, None, None] * v(ev)
        return start + t[None, None, None, :, None] * v(ax)
    a = config.apex_offset_mm
    apex = geom.origin - a * ax  # (B, 3)
    d = v(ax) + torch.tan(lat)[None, None, :, None, None] * v(la) + torch.tan(el)[None, :, None, None, None] * v(ev)
    d = d / d.norm(dim=-1, keepdim=True)  # (B, Ne, Nl, 1, 3)
    return apex[:, None, None, None, :] + (a + t)[None, None, None, :, None] * d


def fov_box(geom: ProbeGeometry, config: ProbeConfig, shape: Sequence[int], spacing: torch.Tensor,
            offset: torch.Tensor | None = None, margin: int = 2) -> list[list[list[int]]]:
    """Voxel bounding box of the field of view per item, clipped to the grid.

    Every ray is a straight segment, so the box of the segments' end points over a
    17×17 subset of rays bounds the fan (``margin`` voxels cover the far cap's bulge
    between subset rays).

    Returns:
        per item ``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open; empty if d0 >= d1).
    """
    pts = ray_points(geom, config, 17, 17, 2)  # (B, 17, 17, 2, 3)
    offset = torch.zeros_like(spacing) if offset is None else offset
    idx = (pts.flatten(1, 3) - offset[:, None]) / spacing[:, None]  # (B, N, 3)
    lo = torch.floor(idx.min(1).values).long() - margin
    hi = torch.ceil(idx.max(1).values).long() + margin + 1
    boxes = []
    for i in range(len(lo)):
        boxes.append([[max(0, int(lo[i, a])), min(int(shape[a]), max(0, int(hi[i, a])))] for a in range(3)])
    return boxes


def _to_grid(points_mm: torch.Tensor, spacing: torch.Tensor, offset: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """mm (B, …, 3) in (D, H, W) order -> grid_sample coordinates (…, 3) in (x=W, y=H, z=D) order."""
    b = points_mm.shape[0]
    size = torch.tensor([max(n - 1, 1) for n in shape], device=points_mm.device, dtype=points_mm.dtype)
    view = (b,) + (1,) * (points_mm.dim() - 2) + (3,)
    g = 2 * (points_mm - offset.view(view)) / (spacing.view(view) * size) - 1
    return g.flip(-1)


def sample_rays(maps: torch.Tensor, points_mm: torch.Tensor, spacing: torch.Tensor, offset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear samples of voxel maps along rays.

    Args:
        maps: (B, C, D, H, W) on a grid with voxel size ``spacing`` (B, 3) and voxel
            (0,0,0) at ``offset`` (B, 3) mm (default 0).
        points_mm: (B, Ne, Nl, Nd, 3) from :func:`ray_points`.

    Returns:
        ``(values (B, C, Ne, Nl, Nd), inside (B, Ne, Nl, Nd) bool)``.
    """
    offset = torch.zeros_like(spacing) if offset is None else offset
    grid = _to_grid(points_mm, spacing, offset, maps.shape[2:]).to(maps.dtype)
    # one channel at a time: torch's CPU grid_sample is several times slower per
    # channel for C > 1 than for C = 1
    vals = torch.cat([F.grid_sample(maps[:, c : c + 1], grid, mode="bilinear", padding_mode="border", align_corners=True)
                      for c in range(maps.shape[1])], 1)
    inside = (grid.abs() <= 1.0 + 1e-6).all(-1)
    return vals, inside


def trace_rays(
    impedance: torch.Tensor,
    attenuation: torch.Tensor,
    scatter: torch.Tensor,
    dz_mm: float,
    frequency_mhz: float,
    z0: float = SALINE_IMPEDANCE,
) -> dict[str, torch.Tensor]:
    """Single-bounce echo physics along rays (last dimension = depth).

    Args:
        impedance: (..., N) Z in MRayl at each sample.
        attenuation: (..., N) α in dB/(cm·MHz).
        scatter: (..., N) backscatter intensity (linear).
        dz_mm: sample spacing along the ray in mm.
        frequency_mhz: centre frequency f.
        z0: impedance in front of the first sample (coupling medium).

    Returns:
        dict of (..., N) tensors: ``reflection`` R_i = ((Z_i−Z_{i−1})/(Z_i+Z_{i−1}))²,
        ``r`` the signed amplitude coefficient, ``transmission`` the one-way intensity
        transmission T_i = Π_{j<i}(1−R_j), ``attenuation`` the round-trip intensity
        factor exp(−2 μ f z_i) (μ = α·ln10/10 per cm·MHz, path-integrated with the
        midpoint rule), ``amplitude`` = T_i·exp(−μ f z_i) the round-trip amplitude
        factor, ``echo`` = R_i·T_i²·exp(−2μ f z_i) the interface echo intensity and
        ``scatter`` = s_i·T_i²·exp(−2μ f z_i) the mean backscatter intensity.
    """
    zp = torch.cat([torch.full_like(impedance[..., :1], z0), impedance[..., :-1]], -1)
    r = (impedance - zp) / (impedance + zp).clamp_min(1e-12)
    refl = r * r
    # Π_{j<i}(1−R_j) as exp of an exclusive cumulative sum of log(1−R): the same cumprod,
    # but stable when factors are close to 0 (air) and with finite gradients.
    log_t = torch.log1p(-refl.clamp(max=1 - 1e-7))
    log_trans = torch.cumsum(log_t, -1) - log_t
    mu = db_to_intensity_nepers(attenuation) * frequency_mhz  # 1/cm, intensity
    dz_cm = dz_mm / 10.0
    path = (torch.cumsum(mu, -1) - 0.5 * mu) * dz_cm  # ∫_0^{z_i} μ f dz' (midpoint rule)
    log_amp = log_trans - path  # log(T_i · exp(−μ f z_i))
    amp = torch.exp(log_amp)
    amp2 = amp * amp
    return {
        "r": r,
        "reflection": refl,
        "transmission": torch.exp(log_trans),
        "attenuation": torch.exp(-2 * path),
        "amplitude": amp,
        "echo": refl * amp2,
        "scatter": scatter * amp2,
    }


def _gauss_kernel(sigma: float) -> list[float] | None:
    if sigma < 0.3:
        return None
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-r, r + 1)]
    s = sum(k)
    return [v / s for v in k]


def _blur_axis(x: torch.Tensor, k: list[float], dim: int) -> torch.Tensor:
    """1-D convolution along ``dim`` as a sum of shifted slices, renormalised at the edges.

    A handful of taps as in-place multiply-adds is several times faster on CPU than a
    depthwise conv3d (and the same on GPU). At the ends the missing taps are dropped
    and the result divided by the weights that remain (normalised convolution), so a
    constant stays constant up to the edge.
    """
    r = len(k) // 2
    n = x.shape[dim]
    out = x * k[r]
    wsum = torch.full((n,), k[r], device=x.device, dtype=x.dtype)
    for j in range(1, min(r, n - 1) + 1):
        out.narrow(dim, j, n - j).add_(x.narrow(dim, 0, n - j), alpha=k[r - j])
        out.narrow(dim, 0, n - j).add_(x.narrow(dim, j, n - j), alpha=k[r + j])
        wsum[j:] += k[r - j]
        wsum[: n - j] += k[r + j]
    shape = [1] * x.dim()
    shape[dim] = n
    return out / wsum.view(shape)


def psf_blur(field: torch.Tensor, sigmas: Sequence[float]) -> tuple[torch.Tensor, float]:
    """Separable Gaussian PSF over the last three dims (elevation, lateral, axial).

    Args:
        field: (B, C, Ne, Nl, Nd) (C = 2: real and imaginary echo field).
        sigmas: σ in samples for (elevation, lateral, axial); < 0.3 skips an axis.

    Returns:
        ``(blurred field, energy)``: kernels sum to 1 (a flat specular interface keeps
        its amplitude) and ``energy`` = Σ k² of the 3-D kernel, the factor by which
        incoherent (speckle) intensity is reduced.
    """
    energy = 1.0
    for dim, s in zip((2, 3, 4), sigmas):
        k = _gauss_kernel(float(s))
        if k is None or field.shape[dim] < 2:
            continue
        energy *= sum(v * v for v in k)
        field = _blur_axis(field, k, dim)
    return field, energy


def psf_energy(sigmas: Sequence[float]) -> float:
    """Σ k² of the separable PSF of :func:`psf_blur` (1 where no axis is blurred)."""
    e = 1.0
    for s in sigmas:
        k = _gauss_kernel(float(s))
        e *= 1.0 if k is None else sum(v * v for v in k)
    return e


def psf_samples(config: ProbeConfig, nl: int, ne: int, nd: int) -> tuple[float, float, float]:
    """PSF σ in ray samples (elevation, lateral, axial) for ``(nl, ne, nd)`` rays and samples.

    The lateral/elevation pitch is taken at mid-depth (sector rays diverge). Values
    below 0.5 mean the PSF is finer than the sampling (:func:`ray_image` floors them at
    half a sample); ``ProbeConfig(resolution_mm="psf")`` picks the pitch so none is.
    """
    dz = config.depth_mm / max(nd - 1, 1)
    if config.geometry == "linear":
        pl, pe = config.width_mm / max(nl - 1, 1), config.elevation_mm / max(ne - 1, 1)
    else:
        rm = config.apex_offset_mm + config.depth_mm / 2
        pl = rm * math.radians(config.angle_deg) / max(nl - 1, 1)
        pe = rm * math.radians(config.elevation_angle_deg) / max(ne - 1, 1)
    psf = config.psf_mm  # mm at this frequency
    return psf[2] / pe, psf[1] / pl, psf[0] / dz


def log_compress(intensity: torch.Tensor, dynamic_range_db: float, gain_db: float = 0.0) -> torch.Tensor:
    """Map echo intensity (1 = perfect reflector at the face) to [0, 1] on a dB scale."""
    db = 10.0 * torch.log10(intensity.clamp_min(1e-30)) + gain_db
    return ((db + dynamic_range_db) / dynamic_range_db).clamp(0.0, 1.0)


def _speckle(shape: Sequence[int], seeds: Sequence[int], device, dtype) -> torch.Tensor:
    """(B, 2, *shape) circular complex Gaussian noise (E|ξ|² = 1), one seed per item.

    One generator per batch item, so a batch reproduces per-case results exactly.
    """
    out = []
    for s in seeds:  # loop over batch items, not voxels
        g = torch.Generator(device=device).manual_seed(int(s))
        out.append(torch.randn((2, *shape), generator=g, device=device, dtype=dtype) * math.sqrt(0.5))
    return torch.stack(out)


def ray_image(
    maps: torch.Tensor,
    spacing: torch.Tensor,
    geom: ProbeGeometry,
    config: ProbeConfig,
    seeds: Sequence[int],
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """B-mode image in ray space (steps 3–6 of the module docstring).

    Args:
        maps: (B, 3, D, H, W) impedance (MRayl), attenuation (dB/cm/MHz), backscatter.
        spacing: (B, 3) voxel size of the maps' grid (mm); also sets the ray pitch.
        geom: probe pose (volume frame).
        config: probe settings.
        seeds: speckle seed per item.
        offset: (B, 3) position of the maps' voxel (0, 0, 0) in the volume frame.

    Returns:
        ``(image (B, 1, Ne, Nl, Nd) in [0, 1], rays)`` with the :func:`trace_rays`
        dict, ``"intensity"`` (pre-log, after TGC) and ``"n_rays"`` in ``rays``.
    """
    b = maps.shape[0]
    if len(seeds) != b:
        raise ValueError(f"need one speckle seed per batch item: {len(seeds)} seeds for batch {b}")
    nl, ne, nd = config.resolve(spacing[0].tolist())
    pts = ray_points(geom, config, nl, ne, nd)
    vals, inside = sample_rays(maps, pts, spacing, offset)
    # before a ray enters the volume: coupling saline; after it leaves: air
    entered = torch.cummax(inside.to(torch.uint8), -1).values.bool()
    before, after = ~entered, entered & ~inside
    sal, air = TISSUES["saline"], TISSUES["air"]
    z = vals[:, 0].masked_fill(before, sal.impedance).masked_fill(after, air.impedance)
    alpha = vals[:, 1].masked_fill(before, sal.alpha).masked_fill(after, air.alpha)
    sc = vals[:, 2].masked_fill(~inside, 0.0).clamp_min(0.0)
    dz = config.depth_mm / (nd - 1)
    tr = trace_rays(z, alpha, sc, dz, config.frequency_mhz)
    # at least half a sample: the sampled echo field must be band-limited (otherwise a
    # partial-volume ramp over two samples would alias into two weak echoes instead of
    # adding coherently into one)
    sig = tuple(max(v, 0.5) for v in psf_samples(config, nl, ne, nd))
    energy = psf_energy(sig)
    xi = _speckle(tr["amplitude"].shape[1:], seeds, maps.device, maps.dtype)
    # echo field: specular r_i plus backscatter √s_i·(√(1−κ²) + κ·ξ_i), the random part
    # pre-scaled by 1/√energy so that its mean intensity after the PSF is κ²·s_i
    # whatever the PSF size (the coherent parts keep their amplitude: kernels sum to 1)
    a = tr["amplitude"][:, None]
    kappa = float(config.speckle_contrast)
    # √s with a zero-safe gradient (d√s/ds is infinite at s = 0: the anechoic saline and air)
    root_s = torch.where(sc > 0, torch.sqrt(sc.clamp_min(1e-30)), torch.zeros_like(sc))[:, None]
    field = (a * root_s * (kappa / math.sqrt(energy))) * xi
    coherent = a * (tr["r"][:, None] + math.sqrt(max(1.0 - kappa * kappa, 0.0)) * root_s)
    field = field + torch.cat([coherent, torch.zeros_like(a)], 1)
    field, _ = psf_blur(field, sig)
    intensity = (field * field).sum(1, keepdim=True)
    t_cm = torch.linspace(0, config.depth_mm / 10, nd, device=maps.device, dtype=maps.dtype)
    mu_ref = db_to_intensity_nepers(config.tgc_alpha) * config.frequency_mhz
    intensity = intensity * torch.exp(2 * config.tgc_fraction * mu_ref * t_cm)
    img = log_compress(intensity, config.dynamic_range_db, config.gain_db)
    return img, dict(tr, intensity=intensity, inside=inside, n_rays=(nl, ne, nd))


def scan_convert(image: torch.Tensor, shape: Sequence[int], spacing: torch.Tensor, geom: ProbeGeometry, config: ProbeConfig,
                 offset: torch.Tensor | None = None) -> torch.Tensor:
    """Resample a ray image onto a voxel grid.

    Args:
        image: (B, C, Ne, Nl, Nd) ray-space image.
        shape: (D, H, W) of the target grid.
        spacing: (B, 3) its voxel size (mm).
        geom, config: the probe.
        offset: (B, 3) position of its voxel (0, 0, 0) in the volume frame.

    Returns:
        (B, C, D, H, W); zero outside the imaged slab/fan (the zero padding of
        ``grid_sample``; a half-sample fade at the edges).
    """
    offset = torch.zeros_like(spacing) if offset is None else offset
    if config.geometry == "linear":
        u, v, w = _probe_coords(shape, spacing, offset, geom.axes, geom.origin)
        gx = u * (2 / config.depth_mm) - 1
        gy = v * (2 / config.width_mm)
        gz = w * (2 / config.elevation_mm)
    else:
        a = config.apex_offset_mm
        apex = geom.origin - a * geom.axes[:, 0]
        u, v, w = _probe_coords(shape, spacing, offset, geom.axes, apex)
        r = torch.sqrt(u * u + v * v + w * w)
        gx = (r - a) * (2 / config.depth_mm) - 1
        gx = gx.masked_fill(u <= 0, 3.0)  # behind the apex: outside
        gy = torch.atan2(v, u) * (2 / math.radians(config.angle_deg))
        gz = torch.atan2(w, u) * (2 / math.radians(config.elevation_angle_deg))
    grid = torch.stack([gx, gy, gz], -1).to(image.dtype)  # (B, D, H, W, 3): x->Nd, y->Nl, z->Ne
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def render_ultrasound(
    maps: AcousticMaps | torch.Tensor,
    spacing: torch.Tensor,
    geom: ProbeGeometry,
    config: ProbeConfig = ProbeConfig(),
    seeds: Sequence[int] = (0,),
    return_rays: bool = False,
):
    """Simulate B-mode ultrasound from acoustic maps on their own grid (functional core).

    No cropping or resampling: rays are spaced by the maps' voxel size and the image
    is scan-converted back onto the maps' grid. :func:`simulate_ultrasound` adds the
    MRI → maps step, the head model, the working resolution and field-of-view crop.

    Args:
        maps: :class:`AcousticMaps` or (B, 3, D, H, W) stacked impedance (MRayl),
            attenuation (dB/cm/MHz), backscatter (linear).
        spacing: (B, 3) voxel size in mm.
        geom: probe pose per item.
        config: probe settings (``resolution_mm`` is ignored here).
        seeds: one speckle seed per item.
        return_rays: also return the ray-space intermediates.

    Returns:
        (B, 1, D, H, W) in [0, 1], zero outside the field of view (and the ray dict).
    """
    m = maps.stack() if isinstance(maps, AcousticMaps) else maps
    img, rays = ray_image(m, spacing, geom, config, seeds)
    us = scan_convert(img, m.shape[2:], spacing, geom, config)
    return (us, dict(rays, image=img)) if return_rays else us


def simulate_fov(
    read_mri,
    brain: torch.Tensor,
    spacing: torch.Tensor,
    geom: ProbeGeometry,
    config: ProbeConfig,
    mapper: nn.Module,
    seed: int,
    head: HeadConfig = HeadConfig(),
) -> tuple[torch.Tensor | None, dict | None]:
    """Simulate one item's field of view in the frame of a volume (the core of the simulator).

    The native crop is the field of view plus the head-layer margin, so that the
    distance to the brain sees brain voxels outside the field of view; it is pooled to
    the working resolution from the crop's origin. Everything depends only on the
    volume frame (its brain mask, the probe pose and the seed), never on which part of
    it the caller keeps: a training patch cut from this output is exactly the patch of
    the whole-case simulation (:class:`trifuse.physics.transforms.SimulateUltrasound`
    uses this with the whole cached case as the frame).

    Args:
        read_mri: ``read_mri(slices) -> (1, 4, d, h, w)`` float MRI of the native crop
            ``slices`` (three ``slice`` objects) of the volume; lets a caller read only the
            crop from a memory-mapped case.
        brain: (1, 1, D, H, W) bool brain mask of the whole volume.
        spacing: (1, 3) voxel size in mm.
        geom: probe pose of this item (batch of one), volume frame.
        config, mapper, seed, head: as :func:`simulate_ultrasound`.

    Returns:
        ``(us (1, 1, d, h, w) in [0, 1] on the native crop, info)`` with ``info["crop_box"]``
        the crop ``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open) in the volume;
        ``(None, None)`` if the field of view misses the volume.
    """
    dev = brain.device
    shape = brain.shape[2:]
    fov = fov_box(geom, config, shape, spacing)[0]
    if any(lo >= hi for lo, hi in fov):  # the field of view misses the volume
        return None, None
    fac = coarse_factors(spacing[0].tolist(), config.working_mm)
    ft = torch.tensor(fac, device=dev, dtype=spacing.dtype)
    mg = [int(math.ceil(head.total_mm / float(s))) + f for s, f in zip(spacing[0].tolist(), fac)]
    cb = [[max(0, lo - m), min(n, hi + m)] for (lo, hi), m, n in zip(fov, mg, shape)]
    sl = tuple(slice(lo, hi) for lo, hi in cb)
    m_c, b_c = _pool_mri(read_mri(sl).float(), brain[(slice(None), slice(None)) + sl].bool(), fac)
    sp_w = spacing * ft
    c0 = torch.tensor([lo for lo, _ in cb], device=dev, dtype=spacing.dtype)
    off_c = (c0 + (ft - 1) / 2) * spacing  # volume-frame position of working voxel (0,0,0)
    layers = head_layers(b_c, sp_w[0].tolist(), head)
    window = craniotomy_window(m_c.shape[2:], sp_w, geom, config, off_c)
    labels = geometry_labels(b_c, layers, window)
    maps = mapper(m_c, b_c, labels).stack()
    img, _ = ray_image(maps, sp_w, geom, config, [int(seed)], off_c)
    # scan conversion on the working crop, upsampled onto the native crop
    us_w = scan_convert(img, m_c.shape[2:], sp_w, geom, config, off_c)
    us_n = upsample(us_w, fac, [hi - lo for lo, hi in cb]).clamp_(0, 1)  # in place: float round-off only
    return us_n, {"crop_box": cb, "working_spacing": sp_w[0].tolist(), "n_rays": config.resolve(sp_w[0].tolist())}


def simulate_ultrasound(
    mri: torch.Tensor,
    brain: torch.Tensor,
    spacing,
    config: ProbeConfig = ProbeConfig(),
    mapper: nn.Module | None = None,
    seeds: Sequence[int] | None = None,
    head: HeadConfig = HeadConfig(),
    return_info: bool = False,
    geometry: ProbeGeometry | None = None,
):
    """MRI → simulated intra-operative ultrasound volume.

    Per item: pool to the working resolution, crop to the field of view (plus the
    head-layer margin), build the head model and acoustic maps there, trace rays,
    scan-convert on the working grid and upsample into the native grid.

    Args:
        mri: (B, 4, D, H, W) or (4, D, H, W) z-scored MRI.
        brain: (B, 1, D, H, W) or (1, D, H, W) bool brain mask.
        spacing: voxel size in mm: 3 numbers or (B, 3).
        config: probe settings.
        mapper: MRI → acoustic maps (default :class:`ImpedanceMapper`, table θ).
        seeds: speckle seed per item (default 0).
        head: skull/scalp layers outside the craniotomy.
        return_info: also return a dict with the geometry and per-item crops.
        geometry: a resolved probe pose (skips :func:`place_probe`).

    Returns:
        (B, 1, D, H, W) (or (1, D, H, W)) float in [0, 1], zero outside the field of
        view; differentiable with respect to the mapper's parameters.
    """
    unbatched = mri.dim() == 4
    if unbatched:
        mri, brain = mri[None], brain[None]
    b = mri.shape[0]
    dev = mri.device
    mri = mri.float()
    brain = brain.bool()
    sp = spacing_tensor(spacing, b, dev)
    mapper = ImpedanceMapper().to(dev) if mapper is None else mapper
    seeds = [0] * b if seeds is None else [int(s) for s in seeds]
    geom = place_probe(mri, brain, sp, config) if geometry is None else geometry
    shape = mri.shape[2:]
    outs, crops = [], []
    for i in range(b):  # per item: each has its own field of view (loop over items only)
        out = torch.zeros((1, 1, *shape), device=dev, dtype=mri.dtype)
        us_n, info = simulate_fov(lambda sl, i=i: mri[(slice(i, i + 1), slice(None)) + sl], brain[i : i + 1], sp[i : i + 1],
                                  geom.select(i), config, mapper, seeds[i], head)
        if us_n is not None:
            cb = info["crop_box"]
            out[..., cb[0][0] : cb[0][1], cb[1][0] : cb[1][1], cb[2][0] : cb[2][1]] = us_n
        outs.append(out)
        crops.append(info)
    us = torch.cat(outs)
    if unbatched:
        us = us[0]
    if return_info:
        return us, {"geometry": geom, "crops": crops}
    return us


class UltrasoundSimulator(nn.Module):
    """Thin module around :func:`simulate_ultrasound` holding the learnable mapper.

    Args:
        config: probe settings.
        mapper: θ_mapper module (default :class:`ImpedanceMapper`).
        head: geometric layer thicknesses.

    Shape:
        forward(mri (B,4,D,H,W), brain (B,1,D,H,W), spacing, seeds) -> (B,1,D,H,W).
    """

    def __init__(self, config: ProbeConfig = ProbeConfig(), mapper: nn.Module | None = None, head: HeadConfig = HeadConfig()):
        super().__init__()
        self.config = config
        self.head = head
        self.mapper = ImpedanceMapper() if mapper is None else mapper

    def forward(self, mri: torch.Tensor, brain: torch.Tensor, spacing=(1.0, 1.0, 1.0), seeds: Sequence[int] | None = None) -> torch.Tensor:
        return simulate_ultrasound(mri, brain, spacing, self.config, self.mapper, seeds, self.head)
