"""Case validation at the edge: every problem names the file and what is wrong."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trifuse import keys
from trifuse.io.discovery import CaseRecord
from trifuse.io.labels import convention
from trifuse.io.nifti import DataError, NiftiVolume, read_nifti

AFFINE_TOL_MM = 1e-3


class CaseValidationError(DataError):
    """A case failed validation; ``problems`` lists every problem found (one line each)."""

    def __init__(self, case_id: str, problems: list[str]):
        self.case_id = case_id
        self.problems = list(problems)
        super().__init__(f"{case_id}: " + "; ".join(self.problems))


@dataclass
class DecodedCase:
    """A validated case: images in canonical order, the label map, and geometry."""

    record: CaseRecord
    images: list[NiftiVolume]  # canonical order T1, T1ce, T2, FLAIR
    seg: NiftiVolume | None

    @property
    def reference(self) -> NiftiVolume:
        return self.images[0]


def decode_case(record: CaseRecord, require_seg: bool = False) -> DecodedCase:
    """Read and validate all files of a case, collecting every problem before failing.

    Checks: missing modality (and seg if required), unreadable/corrupt/truncated file,
    not 3-D, shape or affine mismatch between files, NaN/Inf in images, label values
    outside the year's convention.

    Raises:
        CaseValidationError: listing every problem, each naming its file.
    """
    problems: list[str] = []
    for name in record.missing:
        suffix = keys.MODALITY_SUFFIXES[record.year][keys.MODALITIES.index(name)]
        problems.append(f"missing modality {name} (expected file {record.case_id}*{suffix}.nii[.gz] in {record.directory})")
    if require_seg and record.seg is None:
        problems.append(f"missing label file (expected {record.case_id}*seg.nii[.gz] in {record.directory})")

    images: list[NiftiVolume] = []
    for name in keys.MODALITIES:
        path = record.images.get(name)
        if path is None:
            continue
        try:
            vol = read_nifti(path)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if not np.isfinite(vol.data).all():
            n_bad = int((~np.isfinite(vol.data)).sum())
            problems.append(f"{path}: contains {n_bad} NaN/Inf voxels")
        images.append(vol)

    seg = None
    if record.seg is not None:
        try:
            seg = read_nifti(record.seg, dtype=None)
        except DataError as exc:
            problems.append(str(exc))
        else:
            if not np.issubdtype(seg.data.dtype, np.integer):
                if not np.isfinite(seg.data).all() or not np.all(seg.data == np.round(seg.data)):
                    problems.append(f"{record.seg}: label map holds non-integer values")
            conv = convention(record.year)
            values = np.unique(np.asarray(seg.data))
            bad = sorted(set(values.astype(np.int64).tolist()) - set(conv.values))
            if bad:
                problems.append(
                    f"{record.seg}: unexpected label values {bad} for BraTS {record.year} "
                    f"(allowed {list(conv.values)})"
                )
            seg.data = np.asarray(seg.data).astype(np.uint8)

    vols = images + ([seg] if seg is not None else [])
    if vols:
        ref = vols[0]
        for v in vols[1:]:
            if v.data.shape != ref.data.shape:
                problems.append(f"{v.path}: shape {v.data.shape} does not match {ref.path.name} shape {ref.data.shape}")
            elif not np.allclose(v.affine, ref.affine, atol=AFFINE_TOL_MM):
                problems.append(f"{v.path}: affine does not match {ref.path.name} (max diff {np.abs(v.affine - ref.affine).max():.4g} mm)")
    if problems:
        raise CaseValidationError(record.case_id, problems)
    return DecodedCase(record=record, images=images, seg=seg)
