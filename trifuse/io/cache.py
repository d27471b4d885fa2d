"""Fast case cache: decode NIfTI.gz once, crop to the brain box, store ``.npy`` memmaps.

NIfTI.gz decoding is the classic BraTS loader bottleneck (gzip inflate of four
~9 M-voxel volumes per case per epoch). The cache stores, per case folder::

    <cache>/<case_id>/mri.npy     (4, D, H, W) float16, z-scored per channel over the brain
    <cache>/<case_id>/seg.npy     (D, H, W) uint8, raw labels in the case's own convention
    <cache>/<case_id>/label.npy   (3, D, H, W) uint8 regions WT, TC, ET (precomputed: no work per load)
    <cache>/<case_id>/brain.npy   (D, H, W) uint8 brain mask
    <cache>/<case_id>/fg.npy      (N, 3) int16 foreground voxel coordinates (for oversampling)
    <cache>/<case_id>/meta.json   geometry, crop box, source fingerprint, intensity stats

Loading uses ``np.load(mmap_mode="r")`` so a patch read touches only the patch's pages.
A case folder is written under a temporary name and renamed when complete, so a
half-written case never looks valid; a case whose source files are unchanged is skipped.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from trifuse import keys
from trifuse.io.discovery import CaseRecord
from trifuse.io.labels import convention, labels_to_regions
from trifuse.io.nifti import disk_full_names, temp_prefix
from trifuse.io.validate import DecodedCase

CACHE_VERSION = 3  # 3: 12 mm margin (2 had 8 mm, thinner than the modelled scalp and skull)
#: room outside the brain for the head layers of the pixel tier (CSF gap + skull + scalp of
#: trifuse.physics.tissues.HeadConfig, 11.5 mm) and the US coupling medium
DEFAULT_MARGIN_MM = 12.0
MAX_FG_POINTS = 20000


def fingerprint(record: CaseRecord) -> dict:
    """Size and mtime of every source file: a changed file invalidates the cached case."""
    out = {}
    for p in record.files():
        st = os.stat(p)
        out[p.name] = [st.st_size, int(st.st_mtime_ns)]
    return out


def brain_box(brain: np.ndarray, spacing, margin_mm: float = DEFAULT_MARGIN_MM) -> list[list[int]]:
    """Bounding box ``[[d0, d1], [h0, h1], [w0, w1]]`` (half-open) of the mask plus a margin."""
    idx = np.nonzero(brain)
    if len(idx[0]) == 0:
        return [[0, s] for s in brain.shape]
    box = []
    for ax, (lo, hi) in enumerate((int(i.min()), int(i.max()) + 1) for i in idx):
        m = int(np.ceil(margin_mm / float(spacing[ax])))
        box.append([max(0, lo - m), min(brain.shape[ax], hi + m)])
    return box


def zscore(volume: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Z-score a volume over ``mask``; zero outside the mask (nnU-Net/BraTS practice)."""
    vals = volume[mask]
    mean = float(vals.mean()) if vals.size else 0.0
    std = float(vals.std()) if vals.size else 1.0
    std = std if std > 1e-8 else 1.0
    out = np.zeros_like(volume, dtype=np.float32)
    out[mask] = (volume[mask] - mean) / std
    return out, mean, std


def is_cached(cache_dir: Path, record: CaseRecord) -> bool:
    """True if the cache holds a complete case made from the current source files."""
    meta_p = Path(cache_dir) / record.case_id / "meta.json"
    if not meta_p.exists():
        return False
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("cache_version") == CACHE_VERSION and meta.get("fingerprint") == fingerprint(record)


def write_case(cache_dir: str | Path, case: DecodedCase, margin_mm: float = DEFAULT_MARGIN_MM) -> Path:
    """Crop, normalise and store one decoded case atomically. Returns its cache folder."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rec, ref = case.record, case.reference
    stack = np.stack([v.data for v in case.images]).astype(np.float32)  # (4, X, Y, Z)
    brain = np.any(stack != 0, axis=0)
    box = brain_box(brain, ref.spacing, margin_mm)
    sl = tuple(slice(a, b) for a, b in box)
    brain_c = brain[sl]
    mri = np.zeros((len(keys.MODALITIES),) + brain_c.shape, dtype=np.float16)
    stats = []
    for c in range(len(keys.MODALITIES)):
        z, mean, std = zscore(stack[c][sl], brain_c)
        mri[c] = z.astype(np.float16)
        stats.append({"mean": mean, "std": std})
    seg = case.seg.data[sl].astype(np.uint8) if case.seg is not None else np.zeros(brain_c.shape, np.uint8)
    fg = np.argwhere(seg > 0)
    if len(fg) > MAX_FG_POINTS:
        fg = fg[np.random.default_rng(0).choice(len(fg), MAX_FG_POINTS, replace=False)]
    meta = {
        "cache_version": CACHE_VERSION,
        "case_id": rec.case_id,
        "year": rec.year,
        "convention": convention(rec.year).__dict__,
        "has_seg": case.seg is not None,
        "affine": ref.affine.tolist(),
        "spacing": list(ref.spacing),
        "shape": list(ref.data.shape),
        "crop_box": box,
        "cropped_shape": list(brain_c.shape),
        "intensity": dict(zip(keys.MODALITIES, stats)),
        "source": {k: str(v) for k, v in rec.images.items()} | ({"seg": str(rec.seg)} if rec.seg else {}),
        "fingerprint": fingerprint(rec),
        "warnings": list(case.warnings),
        "allowed_checks": sorted(set(case.allowed)),  # a rerun without --allow for these re-validates
    }
    with disk_full_names(cache_dir, f"cached case {rec.case_id}"):
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(rec.case_id), dir=cache_dir))
        try:
            for name, arr in (
                ("mri", mri),
                ("seg", seg),
                ("label", labels_to_regions(seg, rec.year)),
                ("brain", brain_c.astype(np.uint8)),
                ("fg", fg.astype(np.int16)),
            ):
                buf = io.BytesIO()  # through Python's write: a full disk raises ENOSPC (numpy's tofile does not say)
                np.save(buf, arr)
                with open(tmp / f"{name}.npy", "wb") as fh:
                    fh.write(buf.getbuffer())
                    fh.flush()
                    os.fsync(fh.fileno())  # data on disk before the rename publishes the case
                del buf
            # meta.json last: is_cached() trusts a folder only through it
            with open(tmp / "meta.json", "w") as fh:
                fh.write(json.dumps(meta, indent=1))
                fh.flush()
                os.fsync(fh.fileno())
            final = cache_dir / rec.case_id
            if final.exists():
                trash = Path(tempfile.mkdtemp(prefix=temp_prefix(f"{rec.case_id}.old"), dir=cache_dir))
                os.replace(final, trash / "case")
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return cache_dir / rec.case_id


def read_meta(cache_dir: str | Path, case_id: str) -> dict:
    return json.loads((Path(cache_dir) / case_id / "meta.json").read_text())


def open_arrays(cache_dir: str | Path, case_id: str) -> dict[str, np.ndarray]:
    """Memory-mapped arrays of a cached case (no data read until sliced)."""
    d = Path(cache_dir) / case_id
    if not (d / "meta.json").exists():
        raise FileNotFoundError(f"{d}: case not in cache (run `trifuse preprocess`)")
    return {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in ("mri", "seg", "label", "brain", "fg")}


def make_sample(arrays: dict[str, np.ndarray], meta: dict, box=None) -> dict:
    """Build the sample dict of DESIGN.md from cached arrays, optionally over a sub-box.

    Args:
        arrays: from :func:`open_arrays`.
        meta: from :func:`read_meta`.
        box: ``[[d0, d1], [h0, h1], [w0, w1]]`` within the cropped volume, or ``None`` for all.
    """
    import torch  # here, not at module level: preprocessing workers never need it

    sl = (slice(None),) * 3 if box is None else tuple(slice(a, b) for a, b in box)
    full = (slice(None),)

    def read(name: str, index) -> torch.Tensor:  # copy out of the read-only memmap
        return torch.from_numpy(np.array(arrays[name][index], copy=True))

    # float16 → float32 in torch: vectorised, much faster than numpy's half conversion
    mri = read("mri", full + sl).to(torch.float32)
    seg = read("seg", sl)
    label = read("label", full + sl)
    brain = read("brain", sl).bool()
    m = dict(meta)
    m["patch_box"] = box
    m["applied"] = []
    return {
        keys.MRI: mri,
        keys.LABEL: label,
        keys.SEG: seg[None],
        keys.BRAIN: brain[None],
        keys.CASE_ID: meta["case_id"],
        keys.META: m,
    }


def load_sample(cache_dir: str | Path, case_id: str) -> dict:
    """The whole cropped case as a sample dict."""
    return make_sample(open_arrays(cache_dir, case_id), read_meta(cache_dir, case_id))


def paste_back(cropped: np.ndarray, meta: dict, fill=0) -> np.ndarray:
    """Place a cropped ``(..., D, H, W)`` array back into the original grid of the case."""
    shape = tuple(meta["shape"])
    out = np.full(cropped.shape[:-3] + shape, fill, dtype=cropped.dtype)
    sl = tuple(slice(a, b) for a, b in meta["crop_box"])
    out[(Ellipsis,) + sl] = cropped
    return out
