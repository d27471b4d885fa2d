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
(:func:`trifuse.geometry.patch_geometry`): the crop ``patch_box`` with its zero padding, flips, and the
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
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.geometry import PatchGeometry, patch_geometry, regrid, resample as _resample  # noqa: F401 (re-exported: PatchGeometry, patch_geometry)

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
        sw_batch_size: windows per teacher forward pass. Not 1 on CPU: PyTorch's fp32 CPU
            ``Conv3d`` (``slow_conv3d``) spreads its threads over the batch, so one window at a
            time runs on one core (a 48³ window of the demo teacher: 0.50 s alone, 0.076 s in a
            batch of 2, torch 2.13 on 2 cores). The stored values do not depend on it.
    """

    def __init__(self, root: str | os.PathLike, checkpoint: str | os.PathLike, roi_size: Sequence[int] = (128, 128, 128), overlap: float = 0.5,
                 sw_batch_size: int = 2):
        self.root = Path(root)
        self.checkpoint = str(checkpoint)
        self.roi_size = tuple(int(r) for r in roi_size)
        if any(r % STRIDE for r in self.roi_size):
            raise ValueError(f"cached targets need an ROI in multiples of {STRIDE}, got {self.roi_size}")
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
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
                logits, bott = sliding_window_inference(xp, self.roi_size, self.sw_batch_size, predictor, self.overlap, mode="gaussian")
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

        Every spatial step the loader records is replayed (:func:`trifuse.geometry.patch_geometry`): the crop and
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
        m_b, t_b = regrid(m, t, STRIDE, STRIDE)  # = (m, (m·3.5 + t − 3.5)/8)
        domain_b = [(lo // STRIDE, -(-hi // STRIDE)) for lo, hi in domain]
        bott = np.load(self.root / f"{case_id}.bottleneck.npy", mmap_mode="r")
        out_bott = _resample(bott, m_b, t_b, bottleneck_size, domain_b, info["fill_bottleneck"], device)
        return out_logits, out_bott
