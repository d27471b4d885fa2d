"""Cached distillation targets: each frozen teacher's response maps and bottleneck, once per case.

Teachers are frozen, so their outputs over a cached case never change. :class:`TeacherTargetCache`
computes them once by sliding-window inference over the whole cropped case and stores them
next to the data cache::

    <cache_dir>/teacher_targets/<modality>/stamp.json          teacher checkpoint (SHA-256), ROI, overlap
    <cache_dir>/teacher_targets/<modality>/<case_id>.logits.npy      (3, D', H', W') float16
    <cache_dir>/teacher_targets/<modality>/<case_id>.bottleneck.npy  (C, D'/8, H'/8, W'/8) float16
    <cache_dir>/teacher_targets/<modality>/<case_id>.json           padding of the case, fill values

The case is zero-padded (centred, like a training patch) to a multiple of the bottleneck
stride and at least the ROI, so windows start on the bottleneck grid and the bottleneck map is
exactly 1/8 of the padded case. Files are written atomically (temporary file + rename) and a
second build skips finished cases. A folder stamped by another teacher checkpoint is refused.

At training time :meth:`TeacherTargetCache.crop` replays on the stored maps the spatial
steps recorded in the patch's meta, exactly as the label went through them
(:func:`patch_geometry`): the crop ``patch_box`` with its zero padding, flips, and the
rotation and scaling of :class:`~trifuse.transforms.RandomAugment` and
:class:`~trifuse.transforms.NNUNetAugment`. Logits are resampled trilinearly at the
patch's voxels; the bottleneck by the same geometric map on its own 1/8 grid (see
:meth:`TeacherTargetCache.crop` for how and why). No patch falls back to online targets.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys

log = logging.getLogger(__name__)

STRIDE = 8  # bottleneck stride of the SegResNet/DynUNet backbones (3 downsamplings)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """The shared atomic writer (writer-tagged temporary, fsync, rename; a full disk names the
    folder): a killed build leaves no partial target under a final name, and its rerun redoes the case."""
    from trifuse.io.nifti import atomic_file

    with atomic_file(path) as fh:
        np.save(fh, arr)


def _save_json(path: Path, obj) -> None:
    from trifuse.io.nifti import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def centred_pad(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis, as the training patches are padded (extra // 2 first)."""
    return [((max(0, z - s)) // 2, max(0, z - s) - max(0, z - s) // 2) for s, z in zip(shape, size)]


def background_fill(x: torch.Tensor, logits: torch.Tensor, bottleneck: torch.Tensor) -> tuple[list[float], list[float]]:
    """The teacher's response to empty input in one case: per-channel medians of its logits over
    the voxels where every input channel is 0, and of its bottleneck over the cells made of such
    voxels only (``x`` ``(C_in, D, H, W)`` the padded case; zeros when a case has none).

    Patches read these where augmentation took them outside the crop (the image is 0 there).
    """
    empty = (x == 0).all(0)
    fill_l = logits[:, empty].float().median(1).values if bool(empty.any()) else torch.zeros(logits.shape[0])
    cells = F.max_pool3d((~empty).float()[None, None], STRIDE, ceil_mode=True)[0, 0] == 0
    cells = cells[tuple(slice(0, n) for n in bottleneck.shape[1:])]
    fill_b = bottleneck[:, cells].float().median(1).values if bool(cells.any()) else torch.zeros(bottleneck.shape[0])
    return [float(v) for v in fill_l], [float(v) for v in fill_b]


class StaleTargetCache(RuntimeError):
    """The cached targets were made by another teacher checkpoint."""


class TeacherTargetCache:
    """Per-case response maps and bottleneck features of one frozen teacher.

    Args:
        root: ``<cache_dir>/teacher_targets/<modality>``.
        checkpoint: the teacher checkpoint the targets belong to (its SHA-256 stamps the folder).
        roi_size: sliding-window ROI (voxels; multiples of 8).
        overlap: sliding-window overlap (Gaussian blending, as the teachers' validation).
    """

    def __init__(self, root: str | os.PathLike, checkpoint: str | os.PathLike, roi_size: Sequence[int] = (128, 128, 128), overlap: float = 0.5):
        self.root = Path(root)
        self.checkpoint = str(checkpoint)
        self.roi_size = tuple(int(r) for r in roi_size)
        if any(r % STRIDE for r in self.roi_size):
            raise ValueError(f"cached targets need an ROI in multiples of {STRIDE}, got {self.roi_size}")
        self.overlap = float(overlap)
        self.stamp = {"checkpoint_sha256": file_sha256(checkpoint), "roi_size": list(self.roi_size), "overlap": self.overlap, "stride": STRIDE}

    # --- building ---------------------------------------------------------------------
    def check_stamp(self) -> None:
        """Create the folder's stamp, or refuse a folder stamped by another checkpoint/setting.

        Temporaries left by a killed build (tagged with a dead writer) are removed first.
        """
        from trifuse.io.nifti import sweep_dead_temps

        self.root.mkdir(parents=True, exist_ok=True)
        sweep_dead_temps(self.root)
        path = self.root / "stamp.json"
        if path.exists():
            have = json.loads(path.read_text())
            if have != self.stamp:
                raise StaleTargetCache(
                    f"{self.root}: cached teacher targets were made by another teacher checkpoint or setting "
                    f"({have.get('checkpoint_sha256', '?')[:12]} vs {self.checkpoint} {self.stamp['checkpoint_sha256'][:12]}); "
                    f"delete the folder to rebuild them, or train with distill mode online"
                )
        else:
            _save_json(path, self.stamp)

    def done(self, case_id: str) -> bool:
        if not all((self.root / f"{case_id}.{n}").exists() for n in ("logits.npy", "bottleneck.npy", "json")):
            return False
        try:  # a case written before the fill values were stored is redone
            return "fill_logits" in self._info(case_id)
        except (OSError, ValueError):
            return False

    @torch.no_grad()
    def build(self, teacher, samples, device: torch.device, dtype: Optional[torch.dtype] = None) -> int:
        """Compute and store the targets of every sample not done yet; returns how many were written.

        Args:
            teacher: a frozen :class:`~trifuse.lightning.teacher.TeacherModule`.
            samples: iterable of whole cropped cases (sample dicts with the teacher's inputs, ``(C, D, H, W)``).
            device: where to run the teacher.
            dtype: autocast dtype on CUDA (None: fp32).
        """
        from monai.inferers import sliding_window_inference

        self.check_stamp()
        written = 0
        for sample in samples:
            cid = sample[keys.CASE_ID]
            if self.done(cid):
                continue
            x = teacher.net_input({k: torch.as_tensor(v)[None] for k, v in sample.items() if torch.is_tensor(v) or isinstance(v, np.ndarray)}).to(device)
            shape = x.shape[2:]
            size = [max(r, -(-s // STRIDE) * STRIDE) for s, r in zip(shape, self.roi_size)]
            pad = centred_pad(shape, size)
            flat = [p for pair in reversed(pad) for p in pair]
            xp = F.pad(x, flat)

            def predictor(w):
                logits, feats = teacher.net(w, return_features=True)
                return logits.float(), feats["bottleneck"].float()

            amp = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None and device.type == "cuda")
            with amp:
                logits, bott = sliding_window_inference(xp, self.roi_size, 1, predictor, self.overlap, mode="gaussian")
            logits, bott = logits[0].cpu().half(), bott[0].cpu().half()
            fill_l, fill_b = background_fill(xp[0].cpu(), logits, bott)
            _save_npy(self.root / f"{cid}.logits.npy", logits.numpy())
            _save_npy(self.root / f"{cid}.bottleneck.npy", bott.numpy())
            info = {"case_id": cid, "shape": list(shape), "pad_before": [p[0] for p in pad], "padded": list(size),
                    "fill_logits": fill_l, "fill_bottleneck": fill_b}
            _save_json(self.root / f"{cid}.json", info)  # last: it marks the case done
            written += 1
        return written

    # --- reading ----------------------------------------------------------------------
    @staticmethod
    def replayable(meta: dict) -> bool:
        """True when the patch's targets can be cut from the stored maps: it has a recorded ``patch_box``.

        Every spatial step the loader records is replayed (:func:`patch_geometry`): the crop and
        its zero padding, flips, :class:`~trifuse.transforms.RandomAugment`'s rotation and
        :class:`~trifuse.transforms.NNUNetAugment`'s rotation and scaling.
        """
        return meta.get("patch_box") is not None

    def _info(self, case_id: str) -> dict:
        return json.loads((self.root / f"{case_id}.json").read_text())

    def crop(self, case_id: str, meta: dict, patch_size: Sequence[int], bottleneck_size: Sequence[int],
             device: torch.device = torch.device("cpu")) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets of one patch: logits ``(3, *patch_size)`` and bottleneck ``(C, *bottleneck_size)``,
        fp32 on ``device`` (the stored region is moved there as float16 and resampled there).

        The patch's recorded spatial augmentation is replayed on the stored maps exactly as on
        its label (:func:`patch_geometry`: output voxel ``o`` of the patch was read at case voxel
        ``x = M o + t``):

        * logits: sampled at ``x`` trilinearly (the label is sampled there by nearest neighbour,
          the image trilinearly); pure crops and flips are copied without interpolation;
        * bottleneck: the feature map lives on the 1/8 grid, cell ``k`` of a patch standing for
          its voxels ``8k … 8k+7`` (centre ``8k + 3.5``). The same map moves that centre to
          ``M (8k + 3.5) + t`` in the case, i.e. cell ``M k + (M·3.5 + t − 3.5)/8`` of the stored
          map: the same rotation and scaling ``M``, the translation scaled to the coarser grid,
          sampled trilinearly there. The channels are left as they are (features are not
          vectors in space), so a rotated patch gets the case's features moved to where the
          patch's cells are, which is what the online teacher's bottleneck of the rotated
          patch approximates (a CNN is equivariant to translations only; the tests measure how
          close it is). The alternative, resampling a stored full-resolution feature map,
          would need 8³ times the storage.
        * wherever the patch read outside the crop the loader took from the case (the
          zero-filled corners of a rotated patch, padding beyond the stored maps), the image
          and label are 0; the targets there are the teacher's response to empty input in
          this case (``fill_*`` of the case's JSON: the median over its background voxels /
          cells), blended at the crop's edge by the same trilinear weights as the image.
        """
        info = self._info(case_id)
        if "fill_logits" not in info:
            raise ValueError(f"{self.root / case_id}.json: cached targets of an older format; rebuild them (prepare_cache)")
        geo = patch_geometry(meta, patch_size)
        pb = np.asarray(info["pad_before"], dtype=np.float64)
        m, t = geo.matrix, geo.offset + pb  # output patch voxel -> stored (padded) voxel
        domain = [(max(0, lo + int(p)), min(int(n), hi + int(p))) for (lo, hi), p, n in zip(geo.crop, pb, info["padded"])]
        logits = np.load(self.root / f"{case_id}.logits.npy", mmap_mode="r")
        out_logits = _resample(logits, m, t, patch_size, domain, info["fill_logits"], device)
        h = (STRIDE - 1) / 2
        t_b = (m @ np.full(3, h) + t - h) / STRIDE
        domain_b = [(lo // STRIDE, -(-hi // STRIDE)) for lo, hi in domain]
        bott = np.load(self.root / f"{case_id}.bottleneck.npy", mmap_mode="r")
        out_bott = _resample(bott, m, t_b, bottleneck_size, domain_b, info["fill_bottleneck"], device)
        return out_logits, out_bott


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


def _read(store: np.ndarray, sl: Sequence[slice], device: torch.device) -> torch.Tensor:
    """``store[:, sl]`` as fp32 on ``device`` (float16 copied as is, converted by torch: numpy's
    half conversion is several times slower)."""
    return torch.from_numpy(np.array(store[(slice(None), *sl)])).to(device).float()


def _resample(store: np.ndarray, m: np.ndarray, t: np.ndarray, out_size: Sequence[int], domain, fill,
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
            out = _read(store, [slice(a, a + p) for a, p in zip(lo, out_size)], device)
            flips = [1 + i for i, s in enumerate(signs) if s < 0]
            return out.flip(flips) if flips else out
    corners = np.stack(np.meshgrid(*[[0, p - 1] for p in out_size], indexing="ij")).reshape(3, -1).astype(np.float64)
    x = m @ corners + t[:, None]
    lo = [max(d0, int(np.floor(v))) for v, (d0, _) in zip(x.min(1), domain)]
    hi = [min(d1, int(np.floor(v)) + 2) for v, (_, d1) in zip(x.max(1), domain)]
    if any(b <= a for a, b in zip(lo, hi)):
        return fill_t.expand(-1, *out_size).clone()
    region = _read(store, [slice(a, b) for a, b in zip(lo, hi)], device) - fill_t
    # index maps -> grid_sample's normalised coordinates (align_corners=False: index i <-> (2i + 1)/n - 1)
    n = np.asarray(region.shape[1:], dtype=np.float64)
    p = np.asarray(out_size, dtype=np.float64)
    a = np.diag(2 / n) @ m @ np.diag(p / 2)
    b = np.diag(2 / n) @ (m @ ((p - 1) / 2) + t - np.asarray(lo)) + 1 / n - 1
    theta = torch.zeros(1, 3, 4, dtype=torch.float64)
    theta[0, :, :3] = torch.from_numpy(a[::-1, ::-1].copy())  # grid_sample's x, y, z are W, H, D
    theta[0, :, 3] = torch.from_numpy(b[::-1].copy())
    grid = F.affine_grid(theta.float().to(device), (1, region.shape[0], *out_size), align_corners=False)
    return F.grid_sample(region[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + fill_t
