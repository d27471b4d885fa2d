"""Broken and unusual copies of one tiny case, shared by the bad-input sweeps.

Each builder takes a freshly written valid case folder (2021 layout, see
:func:`tests.conftest.write_tiny_case`) and breaks it in one way; it returns the file the
message must name (or the folder, for a problem of the whole case) and the words the
message must contain. ``None`` as the words means the case is valid (maybe with a warning).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import write_tiny_case


def _f(d: Path, suffix: str) -> Path:
    return d / f"{d.name}_{suffix}.nii.gz"


def _data(p: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(p))
    return np.asanyarray(img.dataobj).copy(), img.affine


def _save(p: Path, data, affine) -> None:
    nib.save(nib.Nifti1Image(data, affine), str(p))


def zero_flair(d):
    p = _f(d, "flair")
    data, aff = _data(p)
    _save(p, np.zeros_like(data), aff)
    return p, ["all zeros", "constant"]


def constant_t1(d):
    p = _f(d, "t1")
    data, aff = _data(p)
    _save(p, np.full_like(data, 5.0), aff)
    return p, ["constant (5 everywhere)"]


def few_voxel_brain(d):
    for s in ("t1", "t1ce", "t2", "flair"):
        p = _f(d, s)
        data, aff = _data(p)
        keep = np.zeros_like(data)
        keep[10:12, 12:14, 8] = data[10:12, 12:14, 8] + 1.0
        _save(p, keep, aff)
    return d, ["brain mask", "only 4 of", "small_brain"]


def no_background(d):
    for s in ("t1", "t1ce", "t2", "flair"):
        p = _f(d, s)
        data, aff = _data(p)
        _save(p, data + 50.0, aff)
    return d, ["no zero background", "skull-stripped"]


def scaled_t2(d):
    p = _f(d, "t2")
    data, aff = _data(p)
    _save(p, data * 1e9, aff)
    return p, ["implausible", "wrong scaling"]


def label_map_as_flair(d):
    p = _f(d, "flair")
    _, aff = _data(p)
    seg, _ = _data(_f(d, "seg"))
    _save(p, seg.astype(np.float32), aff)  # the label map copied into the FLAIR slot
    return p, ["distinct values", "mask or label map"]


def blank_half_t1ce(d):
    p = _f(d, "t1ce")
    data, aff = _data(p)
    data[:, :, 3:] = 0  # non-zero on a sliver of the brain only
    _save(p, data, aff)
    return p, ["of the brain mask", "blank or shifted"]


def four_d_singleton(d):
    p = _f(d, "t1")
    data, aff = _data(p)
    _save(p, data[..., None], aff)
    return p, None  # valid: squeezed, with a warning naming the file


def upper_case_extension(d):
    for s in ("t1", "seg"):
        p = _f(d, s)
        p.rename(p.with_name(f"{d.name}_{s}.NII.GZ"))
    return d / f"{d.name}_t1.NII.GZ", None  # valid


def misnamed_t1(d):
    p = _f(d, "t1")
    wrong = p.with_name(p.name.replace(d.name, d.name[:-1]))  # a typo in the case id
    p.rename(wrong)
    return wrong, ["missing modality t1", f"found {wrong}", f"not named {p.name}"]


def other_release_name(d):
    p = _f(d, "flair")
    wrong = p.with_name(p.name.replace("_flair", "_t2f"))  # the 2023 name in a 2021 folder
    p.rename(wrong)
    return wrong, ["missing modality flair", f"found {wrong}", f"not named {p.name}"]


def nan_voxels(d):
    p = _f(d, "t2")
    data, aff = _data(p)
    data[3, 4, 5] = np.nan
    _save(p, data, aff)
    return p, ["1 NaN/Inf voxels"]


def truncated(d):
    p = _f(d, "t1ce")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p, ["truncated"]


def not_nifti(d):
    p = _f(d, "t2")
    p.write_bytes(gzip.compress(b"not a nifti file at all" * 20))
    return p, ["not a readable NIfTI"]


def four_d_series(d):
    p = _f(d, "flair")
    data, aff = _data(p)
    _save(p, np.stack([data, data], -1), aff)
    return p, ["expected a 3-D volume", "4-D"]


def shape_mismatch(d):
    p = _f(d, "t2")
    data, aff = _data(p)
    _save(p, data[:, :, :-1], aff)
    return p, ["does not match", "shape"]


def affine_mismatch(d):
    p = _f(d, "t1ce")
    data, aff = _data(p)
    aff = aff.copy()
    aff[0, 3] += 3.0
    _save(p, data, aff)
    return p, ["affine does not match"]


def bad_labels(d):
    p = _f(d, "seg")
    data, aff = _data(p)
    data[data == 4] = 3  # the 2023 ET label in a 2021 case
    _save(p, data, aff)
    return p, ["unexpected label values [3]", "2021"]


def missing_file(d):
    p = _f(d, "t1ce")
    p.unlink()
    return p, ["missing modality t1ce", str(d)]


BREAKERS = {
    f.__name__: f
    for f in (
        zero_flair, constant_t1, few_voxel_brain, no_background, scaled_t2, label_map_as_flair, blank_half_t1ce,
        four_d_singleton, upper_case_extension, misnamed_t1, other_release_name, nan_voxels, truncated, not_nifti,
        four_d_series, shape_mismatch, affine_mismatch, bad_labels, missing_file,
    )
}


def broken_dataset(root: Path, names=tuple(BREAKERS), n_valid: int = 2) -> tuple[dict, list[str]]:
    """A 2021-layout dataset: ``n_valid`` valid cases, then one case per breaker.

    Returns:
        ``({case_id: (breaker name, file or folder, expected words | None)}, valid case ids)``.
    """
    from trifuse.io.discovery import case_id_for

    valid = []
    for i in range(n_valid):
        valid.append(write_tiny_case(root, 2021, i).name)
    broken = {}
    for j, name in enumerate(names):
        d = write_tiny_case(root, 2021, n_valid + j, seed=17)
        target, words = BREAKERS[name](d)
        broken[d.name] = (name, target, words)
        assert d.name == case_id_for(2021, n_valid + j)
    return broken, valid
