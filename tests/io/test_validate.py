"""Every validation error names the file and the problem."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from trifuse.io.discovery import case_record
from trifuse.io.validate import CaseValidationError, decode_case
from tests.conftest import write_tiny_case


def _case(tmp_path, year=2021):
    return write_tiny_case(tmp_path, year, 0)


def _problems(d, **kw):
    with pytest.raises(CaseValidationError) as ei:
        decode_case(case_record(d), **kw)
    return ei.value.problems


def _rewrite(path, data, affine=None):
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), str(path))


def test_valid_case_decodes(tmp_path):
    case = decode_case(case_record(_case(tmp_path)))
    assert len(case.images) == 4 and case.seg is not None
    assert case.reference.spacing == (1.0, 1.0, 1.0)


def test_missing_modality(tmp_path):
    d = _case(tmp_path)
    (d / "BraTS2021_00000_flair.nii.gz").unlink()
    (p,) = _problems(d)
    assert "missing modality flair" in p and str(d / "BraTS2021_00000_flair.nii.gz") in p


def test_missing_seg_when_required(tmp_path):
    d = _case(tmp_path)
    (d / "BraTS2021_00000_seg.nii.gz").unlink()
    decode_case(case_record(d))  # fine for inference
    (p,) = _problems(d, require_seg=True)
    assert "missing label file" in p


def test_shape_mismatch(tmp_path):
    d = _case(tmp_path)
    f = d / "BraTS2021_00000_t2.nii.gz"
    _rewrite(f, np.zeros((20, 24, 15), np.float32))
    (p,) = _problems(d)
    assert str(f) in p and "shape (20, 24, 15)" in p


def test_affine_mismatch(tmp_path):
    d = _case(tmp_path)
    f = d / "BraTS2021_00000_t1ce.nii.gz"
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[0, 3] = 2.5
    _rewrite(f, nib.load(str(f)).get_fdata().astype(np.float32), aff)
    (p,) = _problems(d)
    assert str(f) in p and "affine does not match" in p


def test_nan_and_inf(tmp_path):
    d = _case(tmp_path)
    f = d / "BraTS2021_00000_t1.nii.gz"
    data = nib.load(str(f)).get_fdata().astype(np.float32)
    data[0, 0, 0] = np.nan
    data[1, 0, 0] = np.inf
    _rewrite(f, data)
    (p,) = _problems(d)
    assert str(f) in p and "2 NaN/Inf" in p


def test_four_d_file(tmp_path):
    d = _case(tmp_path)
    f = d / "BraTS2021_00000_t1.nii.gz"
    _rewrite(f, np.zeros((20, 24, 16, 3), np.float32))
    problems = _problems(d)
    assert any(str(f) in p and "expected a 3-D volume" in p and "4-D" in p for p in problems)


def test_unexpected_label_values(tmp_path):
    d = write_tiny_case(tmp_path, 2023, 0)
    f = d / "BraTS-GLI-00000-000-seg.nii.gz"
    seg = np.asarray(nib.load(str(f)).dataobj).copy()
    seg[0, 0, 0] = 4  # a 2021-style ET label in a 2023 case
    _rewrite(f, seg)
    (p,) = _problems(d)
    assert str(f) in p and "unexpected label values [4]" in p and "2023" in p


def test_corrupt_and_truncated_files(tmp_path):
    d = _case(tmp_path)
    bad = d / "BraTS2021_00000_t1.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    trunc = d / "BraTS2021_00000_t2.nii.gz"
    raw = trunc.read_bytes()
    trunc.write_bytes(raw[: len(raw) // 2])
    problems = _problems(d)
    assert any(str(bad) in p and ("not a readable NIfTI" in p or "corrupt" in p) for p in problems)
    assert any(str(trunc) in p and ("truncated" in p or "not a readable" in p) for p in problems)


def test_all_problems_reported_together(tmp_path):
    d = _case(tmp_path)
    (d / "BraTS2021_00000_t1.nii.gz").unlink()
    _rewrite(d / "BraTS2021_00000_t2.nii.gz", np.zeros((5, 5, 5), np.float32))
    problems = _problems(d)
    assert len(problems) == 2
