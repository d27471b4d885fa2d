"""Where a training patch came from in its case, and resampling of case-level maps onto it.

The patch loader records every spatial step in ``meta["applied"]``: the crop ``patch_box``
with its centred zero padding (``RandomPatch``), the flips and rotation of
:class:`~trifuse.transforms.RandomAugment`, the rotation and scaling of the larger crop and
the flips of :class:`~trifuse.transforms.NNUNetAugment`. :func:`patch_geometry` composes them
into one affine map, output patch voxel ``o`` read case voxel ``x = M o + t``, so that any map
over the case can be resampled exactly as the label and image were: the teacher-target cache
(:mod:`trifuse.lightning.target_cache`, logits and the 1/8 bottleneck) and the semantic
priors (:mod:`trifuse.semantic.prior_transforms`, a coarser grid) both use it.
:func:`regrid` carries the map onto grids of coarser cells (a cell of ``s`` voxels, centre
``s k + (s − 1)/2``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F


class PatchGeometry(NamedTuple):
    """Where a training patch came from in its cropped case.

    Attributes:
        matrix, offset: output patch voxel ``o`` (index ``(d, h, w)``) was read at case voxel
            ``x = matrix @ o + offset`` (cropped-case indices, float).
        crop: ``[lo, hi)`` per axis (case voxels, may reach outside the case: the loader's
            zero padding): the crop the patch was resampled from; it read zeros elsewhere.
    """

    matrix: np.ndarray
    offset: np.ndarray
    crop: list[tuple[int, int]]


def _flip_map(axes: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    m, t = np.eye(3), np.zeros(3)
    for ax in axes:
        m[ax, ax], t[ax] = -1.0, size[ax] - 1
    return m, t


def _centred_map(a: np.ndarray, size_in: Sequence[int], size_out: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's convention for ``Rotate``/``Affine``: ``x_in = A (o − (n_out − 1)/2) + (n_in − 1)/2``."""
    c_in = (np.asarray(size_in, dtype=np.float64) - 1) / 2
    c_out = (np.asarray(size_out, dtype=np.float64) - 1) / 2
    return a, c_in - a @ c_out


def patch_geometry(meta: dict, patch_size: Sequence[int]) -> PatchGeometry:
    """Compose the spatial steps recorded in ``meta`` (crop, padding, augmentation) into one affine map.

    Replays, in their order: ``RandomPatch`` (the box of the crop, zero-padded centred to the
    crop size), :class:`~trifuse.transforms.RandomAugment` (flips, then rotation about the
    patch centre, keeping its size) and :class:`~trifuse.transforms.NNUNetAugment` (rotation
    and scaling of the larger crop to the centred patch, then flips). Other recorded
    transforms do not move voxels.
    """
    from trifuse.transforms import NNUNetAugment, affine_matrix

    patch = tuple(int(p) for p in patch_size)
    applied = meta.get("applied", [])
    box = [[int(a), int(b)] for a, b in meta["patch_box"]]
    nn_aug = next((a for a in applied if a.get("name") == "NNUNetAugment"), None)
    patch_rec = next((a for a in applied if a.get("name") == "RandomPatch"), {})
    if "size" in patch_rec:
        size = tuple(int(s) for s in patch_rec["size"])
    elif nn_aug is not None:  # older records: the crop size NNUNetAugment asked the loader for
        size = NNUNetAugment().input_size(patch, nn_aug)
    else:
        size = patch
    start = [a - (s - (b - a)) // 2 for (a, b), s in zip(box, size)]  # _pad_to puts extra // 2 before
    m, t = np.eye(3), np.asarray(start, dtype=np.float64)
    crop = [(s0, s0 + s) for s0, s in zip(start, size)]
    cur = size

    def then(step):  # x = m (m_s o + t_s) + t
        nonlocal m, t
        m_s, t_s = step
        m, t = m @ m_s, m @ t_s + t

    for a in applied:
        name = a.get("name")
        if name == "RandomAugment":
            if a.get("flip_axes"):
                then(_flip_map(a["flip_axes"], cur))
            if "rotate_rad" in a:
                then(_centred_map(affine_matrix(a["rotate_rad"]).numpy(), cur, cur))  # (its "scale" is an intensity scale)
        elif name == "NNUNetAugment":
            if "rotate_rad" in a or "scale" in a:
                then(_centred_map(affine_matrix(a.get("rotate_rad"), a.get("scale")).numpy(), cur, patch))
            elif tuple(cur) != patch:  # centre crop of a larger input
                then((np.eye(3), np.asarray([(n - q) // 2 for n, q in zip(cur, patch)], dtype=np.float64)))
            cur = patch
            if a.get("flip_axes"):
                then(_flip_map(a["flip_axes"], cur))
    if tuple(cur) != patch:
        raise ValueError(f"patch of {patch} voxels, but its recorded crop and augmentation give {tuple(cur)}")
    return PatchGeometry(m, t, crop)


def read(store: np.ndarray, sl: Sequence[slice], device: torch.device) -> torch.Tensor:
    """``store[:, sl]`` as fp32 on ``device`` (float16 copied as is, converted by torch: numpy's
    half conversion is several times slower)."""
    return torch.from_numpy(np.array(store[(slice(None), *sl)])).to(device).float()


def resample(store: np.ndarray, m: np.ndarray, t: np.ndarray, out_size: Sequence[int], domain, fill,
              device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """``out[:, o] = store[:, m @ o + t]`` (trilinear) for ``o`` over ``out_size``, fp32 on ``device``.

    Only ``domain`` (``[lo, hi)`` per axis of ``store``) is read; outside it the value is
    ``fill`` (per channel), blended at the edge by the trilinear weights (as MONAI's zero
    padding blends the image). A signed-identity ``m`` with an integral ``t`` inside the domain
    (crops and flips) is copied, without interpolation.
    """
    out_size = tuple(int(s) for s in out_size)
    fill_t = torch.as_tensor(fill, dtype=torch.float32, device=device)[:, None, None, None]
    signs, t_int = np.diag(m), np.round(t)
    if np.allclose(np.abs(m), np.eye(3)) and np.allclose(t, t_int, atol=1e-6):
        lo = [int(ti) if s > 0 else int(ti) - p + 1 for s, ti, p in zip(signs, t_int, out_size)]
        if all(d0 <= a and a + p <= d1 for a, p, (d0, d1) in zip(lo, out_size, domain)):
            out = read(store, [slice(a, a + p) for a, p in zip(lo, out_size)], device)
            flips = [1 + i for i, s in enumerate(signs) if s < 0]
            return out.flip(flips) if flips else out
    corners = np.stack(np.meshgrid(*[[0, p - 1] for p in out_size], indexing="ij")).reshape(3, -1).astype(np.float64)
    x = m @ corners + t[:, None]
    lo = [max(d0, int(np.floor(v))) for v, (d0, _) in zip(x.min(1), domain)]
    hi = [min(d1, int(np.floor(v)) + 2) for v, (_, d1) in zip(x.max(1), domain)]
    if any(b <= a for a, b in zip(lo, hi)):
        return fill_t.expand(-1, *out_size).clone()
    region = read(store, [slice(a, b) for a, b in zip(lo, hi)], device) - fill_t
    return sample_affine(region, m, t - np.asarray(lo, dtype=np.float64), out_size) + fill_t


def sample_affine(region: torch.Tensor, m: np.ndarray, t: np.ndarray, out_size: Sequence[int],
                  padding_mode: str = "zeros") -> torch.Tensor:
    """``out[:, o] = region[:, m @ o + t]`` for ``o`` over ``out_size`` (``region`` ``(C, *n)``;
    trilinear, ``grid_sample``'s ``padding_mode`` outside ``region``)."""
    out_size = tuple(int(s) for s in out_size)
    # index maps -> grid_sample's normalised coordinates (align_corners=False: index i <-> (2i + 1)/n - 1)
    n = np.asarray(region.shape[1:], dtype=np.float64)
    p = np.asarray(out_size, dtype=np.float64)
    a = np.diag(2 / n) @ m @ np.diag(p / 2)
    b = np.diag(2 / n) @ (m @ ((p - 1) / 2) + t) + 1 / n - 1
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = torch.from_numpy(a[::-1, ::-1].copy())  # grid_sample's x, y, z are W, H, D
    theta[0, :, 3] = torch.from_numpy(b[::-1].copy())
    grid = F.affine_grid(theta.float().to(region.device), (1, region.shape[0], *out_size), align_corners=False)
    return F.grid_sample(region[None], grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)[0]


def regrid(m: np.ndarray, t: np.ndarray, cell_out: Sequence[float] | float, cell_in: Sequence[float] | float) -> tuple[np.ndarray, np.ndarray]:
    """The voxel map ``x = m o + t`` between grids of coarser cells.

    Cell ``k`` of a grid whose cells span ``s`` voxels (per axis) stands for those voxels, its
    centre at voxel ``s k + (s − 1)/2``. With output cells of ``cell_out`` voxels and input
    cells of ``cell_in`` voxels, output cell ``k`` reads input cell ``m' k + t'``: the same
    geometric map, expressed in cell indices. ``cell_out = cell_in = 8``: the bottleneck;
    ``cell_in = 1``: the voxel position of each output cell's centre.
    """
    s_o = np.broadcast_to(np.asarray(cell_out, dtype=np.float64), (3,))
    s_i = np.broadcast_to(np.asarray(cell_in, dtype=np.float64), (3,))
    m2 = np.diag(1 / s_i) @ m @ np.diag(s_o)
    t2 = (m @ ((s_o - 1) / 2) + t - (s_i - 1) / 2) / s_i
    return m2, t2
