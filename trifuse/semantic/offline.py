"""Offline describer: the description schema from image statistics and atlas position.

Deterministic and image-only (it never reads ``sample[LABEL]`` or ``sample[SEG]``), so
it is the default when no OpenAI key is set and the reference for the vision model.
Each view is described from the slice through the abnormality that the vision model
would see (:func:`trifuse.semantic.slices.extract_view_slices`), with 3-D context for
laterality reference and mass effect.

Rules, all on robust z-scores relative to the normal-appearing brain:

* **lesion** — the abnormality of :func:`~trifuse.semantic.slices.find_abnormality`
  (FLAIR-hyperintense, grown into adjacent enhancement, holes filled), intersected
  with the slice.
* **enhancement** — enhancing pixels in the lesion (T1ce gain over T1,
  :func:`~trifuse.semantic.slices.enhancement_z`). None below 1 % of the lesion;
  *ring* when they surround a T1ce-dark centre (inside their convex hull, no angular
  gap > 90° around it); *nodular* for one compact component (≥ 60 % of its hull);
  otherwise *heterogeneous*.
* **necrosis** — T1ce-dark, T2-bright pixels inside the convex hull of enhancement
  (VASARI F7: non-enhancing region within enhancing tumour, T2-hyperintense).
* **oedema** — FLAIR-abnormal area outside the enhancing/necrotic core, as a
  proportion of the whole abnormality, graded like VASARI F14 (none < 5 %, mild
  < 34 %, moderate < 68 %, marked ≥ 68 %). Without enhancement, non-enhancing tumour
  and oedema cannot be told apart on intensity; the abnormality is then reported as a
  non-enhancing lesion with oedema "none".
* **size** — longest in-plane (Feret) diameter of the abnormality in mm.
* **hemisphere** — world x (RAS+: +x is the subject's Right, see
  https://nipy.org/nibabel/coordinate_systems.html) of lesion pixels against the
  brain's mid-sagittal x (midpoint of the brain's x extent), ±3 mm midline band.
* **lobes** — the brain's bounding box is mapped linearly onto approximate MNI152
  brain extents (a Talairach-style proportional grid; BraTS is in SRI24 space, close
  to MNI) and each pixel is assigned by coordinate boxes that approximate the lobar
  anatomy of the MNI structural atlas (Mazziotta et al., Phil Trans R Soc B 2001).
  Lobes holding ≥ 15 % of the lesion are listed, most involved first.
* **mass effect** — whole-abnormality volume ≥ 40 mL, or lateral-ventricle CSF
  asymmetry with the smaller side ipsilateral to the lesion (compression).

VASARI: the TCIA VASARI MR feature guide; Rios Velazquez et al., "Fully automatic GBM
segmentation in the TCGA-GBM dataset: prognosis and correlation with VASARI
features", Sci Rep 5:16822, 2015.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from trifuse import keys
from trifuse.semantic.backend import DescribeError, Usage, ViewOutcome
from trifuse.semantic.schema import LOBES, VIEWS, Description, ViewDescription
from trifuse.semantic.slices import (
    Abnormality,
    SampleGeometry,
    ViewSlice,
    enhancement_z,
    find_abnormality,
    robust_z,
    sample_arrays,
    view_geometry,
)

OFFLINE_MODEL = "trifuse-offline"
OFFLINE_VERSION = "offline-v1"

# approximate MNI152 brain extents (mm) per RAS axis, cerebellum included
_MNI_EXTENT = np.array([[-70.0, 70.0], [-104.0, 70.0], [-72.0, 78.0]])


@dataclass(frozen=True)
class OfflineThresholds:
    """Robust-z and size thresholds of the offline rules (see module docstring)."""

    enhancing_z: float = 3.0  #: enhancement (T1ce gain over T1, robust z vs normal brain) above this
    necrosis_t1ce_z: float = -0.75  #: necrosis: T1ce below this …
    necrosis_t2_z: float = 1.0  #: … and T2 above this
    ring_hole_fraction: float = 0.05  #: ring: non-enhancing centre ≥ this fraction of the hull …
    ring_core_z: float = 0.5  #: … whose mean T1ce robust z is below this …
    ring_max_gap_deg: float = 90.0  #: … and surrounded by enhancement with no gap wider than this
    nodular_solidity: float = 0.6  #: nodular: one component filling ≥ this fraction of its hull
    min_enhancing_fraction: float = 0.01
    necrosis_fraction: float = 0.05
    lobe_fraction: float = 0.15
    bilateral_fraction: float = 0.2
    midline_band_mm: float = 3.0
    mass_effect_ml: float = 40.0
    ventricle_asymmetry: float = 0.3


# --------------------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------------------
def feret_diameter_mm(mask2d: np.ndarray, row_mm: float, col_mm: float) -> float:
    """Longest caliper diameter of a 2-D mask in mm, edge to edge.

    Uses the four corners of every pixel, their convex hull, and the largest distance
    between hull vertices (the diameter of a point set is attained on its hull).
    """
    pts = np.argwhere(mask2d).astype(np.float64)
    if len(pts) == 0:
        return 0.0
    corners = np.concatenate([pts + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))]) * [row_mm, col_mm]
    try:
        corners = corners[ConvexHull(corners).vertices]
    except QhullError:  # degenerate (collinear) sets: all points are candidates
        pass
    d = corners[:, None, :] - corners[None, :, :]
    return float(np.sqrt((d ** 2).sum(-1)).max())


def pseudo_mni(world: np.ndarray, brain_lo: np.ndarray, brain_hi: np.ndarray) -> np.ndarray:
    """World RAS+ mm ``(N, 3)`` → approximate MNI mm by matching brain bounding boxes."""
    span = np.maximum(brain_hi - brain_lo, 1e-6)
    u = (world - brain_lo) / span  # 0..1 inside the brain box
    return _MNI_EXTENT[:, 0] + u * (_MNI_EXTENT[:, 1] - _MNI_EXTENT[:, 0])


def lobe_of(mni: np.ndarray) -> np.ndarray:
    """Approximate lobe index into :data:`~trifuse.semantic.schema.LOBES` per point.

    Args:
        mni: (N, 3) approximate MNI coordinates in mm.

    Returns:
        (N,) int indices; first matching box wins (order matters).
    """
    x, y, z = np.abs(mni[:, 0]), mni[:, 1], mni[:, 2]
    idx = {name: i for i, name in enumerate(LOBES)}
    out = np.full(len(mni), idx["parietal"], dtype=np.int64)
    rules = [  # later rules only fill points not yet assigned
        ("brainstem", (x < 15) & (y > -45) & (y < -10) & (z < -10)),
        ("cerebellum", (y < -40) & (z < -20)),
        ("deep", (x < 30) & (y > -35) & (y < 25) & (z > -12) & (z < 25)),
        ("insular", (x < 45) & (y > -30) & (y < 25) & (z > -15) & (z < 22)),
        ("occipital", y < -70),
        ("temporal", (z < 5) & (y >= -70) & (y < 20) & (x >= 20)),
        ("frontal", y >= -18),
        ("deep", (z < 0) & (x < 20)),
    ]
    done = np.zeros(len(mni), dtype=bool)
    for name, sel in rules:
        take = sel & ~done
        out[take] = idx[name]
        done |= take
    return out


def oedema_grade(fraction: float) -> str:
    """VASARI-style grade from the oedema proportion of the whole abnormality."""
    if fraction < 0.05:
        return "none"
    if fraction < 0.34:
        return "mild"
    if fraction < 0.68:
        return "moderate"
    return "marked"


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a thin ring touches diagonally


def _components(mask: np.ndarray, min_px: int = 3) -> tuple[np.ndarray, int]:
    """Components of at least ``min_px`` pixels (8-connected) and their count."""
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return mask, 0
    sizes = np.bincount(lab.ravel())[1:]
    keep = np.flatnonzero(sizes >= min_px) + 1
    return np.isin(lab, keep), len(keep)


def _largest(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    lab, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return mask
    return lab == int(np.argmax(np.bincount(lab.ravel())[1:])) + 1


def _hull_mask(mask: np.ndarray) -> np.ndarray:
    """Pixels (centres) inside the convex hull of a 2-D mask's pixel centres.

    Half-plane test against every hull edge (2-D ``ConvexHull`` vertices are in
    counter-clockwise order), vectorised over the bounding box.
    """
    pts = np.argwhere(mask).astype(np.float64)
    if len(pts) < 3:
        return mask.copy()
    try:
        v = pts[ConvexHull(pts).vertices]
    except QhullError:  # collinear
        return mask.copy()
    lo, hi = pts.min(0).astype(int), pts.max(0).astype(int)
    rr, cc = np.mgrid[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1]
    q = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float64)
    e = np.roll(v, -1, axis=0) - v  # (E, 2) edges
    cross = e[None, :, 0] * (q[:, None, 1] - v[None, :, 1]) - e[None, :, 1] * (q[:, None, 0] - v[None, :, 0])
    inside = np.all(cross >= -1e-9, axis=1) | np.all(cross <= 1e-9, axis=1)  # either orientation
    out = np.zeros_like(mask)
    out[rr.ravel()[inside], cc.ravel()[inside]] = True
    return out | mask


def _max_angular_gap_deg(enh: np.ndarray, core: np.ndarray) -> float:
    """Largest angle (degrees) around the core's centroid with no enhancing pixel.

    Small for a closed ring (≈ 360° / pixels on it), ≥ 90° for a crescent or one-sided
    patch. Independent of the number of pixels, unlike counting fixed sectors.
    """
    if not core.any() or not enh.any():
        return 360.0
    d = np.argwhere(enh) - np.argwhere(core).mean(0)
    ang = np.sort(np.degrees(np.arctan2(d[:, 0], d[:, 1])))
    gaps = np.diff(np.concatenate([ang, ang[:1] + 360.0]))
    return float(gaps.max())


# --------------------------------------------------------------------------------------
# the describer
# --------------------------------------------------------------------------------------
@dataclass
class _CaseStats:
    geo: SampleGeometry
    brain_lo: np.ndarray
    brain_hi: np.ndarray
    mid_x: float
    z_t1ce: np.ndarray
    z_enh: np.ndarray
    z_t2: np.ndarray
    mass_effect: bool


class OfflineDescriber:
    """Deterministic, image-only describer (see module docstring for the rules).

    Args:
        thresholds: rule thresholds.
        model: name recorded in :attr:`Description.model`.
        prompt_version: rule-set version recorded in the record and the cache key.
    """

    source = "offline"

    def __init__(self, thresholds: OfflineThresholds | None = None, model: str = OFFLINE_MODEL,
                 prompt_version: str = OFFLINE_VERSION) -> None:
        self.t = thresholds or OfflineThresholds()
        self.model = model
        self.prompt_version = prompt_version
        self.usage = Usage()

    def __repr__(self) -> str:
        return f"OfflineDescriber(model={self.model!r}, prompt_version={self.prompt_version!r})"

    @property
    def prompt_hash(self) -> str:
        """Hash of the rule set (its version and every threshold)."""
        from dataclasses import asdict

        from trifuse.semantic.provenance import text_hash

        return text_hash(self.prompt_version, asdict(self.t))

    def identity(self) -> dict[str, Any]:
        """Describer identity (:mod:`trifuse.semantic.provenance`)."""
        return {"backend": self.source, "model": self.model, "prompt_version": self.prompt_version,
                "prompt_hash": self.prompt_hash, "base_url": None}

    def request_params(self) -> dict[str, Any]:
        """What the answer depends on besides the image: part of the cache key."""
        return {"model": self.model, "prompt_hash": self.prompt_hash}

    # -- public API -------------------------------------------------------------------
    def describe(self, sample: Mapping[str, Any], slices: Mapping[str, ViewSlice] | None = None,
                 abnormality: Abnormality | None = None) -> Description:
        """Describe a case in all views.

        Args:
            sample: sample dict (only ``MRI``, ``BRAIN`` and ``META`` are read).
            slices: precomputed :func:`extract_view_slices` output (indices are reused).
            abnormality: precomputed :func:`find_abnormality` output.

        Returns:
            A validated :class:`Description` with ``source="offline"``.
        """
        views = self.describe_views(sample, slices, abnormality)
        return Description(case_id=str(sample.get(keys.CASE_ID, "unknown")), views=views, source="offline",
                           model=self.model, prompt_version=self.prompt_version, prompt_hash=self.prompt_hash)

    def describe_views(self, sample: Mapping[str, Any], slices: Mapping[str, ViewSlice] | None = None,
                       abnormality: Abnormality | None = None,
                       views: tuple[str, ...] = VIEWS) -> dict[str, ViewDescription]:
        """Per-view descriptions (see :meth:`describe`)."""
        mri, brain, geo = sample_arrays(sample)
        abn = abnormality if abnormality is not None else find_abnormality(mri, brain, geo.spacing)
        stats = self._case_stats(mri, brain, geo, abn)
        out = {}
        for view in views:
            vg = view_geometry(geo.affine, view, geo.spacing)
            if slices is not None and view in slices:
                idx = slices[view].index
            else:
                idx = int(np.clip(round(abn.slice_centre[vg.slice_axis]), 0, brain.shape[vg.slice_axis] - 1))
            out[view] = self._describe_plane(view, vg.slice_axis, idx, abn, brain, stats)
        return out

    # -- Describer protocol (trifuse.semantic.backend.Describer) ----------------------
    def prepare(self, sample: Mapping[str, Any], slices: Mapping[str, ViewSlice],
                abnormality: Abnormality | None) -> dict[str, ViewDescription]:
        """All view descriptions of a case at once (cheap; runs in a worker thread)."""
        return self.describe_views(sample, slices, abnormality, views=tuple(slices))

    async def describe_view(self, case_id: str, view_slice: ViewSlice,
                            context: Mapping[str, ViewDescription]) -> ViewOutcome:
        """The prepared description of one view."""
        if context is None or view_slice.view not in context:
            self.usage.failed += 1
            raise DescribeError(f"{case_id}/{view_slice.view}: offline describer was not prepared", kind="empty")
        self.usage.succeeded += 1
        return ViewOutcome(context[view_slice.view], response_model=self.model)

    def estimate(self, view_slice: ViewSlice) -> tuple[int, int, float]:
        """Dry-run estimate: the offline describer costs nothing."""
        self.usage.would_send += 1
        return 0, 0, 0.0

    async def aclose(self) -> None:
        """Nothing to release."""

    # -- internals --------------------------------------------------------------------
    def _case_stats(self, mri: np.ndarray, brain: np.ndarray, geo: SampleGeometry,
                    abn: Abnormality) -> _CaseStats:
        normal = brain & ~abn.mask
        if normal.sum() < 10:
            normal = brain
        z_t1ce = robust_z(mri[keys.T1CE], normal)
        z_enh = enhancement_z(mri, normal)
        z_t2 = robust_z(mri[keys.T2], normal)
        z_flair = robust_z(mri[keys.FLAIR], normal)
        # brain extent in world coordinates: the 8 corners of the voxel bounding box
        nz = np.argwhere(brain)
        if len(nz) == 0:
            nz = np.argwhere(np.ones_like(brain))
        lo, hi = nz.min(0), nz.max(0)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        cw = geo.to_world(corners)
        brain_lo, brain_hi = cw.min(0), cw.max(0)
        mid_x = float((brain_lo[0] + brain_hi[0]) / 2)
        # mass effect: large volume, or ipsilateral lateral-ventricle compression
        vol_ml = abn.n_voxels * float(np.prod(geo.spacing)) / 1000.0
        mass = abn.found and vol_ml >= self.t.mass_effect_ml
        if abn.found and not mass:
            csf = brain & ~ndimage.binary_dilation(abn.mask, iterations=2) & (z_t2 > 2.0) & (z_flair < 0.0)
            pts = np.argwhere(csf)
            if len(pts) >= 20:
                w = geo.to_world(pts)
                mni = pseudo_mni(w, brain_lo, brain_hi)
                x, y, z = np.abs(mni[:, 0]), mni[:, 1], mni[:, 2]
                central = (x < 30) & (y > -40) & (y < 30) & (z > -10) & (z < 35)  # lateral ventricles
                left = int(((w[:, 0] < mid_x) & central).sum())
                right = int(((w[:, 0] > mid_x) & central).sum())
                lx = geo.to_world(np.argwhere(abn.mask))[:, 0].mean()
                ipsi, contra = (left, right) if lx < mid_x else (right, left)
                if left + right >= 20 and (contra - ipsi) / (contra + ipsi) > self.t.ventricle_asymmetry:
                    mass = True
        return _CaseStats(geo, brain_lo, brain_hi, mid_x, z_t1ce, z_enh, z_t2, bool(mass))

    def _describe_plane(self, view: str, axis: int, idx: int, abn: Abnormality, brain: np.ndarray,
                        st: _CaseStats) -> ViewDescription:
        t = self.t
        sel = [slice(None)] * 3
        sel[axis] = idx
        sel = tuple(sel)
        lesion = abn.mask[sel]
        if not abn.found or lesion.sum() == 0:
            return ViewDescription(view=view, hemisphere="none", lobes=[], size_mm=0.0, enhancement="none",
                                   necrosis=False, oedema="none", mass_effect=False,
                                   impression=f"No focal FLAIR/T2 abnormality on this {view} slice.")
        in_plane = [a for a in range(3) if a != axis]
        row_mm, col_mm = (float(st.geo.spacing[a]) for a in in_plane)
        bslice = brain[sel]
        zc, ze, zt2 = st.z_t1ce[sel], st.z_enh[sel], st.z_t2[sel]
        region = ndimage.binary_dilation(lesion, iterations=1) & bslice

        # enhancement: pattern of T1ce-bright pixels within the lesion
        enh, n_enh = _components(region & (ze > t.enhancing_z))
        n_les = int(lesion.sum())
        hull = np.zeros_like(lesion)
        if enh.sum() < max(3, t.min_enhancing_fraction * n_les):
            enhancement = "none"
        else:
            hull = _hull_mask(enh)
            # the ring test looks at the main enhancing component only: stray enhancing
            # pixels elsewhere would widen the hull over oedema
            main = _largest(enh, _EIGHT)
            main_hull = _hull_mask(main)
            core = _largest(main_hull & ~main)  # non-enhancing centre candidate
            ring = (core.sum() >= max(3, t.ring_hole_fraction * main_hull.sum())
                    and float(zc[core].mean()) < t.ring_core_z  # dark centre, not a noisy solid nodule
                    and _max_angular_gap_deg(main, core) <= t.ring_max_gap_deg)
            if ring:
                enhancement = "ring"
            elif n_enh == 1 and enh.sum() >= t.nodular_solidity * hull.sum():
                enhancement = "nodular"
            else:
                enhancement = "heterogeneous"

        # necrosis: T1ce-dark, T2-bright pixels enclosed by enhancement (inside its hull)
        necro = hull & ~enh & (zc < t.necrosis_t1ce_z) & (zt2 > t.necrosis_t2_z)
        necrosis = bool(hull.any() and necro.sum() >= max(3, t.necrosis_fraction * hull.sum()))

        # oedema: abnormality outside the (dilated) enhancing/necrotic core, as a proportion
        if hull.any():
            core_all = ndimage.binary_dilation(hull, iterations=1)
            oedema = oedema_grade(float((lesion & ~core_all).sum()) / n_les)
        else:
            oedema = "none"

        size = round(feret_diameter_mm(lesion, row_mm, col_mm), 1)

        # position
        pts = np.argwhere(lesion)
        ijk = np.zeros((len(pts), 3))
        ijk[:, axis] = idx
        ijk[:, in_plane[0]], ijk[:, in_plane[1]] = pts[:, 0], pts[:, 1]
        world = st.geo.to_world(ijk)
        band = max(t.midline_band_mm, 0.5 * float(np.abs(st.geo.affine[0, :3]).max()))
        fl = float((world[:, 0] < st.mid_x - band).mean())  # RAS+: smaller x = subject's left
        fr = float((world[:, 0] > st.mid_x + band).mean())
        if fl >= t.bilateral_fraction and fr >= t.bilateral_fraction:
            hemisphere = "bilateral"
        elif 1.0 - fl - fr >= 0.5:
            hemisphere = "midline"
        else:
            hemisphere = "left" if fl >= fr else "right"
        counts = np.bincount(lobe_of(pseudo_mni(world, st.brain_lo, st.brain_hi)), minlength=len(LOBES))
        frac = counts / counts.sum()
        order = sorted(range(len(LOBES)), key=lambda i: (-frac[i], i))
        lobes = [LOBES[i] for i in order if frac[i] >= t.lobe_fraction] or [LOBES[order[0]]]

        fields = dict(view=view, hemisphere=hemisphere, lobes=lobes, size_mm=size, enhancement=enhancement,
                      necrosis=necrosis, oedema=oedema, mass_effect=st.mass_effect)
        return ViewDescription(**fields, impression=_impression(**fields))


def _impression(view: str, hemisphere: str, lobes: list[str], size_mm: float, enhancement: str,
                necrosis: bool, oedema: str, mass_effect: bool) -> str:
    """A radiology-style impression from the structured fields (deterministic)."""
    names = [("deep grey matter" if lobe == "deep" else lobe) for lobe in lobes]
    where = " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]
    side = "" if hemisphere == "none" else f"{hemisphere} "
    kind = "non-enhancing FLAIR-hyperintense lesion" if enhancement == "none" else "enhancing mass"
    parts = [f"{side.capitalize() if side else ''}{where} {kind}".strip()]
    parts[0] = parts[0][0].upper() + parts[0][1:]
    parts[0] += f" measuring about {size_mm:.0f} mm on this {view} slice"
    feats = []
    if enhancement != "none":
        feats.append(f"{enhancement} enhancement")
    if necrosis:
        feats.append("central necrosis")
    if oedema != "none":
        feats.append(f"{oedema} perilesional oedema")
    feats.append("mass effect" if mass_effect else "no significant mass effect")
    text = parts[0] + ", with " + ", ".join(feats[:-1]) + (" and " if len(feats) > 1 else "") + feats[-1] + "."
    if enhancement in ("ring", "heterogeneous") and necrosis:
        text += " Appearance suggests a high-grade glioma."
    elif enhancement == "none":
        text += " A lower-grade glioma is a consideration."
    else:
        text += " Appearance suggests an enhancing glial tumour."
    return text
