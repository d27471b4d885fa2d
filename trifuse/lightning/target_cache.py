"""Cached distillation targets: each frozen teacher's response maps and bottleneck, once per case.

Teachers are frozen, so their outputs over a cached case never change. :class:`TeacherTargetCache`
computes them once by sliding-window inference over the whole cropped case and stores them
next to the data cache::

    <cache_dir>/teacher_targets/<modality>/stamp.json          teacher checkpoint (SHA-256), ROI, overlap
    <cache_dir>/teacher_targets/<modality>/<case_id>.logits.npy      (3, D', H', W') float16
    <cache_dir>/teacher_targets/<modality>/<case_id>.bottleneck.npy  (C, D'/8, H'/8, W'/8) float16
    <cache_dir>/teacher_targets/<modality>/<case_id>.json           padding of the case

The case is zero-padded (centred, like a training patch) to a multiple of the bottleneck
stride and at least the ROI, so windows start on the bottleneck grid and the bottleneck map is
exactly 1/8 of the padded case. Files are written atomically (temporary file + rename) and a
second build skips finished cases. A folder stamped by another teacher checkpoint is refused.

At training time :meth:`TeacherTargetCache.crop` cuts a patch's targets out of the case maps by
its recorded ``patch_box`` (zero-padded patches included) and replays its flips. Patches whose
augmentation moved voxels otherwise (rotation, scaling) cannot be replayed on the stored maps
(:meth:`replayable` says so) and get online targets from the teachers instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

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


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    _atomic_write(path, write)


def _save_json(path: Path, obj) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))


def centred_pad(shape: Sequence[int], size: Sequence[int]) -> list[tuple[int, int]]:
    """(before, after) zero padding per axis, as the training patches are padded (extra // 2 first)."""
    return [((max(0, z - s)) // 2, max(0, z - s) - max(0, z - s) // 2) for s, z in zip(shape, size)]


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
        """Create the folder's stamp, or refuse a folder stamped by another checkpoint/setting."""
        self.root.mkdir(parents=True, exist_ok=True)
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
        return all((self.root / f"{case_id}.{n}").exists() for n in ("logits.npy", "bottleneck.npy", "json"))

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
            _save_npy(self.root / f"{cid}.logits.npy", logits[0].cpu().numpy().astype(np.float16))
            _save_npy(self.root / f"{cid}.bottleneck.npy", bott[0].cpu().numpy().astype(np.float16))
            _save_json(self.root / f"{cid}.json", {"case_id": cid, "shape": list(shape), "pad_before": [p[0] for p in pad], "padded": list(size)})
            written += 1
        return written

    # --- reading ----------------------------------------------------------------------
    @staticmethod
    def replayable(meta: dict) -> bool:
        """True when the patch's augmentation is crops and flips only (replayable on stored maps)."""
        for a in meta.get("applied", []):
            name = a.get("name")
            if name == "RandomAugment" and "rotate_rad" in a:
                return False
            if name == "NNUNetAugment" and ("rotate_rad" in a or "scale" in a):
                return False
        return meta.get("patch_box") is not None

    def crop(self, case_id: str, meta: dict, patch_size: Sequence[int], bottleneck_size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets of one patch: logits ``(3, *patch_size)`` and bottleneck ``(C, *bottleneck_size)``, fp32.

        The patch box is in cropped-case voxels; parts of a patch outside the case (patches
        padded because the case is smaller) map onto the stored padding.
        """
        info = json.loads((self.root / f"{case_id}.json").read_text())
        logits = np.load(self.root / f"{case_id}.logits.npy", mmap_mode="r")
        bott = np.load(self.root / f"{case_id}.bottleneck.npy", mmap_mode="r")
        box = meta["patch_box"]
        starts, stops = [], []
        for (a, b), p, pb, n, s in zip(box, patch_size, info["pad_before"], info["padded"], info["shape"]):
            if b - a >= p:  # a larger input crop, centre-cropped to the patch (NNUNetAugment)
                start = pb + a + (b - a - p) // 2
            else:  # the patch was zero-padded (centred) to patch_size
                start = pb + a - (p - (b - a)) // 2
            if start < 0 or start + p > n:
                raise ValueError(f"{case_id}: patch box {box} outside the stored targets (padded case {info['padded']})")
            starts.append(start)
            stops.append(start + p)
        sl = tuple(slice(a, b) for a, b in zip(starts, stops))
        out_logits = torch.from_numpy(np.array(logits[(slice(None), *sl)], dtype=np.float32))
        # bottleneck: the patch's region on the 1/8 grid; exact when the box starts on the grid,
        # else trilinear resampling of the covering cells
        lo = [a // STRIDE for a in starts]
        hi = [-(-b // STRIDE) for b in stops]
        region = torch.from_numpy(np.array(bott[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])], dtype=np.float32))
        if all(a % STRIDE == 0 for a in starts) and tuple(region.shape[1:]) == tuple(bottleneck_size):
            out_bott = region
        else:
            # continuous coordinates of the patch inside the region, as align_corners=False grid_sample
            theta = torch.zeros(1, 3, 4)
            for i, (a, b, l, h) in enumerate(zip(starts, stops, lo, hi)):
                n = (h - l) * STRIDE
                centre, half = (a + b) / 2 - l * STRIDE, (b - a) / 2
                j = 2 - i  # grid_sample's x, y, z are W, H, D
                theta[0, j, j] = half / (n / 2)
                theta[0, j, 3] = centre / (n / 2) - 1
            grid = F.affine_grid(theta, (1, region.shape[0], *bottleneck_size), align_corners=False)
            out_bott = F.grid_sample(region[None], grid, mode="bilinear", align_corners=False)[0]
        for a in meta.get("applied", []):
            axes = a.get("flip_axes") or []
            if a.get("name") in ("RandomAugment", "NNUNetAugment") and axes:
                dims = [1 + ax for ax in axes]
                out_logits = out_logits.flip(dims)
                out_bott = out_bott.flip(dims)
        return out_logits, out_bott
