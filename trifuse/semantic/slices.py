"""Slices through the abnormality, oriented for display, rendered for a vision model.

Three jobs, all image-only (labels are never read):

1. :func:`find_abnormality` — locate the abnormality: FLAIR/T2 robust z-score
   outliers inside the brain, the largest group of them, its centroid; falls back
   to the brain centre when nothing qualifies; slices are centred on the enhancing
   core when there is one.
2. :class:`ViewGeometry` — map the stored array axes ``(D, H, W)`` (the native BraTS
   grid, never reoriented on disk) to a radiological display of each view using the
   affine: axial/coronal show the subject's right on the image left, sagittal shows
   anterior on the left, and superior (or anterior for axial) is up. The mapping is
   invertible (:meth:`ViewGeometry.from_display`), so per-slice maps computed on the
   display grid (the CLIP priors) can be put back on the volume grid.
3. :func:`extract_view_slices` — the slice through the abnormality in each view:
   raw ``(4, R, C)`` float slices (for CLIP) and a 2×2 four-contrast PNG (for the
   vision model) with a content hash for caching. :func:`iter_view_slices` yields every
   slice of a view for CLIP training and priors.

World coordinates follow NIfTI/nibabel RAS+: +x toward the subject's Right, +y
Anterior, +z Superior (https://nipy.org/nibabel/coordinate_systems.html, "RAS+").
BraTS files store their data with a (-1, -1, 1) diagonal affine, so increasing array
index along the first axis goes toward the subject's *left*; everything here goes
through the affine rather than assuming this.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
from scipy import ndimage

from trifuse import keys
from trifuse.semantic.schema import VIEWS

log = logging.getLogger(__name__)

#: display-pipeline version: part of the image hash, bump when rendering changes
RENDER_VERSION = "slices-v1"
#: panel order of the 2×2 grid (row-major), indices into sample[MRI]
PANEL_ORDER = (keys.T1, keys.T1CE, keys.T2, keys.FLAIR)
PANEL_NAMES = ("T1", "T1ce", "T2", "FLAIR")

# world (RAS) axis normal to each view, and the world axes shown down the rows and
# across the columns; both in-plane axes are shown in *descending* world coordinate
# (top = Superior/Anterior, left = Right (radiological) or Anterior (sagittal)).
_VIEW_AXES = {
    "axial": (2, 1, 0),  # normal S; rows A→P; cols R→L
    "coronal": (1, 2, 0),  # normal A; rows S→I; cols R→L
    "sagittal": (0, 2, 1),  # normal R; rows S→I; cols A→P
}
# letters at the left and right edge of each panel
_EDGE_LETTERS = {"axial": ("R", "L"), "coronal": ("R", "L"), "sagittal": ("A", "P")}


# --------------------------------------------------------------------------------------
# sample access
# --------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class SampleGeometry:
    """Geometry of a (cropped) sample.

    Attributes:
        affine: (4, 4) voxel → world (RAS+, mm) of the ORIGINAL full volume.
        offset: (3,) crop start in the original grid, array order (d0, h0, w0).
        spacing: (3,) voxel size in mm, array order (D, H, W).
    """

    affine: np.ndarray
    offset: np.ndarray
    spacing: np.ndarray

    def to_world(self, ijk: np.ndarray) -> np.ndarray:
        """Crop voxel coordinates ``(N, 3)`` → world RAS+ mm ``(N, 3)``."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64)) + self.offset
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]


def sample_geometry(meta: Mapping[str, Any] | None) -> SampleGeometry:
    """Read affine, crop offset and spacing from ``sample[META]`` (with safe defaults).

    A missing affine falls back to the identity (RAS+) with a warning; a missing crop
    box to offset 0; missing spacing to the affine's column norms.
    """
    meta = meta or {}
    if meta.get("affine") is not None:
        affine = np.asarray(meta["affine"], dtype=np.float64).reshape(4, 4)
    else:
        log.warning("sample meta has no affine: assuming identity (RAS+); laterality may be wrong")
        affine = np.eye(4)
    crop = meta.get("crop_box")
    offset = np.array([c[0] for c in crop], dtype=np.float64) if crop is not None else np.zeros(3)
    if meta.get("spacing") is not None:
        spacing = np.asarray(meta["spacing"], dtype=np.float64).reshape(3)
    else:
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
    applied = meta.get("applied") or []
    if any("flip" in str(a.get("name", a) if isinstance(a, Mapping) else a).lower() for a in applied):
        log.warning("sample meta records a flip transform: left/right read from the affine may be wrong")
    return SampleGeometry(affine=affine, offset=offset, spacing=spacing)


def sample_arrays(sample: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, SampleGeometry]:
    """``(mri (4,D,H,W) float32, brain (D,H,W) bool, geometry)`` from a sample dict.

    Raises:
        ValueError: ``sample[MRI]`` is not 4-channel 3-D, or the brain mask's shape differs.
    """
    mri = _to_numpy(sample[keys.MRI]).astype(np.float32, copy=False)
    if mri.ndim != 4 or mri.shape[0] != len(keys.MODALITIES):
        raise ValueError(f"sample[{keys.MRI!r}] must be (4, D, H, W), got {mri.shape}")
    if sample.get(keys.BRAIN) is not None:
        brain = _to_numpy(sample[keys.BRAIN]).astype(bool)
        brain = brain[0] if brain.ndim == 4 else brain
    else:  # samples are 0 outside the brain after z-scoring
        brain = np.any(mri != 0, axis=0)
    if brain.shape != mri.shape[1:]:
        raise ValueError(f"brain mask shape {brain.shape} does not match MRI {mri.shape[1:]}")
    return mri, brain, sample_geometry(sample.get(keys.META))


# --------------------------------------------------------------------------------------
# abnormality
# --------------------------------------------------------------------------------------
def robust_z(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Robust z-score ``(x − median) / (1.4826 · MAD)`` with statistics over ``mask``.

    Median/MAD instead of mean/std so that a large tumour does not inflate the scale it
    is measured against. Falls back to std, then 1, for degenerate masks.
    """
    vals = x[mask]
    if vals.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    med = float(np.median(vals))
    scale = 1.4826 * float(np.median(np.abs(vals - med)))
    if scale <= 1e-6:
        scale = float(vals.std()) or 1.0
    return ((x - med) / scale).astype(np.float32)


def enhancement_z(mri: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Contrast enhancement as a robust z-score: ``z(z(T1ce) − z(T1))`` over ``mask``.

    Enhancement is the signal gained after gadolinium, i.e. T1ce relative to the
    pre-contrast T1, not T1ce brightness alone: white matter is bright on both and does
    not enhance, while enhancing tumour is T1-hypo- and T1ce-hyperintense.
    """
    diff = robust_z(mri[keys.T1CE], mask) - robust_z(mri[keys.T1], mask)
    return robust_z(diff, mask)


def fill_holes(mask: np.ndarray, structure: np.ndarray | None = None) -> np.ndarray:
    """Fill background components that do not touch the array border.

    Same result as ``scipy.ndimage.binary_fill_holes`` but by one labelling of the
    background instead of an iterated dilation (several times faster on 240²×155).

    Args:
        mask: bool array.
        structure: background connectivity (default: faces only); a planar structure
            fills slice by slice.
    """
    bg, n = ndimage.label(~mask, structure=structure)
    if n == 0:
        return mask.copy()
    keep = np.ones(n + 1, dtype=bool)
    keep[0] = False
    st = np.ones((3,) * mask.ndim, bool) if structure is None else np.asarray(structure, bool)
    for axis in range(mask.ndim):
        # only borders the structure reaches across (a planar structure: the plane's edges)
        if not (np.take(st, 0, axis=axis).any() or np.take(st, -1, axis=axis).any()):
            continue
        for end in (0, -1):
            keep[np.take(bg, end, axis=axis)] = False  # touches the border: outside, not a hole
    return mask | keep[bg]


@dataclass(frozen=True)
class Abnormality:
    """The abnormality found in a sample.

    Attributes:
        found: whether a component passed the size test.
        centroid: (3,) crop-voxel coordinates of the abnormality's centroid, or of the
            brain when nothing was found.
        mask: (D, H, W) bool, the abnormality with holes filled (empty when not found).
        n_voxels: voxels in ``mask``.
        focus: (3,) centroid of the filled enhancing core inside ``mask`` when one
            exists (``None`` otherwise).
    """

    found: bool
    centroid: tuple[float, float, float]
    mask: np.ndarray = field(repr=False)
    n_voxels: int
    focus: tuple[float, float, float] | None = None

    @property
    def slice_centre(self) -> tuple[float, float, float]:
        """Where the view slices pass: the enhancing core's centre when there is one
        (what a radiologist would centre on), else the whole abnormality's centroid."""
        return self.focus if self.focus is not None else self.centroid


def find_abnormality(mri: np.ndarray, brain: np.ndarray, spacing: Any = (1.0, 1.0, 1.0), flair_z: float = 2.0,
                     t2_z: float = 0.0, enhancing_z: float = 3.0, grow_mm: float = 10.0,
                     min_fraction: float = 5e-4, min_voxels: int = 8, iterations: int = 3) -> Abnormality:
    """Locate the abnormality from images only (labels are never read).

    1. Candidates: FLAIR-bright voxels (robust z > ``flair_z``) that are not T2-dark
       (z > ``t2_z``) inside the brain eroded by one voxel (skull-stripping rim
       artefacts); CSF is FLAIR-dark, so ventricles drop out. Specks are removed by a
       morphological opening.
    2. The statistics are re-estimated without the (dilated) candidates, up to
       ``iterations`` times: a large tumour otherwise shifts the median and widens the
       MAD of the brain it is measured against, and hides itself.
    3. The largest connected component seeds the abnormality (compact, unlike scattered
       cortical outliers); oedema fades towards its border and thresholds into
       fragments, so candidates within about two voxels of the seed's group join it.
    4. It grows into connected enhancing voxels (:func:`enhancement_z` >
       ``enhancing_z``) up to ``grow_mm`` away (enhancing tumour need not be
       FLAIR-bright; the limit keeps the growth out of the vessel tree), and enclosed
       holes are filled in 3-D and slice by slice along each axis (a FLAIR-dark
       necrotic core stays inside).

    Args:
        mri: (4, D, H, W) float, channel order :data:`trifuse.keys.MODALITIES`.
        brain: (D, H, W) bool brain mask.
        spacing: (3,) voxel size in mm (for ``grow_mm``).
        flair_z, t2_z, enhancing_z: robust-z thresholds.
        grow_mm: how far the abnormality may grow into connected enhancing tissue.
        min_fraction: smallest component, as a fraction of brain voxels.
        min_voxels: smallest component in voxels (whichever is larger).
        iterations: statistics re-estimation rounds.

    Returns:
        :class:`Abnormality`; ``found=False`` with the brain centroid when nothing passes.
    """
    n_brain = int(brain.sum())
    inner = ndimage.binary_erosion(brain, iterations=1) if n_brain > 27 else brain
    ball = ndimage.generate_binary_structure(3, 1)
    stats = brain
    for _ in range(max(1, iterations)):
        cand = inner & (robust_z(mri[keys.FLAIR], stats) > flair_z) & (robust_z(mri[keys.T2], stats) > t2_z)
        cand = ndimage.binary_opening(cand, structure=ball)
        new_stats = brain & ~ndimage.binary_dilation(cand, iterations=2)
        if new_stats.sum() < 0.3 * n_brain or np.array_equal(new_stats, stats):
            break  # converged, or too little left to be "normal" brain
        stats = new_stats
    # oedema fades towards its border, so one lesion thresholds into nearby fragments:
    # the largest connected component is the seed (compact, unlike scattered cortical
    # outliers); candidates within ~2 voxels of its group join it (fading oedema edges)
    lab, n = ndimage.label(cand)
    min_size = max(int(min_voxels), int(min_fraction * n_brain))
    if n > 0:
        sizes = np.bincount(lab.ravel())[1:]
        best = int(np.argmax(sizes))  # first of equal components: deterministic
        if sizes[best] >= min_size:
            groups, _ = ndimage.label(ndimage.binary_dilation(cand, iterations=2))
            seed = lab == best + 1
            mask = cand & (groups == groups[seed][0])
            z_ce = enhancement_z(mri, stats)
            steps = max(1, int(round(grow_mm / float(np.min(spacing)))))
            # the rest only touches the lesion's neighbourhood: work in its bounding box
            nz = np.argwhere(mask)
            lo = np.maximum(nz.min(0) - steps - 2, 0)
            hi = np.minimum(nz.max(0) + steps + 3, mask.shape)
            box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
            m = mask[box]
            # geodesic growth: dilation restricted to the mask plus enhancing voxels
            m = ndimage.binary_dilation(m, structure=np.ones((3, 3, 3), bool), iterations=steps,
                                        mask=m | (brain[box] & (z_ce[box] > enhancing_z)))
            m = ndimage.binary_closing(m, structure=ball, iterations=1) | m
            m = fill_holes(m)
            for axis in range(3):  # slice-wise fill: a planar structure fills each plane's holes
                plane = np.zeros((3, 3, 3), dtype=bool)
                idx = [slice(None)] * 3
                idx[axis] = 1
                plane[tuple(idx)] = ndimage.generate_binary_structure(2, 1)
                m = fill_holes(m, plane)
            mask = np.zeros_like(mask)
            mask[box] = m
            mask &= brain
            c = np.argwhere(mask).mean(axis=0)
            enh = mask & (z_ce > enhancing_z)  # no opening: a ring can be one voxel thick
            focus = None
            if enh.sum() >= max(8, 0.02 * mask.sum()):
                lab_e, _ = ndimage.label(enh, structure=np.ones((3, 3, 3)))  # thin shells touch diagonally
                core = lab_e == int(np.argmax(np.bincount(lab_e.ravel())[1:])) + 1
                focus = tuple(float(v) for v in np.argwhere(fill_holes(core)).mean(axis=0))
            return Abnormality(True, tuple(float(v) for v in c), mask, int(mask.sum()), focus)
    pts = np.argwhere(brain)
    c = pts.mean(axis=0) if len(pts) else (np.array(brain.shape, dtype=np.float64) - 1) / 2
    return Abnormality(False, tuple(float(v) for v in c), np.zeros_like(brain, dtype=bool), 0)


# --------------------------------------------------------------------------------------
# view geometry
# --------------------------------------------------------------------------------------
def _axis_orientation(affine: np.ndarray) -> np.ndarray:
    """(3, 2) ``[world_axis, ±1]`` per array axis (nibabel ``io_orientation``)."""
    from nibabel.orientations import io_orientation  # handles oblique affines robustly

    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():
        raise ValueError(f"affine has a degenerate axis: {affine.tolist()}")
    return ornt.astype(int)


@dataclass(frozen=True)
class ViewGeometry:
    """How to show a ``(…, D, H, W)`` array as display slices of one view.

    Display arrays are ``(…, N, R, C)``: ``N`` slices along :attr:`slice_axis` (index
    ``n`` is array index ``n``, no flip), rows and columns oriented radiologically.

    Attributes:
        view: ``axial``, ``coronal`` or ``sagittal``.
        slice_axis, row_axis, col_axis: array axes (0, 1, 2 of D, H, W).
        row_flip, col_flip: whether rows / columns run against increasing array index.
        row_mm, col_mm: pixel size in mm down rows / across columns.
    """

    view: str
    slice_axis: int
    row_axis: int
    col_axis: int
    row_flip: bool
    col_flip: bool
    row_mm: float
    col_mm: float

    def _flip(self, x: Any, dims: tuple[int, ...]) -> Any:
        if not dims:
            return x
        if hasattr(x, "flip") and hasattr(x, "movedim"):  # torch
            return x.flip(dims)
        return np.flip(x, axis=dims)

    def to_display(self, vol: Any) -> Any:
        """``(…, D, H, W)`` → ``(…, N, R, C)`` (numpy view or torch tensor)."""
        lead = vol.ndim - 3
        src = [lead + self.slice_axis, lead + self.row_axis, lead + self.col_axis]
        dst = [lead, lead + 1, lead + 2]
        out = vol.movedim(src, dst) if hasattr(vol, "movedim") else np.moveaxis(vol, src, dst)
        flips = tuple(d for d, f in ((lead + 1, self.row_flip), (lead + 2, self.col_flip)) if f)
        return self._flip(out, flips)

    def from_display(self, arr: Any) -> Any:
        """Inverse of :meth:`to_display`: ``(…, N, R, C)`` → ``(…, D, H, W)``."""
        lead = arr.ndim - 3
        flips = tuple(d for d, f in ((lead + 1, self.row_flip), (lead + 2, self.col_flip)) if f)
        arr = self._flip(arr, flips)
        src = [lead, lead + 1, lead + 2]
        dst = [lead + self.slice_axis, lead + self.row_axis, lead + self.col_axis]
        return arr.movedim(src, dst) if hasattr(arr, "movedim") else np.moveaxis(arr, src, dst)

    def slice(self, vol: Any, index: int) -> Any:
        """Display slice ``index`` of ``(…, D, H, W)`` → ``(…, R, C)``."""
        return self.to_display(vol)[..., int(index), :, :]


def view_geometry(affine: np.ndarray, view: str, spacing: Any | None = None) -> ViewGeometry:
    """Display geometry of ``view`` for data stored with ``affine``.

    Args:
        affine: (4, 4) voxel → RAS+ world.
        view: one of :data:`trifuse.semantic.schema.VIEWS`.
        spacing: (3,) mm per array axis; default the affine's column norms.
    """
    if view not in _VIEW_AXES:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    ornt = _axis_orientation(affine)
    world_to_array = {int(w): a for a, (w, _) in enumerate(ornt)}
    sign = {a: int(s) for a, (_, s) in enumerate(ornt)}
    normal, row_w, col_w = _VIEW_AXES[view]
    s_ax, r_ax, c_ax = world_to_array[normal], world_to_array[row_w], world_to_array[col_w]
    sp = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0) if spacing is None else np.asarray(spacing, float)
    # descending world coordinate on screen: flip where index increases with the world axis
    return ViewGeometry(view, s_ax, r_ax, c_ax, row_flip=sign[r_ax] > 0, col_flip=sign[c_ax] > 0,
                        row_mm=float(sp[r_ax]), col_mm=float(sp[c_ax]))


# --------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------
def _window(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Float slice → uint8 with a 1–99 percentile window over brain pixels; 0 outside."""
    vals = img[mask] if mask.sum() >= 10 else img.ravel()
    lo, hi = (np.percentile(vals, [1.0, 99.0]) if vals.size else (0.0, 1.0))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    out = np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0
    out[~mask] = 0.0
    return np.round(out).astype(np.uint8)


def render_grid(raw: np.ndarray, brain: np.ndarray, row_mm: float, col_mm: float,
                panel_px: int = 256) -> tuple[np.ndarray, float]:
    """2×2 grid of the four contrasts, physical aspect kept, unannotated.

    Args:
        raw: (4, R, C) float slice in :data:`trifuse.keys.MODALITIES` order.
        brain: (R, C) bool.
        row_mm, col_mm: pixel size of ``raw`` in mm.
        panel_px: side of each square panel in pixels.

    Returns:
        ``(grid, mm_per_px)``: uint8 ``(2·panel_px, 2·panel_px)`` and the rendered pixel size.
    """
    from PIL import Image

    R, C = raw.shape[-2:]
    mm_per_px = max(R * row_mm, C * col_mm) / panel_px
    h = max(1, int(round(R * row_mm / mm_per_px)))
    w = max(1, int(round(C * col_mm / mm_per_px)))
    grid = np.zeros((2 * panel_px, 2 * panel_px), dtype=np.uint8)
    for k, ch in enumerate(PANEL_ORDER):
        img = Image.fromarray(_window(raw[ch], brain)).resize((w, h), Image.Resampling.BILINEAR)
        r0 = (k // 2) * panel_px + (panel_px - h) // 2
        c0 = (k % 2) * panel_px + (panel_px - w) // 2
        grid[r0:r0 + h, c0:c0 + w] = np.asarray(img)
    return grid, float(mm_per_px)


def _annotate(grid: np.ndarray, view: str, panel_px: int) -> np.ndarray:
    """Contrast names and orientation letters on each panel (PIL default font)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(grid)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(10, panel_px // 16))
    except TypeError:  # old Pillow without sized default font
        font = ImageFont.load_default()
    left, right = _EDGE_LETTERS[view]
    for k, name in enumerate(PANEL_NAMES):
        r0, c0 = (k // 2) * panel_px, (k % 2) * panel_px
        draw.text((c0 + 4, r0 + 2), name, fill=255, font=font)
        draw.text((c0 + 4, r0 + panel_px // 2), left, fill=200, font=font)
        draw.text((c0 + panel_px - 4 - panel_px // 24, r0 + panel_px // 2), right, fill=200, font=font)
    return np.asarray(img)


def image_hash(grid: np.ndarray, view: str, mm_per_px: float) -> str:
    """sha256 of the rendered (unannotated) pixels, their layout and scale.

    Hashing pixels rather than PNG bytes keeps the cache valid across zlib/Pillow
    versions; the annotation is a fixed function of ``view`` and is covered by it.
    """
    h = hashlib.sha256()
    h.update(f"{RENDER_VERSION}|{view}|{grid.shape}|{mm_per_px:.6f}|".encode())
    h.update(np.ascontiguousarray(grid, dtype=np.uint8).tobytes())
    return h.hexdigest()


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 (H, W) → grayscale PNG bytes (deterministic settings)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViewSlice:
    """The slice through the abnormality in one view.

    Attributes:
        view: view name.
        index: slice index along ``geometry.slice_axis`` in the (cropped) sample grid.
        index_original: the same in the original full-volume grid.
        geometry: the display mapping (see :class:`ViewGeometry`).
        raw: (4, R, C) float32 display-oriented slice, :data:`trifuse.keys.MODALITIES` order.
        brain: (R, C) bool.
        png: 2×2 four-contrast PNG (T1 | T1ce / T2 | FLAIR), grayscale.
        image_hash: :func:`image_hash` of the rendered pixels (cache key part).
        mm_per_px: rendered pixel size in mm (same in both directions).
        size_px: (width, height) of the PNG.
    """

    view: str
    index: int
    index_original: int
    geometry: ViewGeometry
    raw: np.ndarray = field(repr=False)
    brain: np.ndarray = field(repr=False)
    png: bytes = field(repr=False)
    image_hash: str
    mm_per_px: float
    size_px: tuple[int, int]

    @property
    def panel_fov_mm(self) -> float:
        """Side of one square panel in mm."""
        return self.mm_per_px * self.size_px[0] / 2


def _slice_index(mask: np.ndarray, centroid: tuple[float, ...], axis: int) -> int:
    """Slice through ``centroid``; if the abnormality misses it (non-convex shape), the
    nearest slice that contains the abnormality."""
    idx = int(round(centroid[axis]))
    idx = min(max(idx, 0), mask.shape[axis] - 1)
    if mask.any():
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if idx not in set(present.tolist()):
            idx = int(present[np.argmin(np.abs(present - idx))])
    return idx


def extract_view_slices(sample: Mapping[str, Any], abnormality: Abnormality | None = None,
                        views: tuple[str, ...] = VIEWS, panel_px: int = 256,
                        render: bool = True) -> dict[str, ViewSlice]:
    """The slice through the abnormality in each view, raw and rendered.

    Args:
        sample: sample dict (:data:`trifuse.keys.MRI`, optional ``BRAIN`` and ``META``).
        abnormality: precomputed :func:`find_abnormality` result (computed if ``None``).
        views: which views.
        panel_px: panel side of the 2×2 PNG (default 256 → a 512×512 image, which an
            OpenAI ``detail="low"`` request sees at full resolution).
        render: build PNG and hash (``False``: raw slices only, e.g. for CLIP).

    Returns:
        view → :class:`ViewSlice`.
    """
    mri, brain, geo = sample_arrays(sample)
    abn = abnormality if abnormality is not None else find_abnormality(mri, brain, geo.spacing)
    out: dict[str, ViewSlice] = {}
    for view in views:
        vg = view_geometry(geo.affine, view, geo.spacing)
        idx = _slice_index(abn.mask, abn.slice_centre, vg.slice_axis)
        raw = np.ascontiguousarray(vg.slice(mri, idx), dtype=np.float32)
        bslice = np.ascontiguousarray(vg.slice(brain, idx))
        png, hsh, mmpx, size = b"", "", 0.0, (0, 0)
        if render:
            grid, mmpx = render_grid(raw, bslice, vg.row_mm, vg.col_mm, panel_px)
            hsh = image_hash(grid, view, mmpx)
            png = encode_png(_annotate(grid, view, panel_px))
            size = (grid.shape[1], grid.shape[0])
        out[view] = ViewSlice(view, idx, idx + int(geo.offset[vg.slice_axis]), vg, raw, bslice,
                              png, hsh, mmpx, size)
    return out


def iter_view_slices(sample: Mapping[str, Any], view: str, step: int = 1,
                     min_brain_fraction: float = 0.0) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Every display slice of one view, for CLIP training and priors.

    Args:
        sample: sample dict.
        view: view name.
        step: take every ``step``-th slice.
        min_brain_fraction: skip slices with a smaller brain-pixel fraction.

    Yields:
        ``(index, raw (4, R, C) float32, brain (R, C) bool)``; ``index`` along the view's
        slice axis in the sample grid (put maps back with
        ``view_geometry(...).from_display``).
    """
    mri, brain, geo = sample_arrays(sample)
    vg = view_geometry(geo.affine, view, geo.spacing)
    disp, bdisp = vg.to_display(mri), vg.to_display(brain)
    for n in range(0, disp.shape[1], max(1, int(step))):
        b = bdisp[n]
        if min_brain_fraction > 0 and b.mean() < min_brain_fraction:
            continue
        yield n, np.ascontiguousarray(disp[:, n], dtype=np.float32), np.ascontiguousarray(b)
