"""Case validation at the edge: every problem names the file and what is wrong."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from trifuse import keys
from trifuse.io.discovery import CaseRecord
from trifuse.io.labels import convention
from trifuse.io.nifti import DataError, NiftiVolume, read_nifti

log = logging.getLogger(__name__)

AFFINE_TOL_MM = 1e-3

# --- content checks: an image can be a valid NIfTI and still be unusable --------------------
#: check names that ``allow=`` (``trifuse preprocess --allow``) turns from errors into warnings
CONTENT_CHECKS = ("constant", "small_brain", "coverage", "intensity_range")
#: a brain mask (any contrast non-zero) below this fraction of the volume is "a few voxels":
#: a BraTS brain fills ~16 % of the 240×240×155 grid; 1 % is ~90 mL at 1 mm, far below any brain
MIN_BRAIN_FRACTION = 0.01
#: ... or below this many voxels whatever the grid (a few voxels cannot be z-scored or cropped)
MIN_BRAIN_VOXELS = 100
#: a contrast non-zero on less than this fraction of the brain mask is blank or mis-registered
#: (skull-stripped BraTS contrasts share one mask; dark CSF is low, not exactly zero)
MIN_COVERAGE = 0.5
#: a mask covering more than this fraction of the grid means no zero background (not skull-stripped)
MAX_BRAIN_FRACTION = 0.95
#: |intensity| above this is wrong scaling (scl_slope, overflow), not MRI
MAX_ABS_INTENSITY = 1e7
#: a contrast with at most this many distinct values inside the brain is a mask or label map
MIN_DISTINCT_VALUES = 8


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
    #: problems downgraded by ``allow=`` and notes such as a squeezed 4-D singleton, one line each
    warnings: list[str] = field(default_factory=list)
    #: the content checks that failed but were allowed (their names, :data:`CONTENT_CHECKS`)
    allowed: list[str] = field(default_factory=list)

    @property
    def reference(self) -> NiftiVolume:
        return self.images[0]


def _missing_message(record: CaseRecord, name: str) -> str:
    what = "label file" if name == "seg" else f"modality {name}"
    msg = f"missing {what} (expected file {record.directory / record.expected_name(name)}, or the same name ending .nii"
    hits = record.unexpected.get(name)
    if hits:
        found = ", ".join(str(p) for p in hits)
        return f"{msg}; found {found}, which looks like it but is not named {record.expected_name(name)}: rename it)"
    return msg + ")"


def content_problems(images: list[NiftiVolume]) -> list[tuple[str, str]]:
    """Checks that a readable, finite image set is usable MRI: ``[(check, message), ...]``.

    ``check`` is one of :data:`CONTENT_CHECKS`. The images must share one shape.

    * ``constant``: a contrast that is all zeros or one value inside the brain (z-scoring it
      would divide by zero and train on nothing);
    * ``small_brain``: a brain mask (any contrast non-zero) of a few voxels, or one covering
      the whole grid (no zero background: not skull-stripped as BraTS inputs are);
    * ``coverage``: a contrast non-zero on under half of the brain mask (blank or shifted);
    * ``intensity_range``: |values| above :data:`MAX_ABS_INTENSITY` (wrong scaling), or at
      most :data:`MIN_DISTINCT_VALUES` distinct values (a mask or label map in a contrast slot).
    """
    out: list[tuple[str, str]] = []
    if not images or len({v.data.shape for v in images}) != 1:
        return out
    nonzero = [v.data != 0 for v in images]
    brain = np.logical_or.reduce(nonzero)
    n_brain, n_total = int(brain.sum()), brain.size
    ref = images[0].path
    if n_brain < max(MIN_BRAIN_VOXELS, MIN_BRAIN_FRACTION * n_total):
        out.append(
            ("small_brain", f"{ref.parent}: brain mask (voxels non-zero in any contrast) has only {n_brain} of {n_total} voxels "
             f"(< {MIN_BRAIN_FRACTION:.0%} or < {MIN_BRAIN_VOXELS}); no usable image")
        )
    elif n_brain > MAX_BRAIN_FRACTION * n_total:
        out.append(
            ("small_brain", f"{ref.parent}: brain mask covers {n_brain / n_total:.1%} of the grid: no zero background, "
             "the images do not look skull-stripped (BraTS inputs are)")
        )
    for vol, nz in zip(images, nonzero):
        data = vol.data
        lo, hi = float(data.min()), float(data.max())
        if lo == hi:
            what = "all zeros" if hi == 0 else f"constant ({hi:g} everywhere)"
            out.append(("constant", f"{vol.path}: image is {what}; no contrast to learn from"))
            continue
        if n_brain == 0:
            continue
        vals = data[brain]
        sub = vals[:: max(1, vals.size // 200_000)]  # distinct values on a subsample: cheap at 240×240×155
        if float(vals.min()) == float(vals.max()):
            out.append(("constant", f"{vol.path}: constant ({float(vals.max()):g}) inside the brain mask; no contrast"))
            continue
        cov = float(nz[brain].mean())
        if cov < MIN_COVERAGE:
            out.append(("coverage", f"{vol.path}: non-zero on only {cov:.1%} of the brain mask (other contrasts cover it); blank or shifted image"))
        if max(abs(lo), abs(hi)) > MAX_ABS_INTENSITY:
            out.append(("intensity_range", f"{vol.path}: intensity range [{lo:.4g}, {hi:.4g}] is implausible for MRI (|value| > {MAX_ABS_INTENSITY:g}: wrong scaling?)"))
        n_distinct = len(np.unique(sub))
        if n_distinct <= MIN_DISTINCT_VALUES:
            out.append(("intensity_range", f"{vol.path}: only {n_distinct} distinct values inside the brain: a mask or label map, not an MRI contrast"))
    return out


def decode_case(record: CaseRecord, require_seg: bool = False, allow: Iterable[str] = (), with_seg: bool = True) -> DecodedCase:
    """Read and validate all files of a case, collecting every problem before failing.

    Checks: missing modality (and seg if required; a file under an unexpected name is
    named), unreadable/corrupt/truncated file, not 3-D, shape or affine mismatch between
    files, NaN/Inf in images, label values outside the year's convention, and the content
    checks of :func:`content_problems` (all-zero/constant contrast, a brain mask of a few
    voxels, implausible intensities).

    Args:
        record: the case on disk.
        require_seg: a missing label file is an error.
        allow: names from :data:`CONTENT_CHECKS` whose failures become warnings
            (``DecodedCase.warnings``, also logged) instead of errors.
        with_seg: read and check the label file if there is one; ``False`` for prediction,
            which needs only the four MRI files (``DecodedCase.seg`` is then ``None``).

    Raises:
        CaseValidationError: listing every problem, each naming its file.
        ValueError: an unknown name in ``allow``.
    """
    allow = set(allow)
    unknown = allow - set(CONTENT_CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) to allow: {sorted(unknown)}; choose from {list(CONTENT_CHECKS)}")
    problems: list[str] = []
    warnings: list[str] = []
    allowed: list[str] = []
    for name in record.missing:
        problems.append(_missing_message(record, name))
    if require_seg and record.seg is None:
        problems.append(_missing_message(record, "seg"))

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
        warnings += vol.notes
        if not np.isfinite(vol.data).all():
            n_bad = int((~np.isfinite(vol.data)).sum())
            problems.append(f"{path}: contains {n_bad} NaN/Inf voxels")
        images.append(vol)

    seg = None
    if record.seg is not None and with_seg:
        try:
            seg = read_nifti(record.seg, dtype=None)
        except DataError as exc:
            problems.append(str(exc))
        else:
            warnings += seg.notes
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
    finite = [v for v in images if not any(str(v.path) in p and "NaN/Inf" in p for p in problems)]
    if finite:
        for check, msg in content_problems(finite):
            if check in allow:
                warnings.append(f"{msg} [allowed: {check}]")
                allowed.append(check)
                log.warning("%s: %s", record.case_id, warnings[-1])  # (read_nifti logs its own notes)
            else:
                problems.append(f"{msg} [check {check}; --allow {check} to accept]")
    if problems:
        raise CaseValidationError(record.case_id, problems)
    return DecodedCase(record=record, images=images, seg=seg, warnings=warnings, allowed=allowed)


def check_prediction(dest, labels: np.ndarray, reference: NiftiVolume, year: int) -> None:
    """Refuse to write a prediction that evaluation could not score, naming ``dest``.

    Args:
        dest: the output file the labels are meant for (named in the message).
        labels: label map ``(X, Y, Z)`` to be written.
        reference: the case's reference image (its grid is the required grid).
        year: BraTS release whose label convention the output must use.

    Raises:
        DataError: not uint8, not on the input grid, or label values outside the convention.
    """
    if labels.dtype != np.uint8:
        raise DataError(f"{dest}: prediction has dtype {labels.dtype}, expected uint8 labels")
    if labels.shape != reference.data.shape:
        raise DataError(f"{dest}: prediction shape {labels.shape} is not the input grid {reference.data.shape} of {reference.path}")
    legal = set(convention(year).values)
    bad = sorted(set(np.unique(labels).tolist()) - legal)
    if bad:
        raise DataError(f"{dest}: prediction has label values {bad} outside the BraTS {year} convention {sorted(legal)}")
