from pathlib import Path

import pytest

from trifuse import keys
from trifuse.io.discovery import case_id_for, detect_year, discover_cases
from tests.conftest import write_tiny_case


@pytest.mark.parametrize(
    "year, ext, first_id",
    [(2020, ".nii", "BraTS20_Training_001"), (2020, ".nii.gz", "BraTS20_Training_001"), (2021, ".nii.gz", "BraTS2021_00000"), (2023, ".nii.gz", "BraTS-GLI-00000-000")],
)
def test_discovers_each_year_layout(tmp_path, year, ext, first_id):
    for i in range(3):
        write_tiny_case(tmp_path, year, i, ext=ext)
    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases][0] == first_id
    assert len(cases) == 3
    for c in cases:
        assert c.year == year
        assert c.has_seg and c.seg.name.endswith(ext)
        assert list(c.images) == list(keys.MODALITIES)  # canonical order, whatever the suffixes
        assert not c.missing
    if year == 2023:
        assert cases[0].images["t1ce"].name == "BraTS-GLI-00000-000-t1c.nii.gz"
        assert cases[0].images["flair"].name == "BraTS-GLI-00000-000-t2f.nii.gz"


def test_validation_folder_without_seg(tmp_path):
    write_tiny_case(tmp_path, 2020, 0, with_seg=False, case_id="BraTS20_Validation_001")
    (case,) = discover_cases(tmp_path)
    assert case.year == 2020 and case.seg is None and not case.has_seg


def test_nested_root_and_single_case_dir(tmp_path):
    root = tmp_path / "MICCAI_BraTS2020_TrainingData"
    write_tiny_case(root, 2020, 0)
    write_tiny_case(root, 2020, 1)
    assert len(discover_cases(tmp_path)) == 2
    (single,) = discover_cases(root / "BraTS20_Training_002")
    assert single.case_id == "BraTS20_Training_002"


def test_missing_modality_is_recorded(tmp_path):
    d = write_tiny_case(tmp_path, 2023, 0)
    (d / "BraTS-GLI-00000-000-t2w.nii.gz").unlink()
    (case,) = discover_cases(tmp_path)
    assert case.missing == ["t2"]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover_cases(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no BraTS case folders"):
        discover_cases(tmp_path / "empty")
    write_tiny_case(tmp_path / "mixed", 2021, 0)
    write_tiny_case(tmp_path / "mixed", 2023, 0)
    with pytest.raises(ValueError, match="mixed"):
        discover_cases(tmp_path / "mixed")
    write_tiny_case(tmp_path / "y", 2021, 0)
    with pytest.raises(ValueError, match="2021 layout"):
        discover_cases(tmp_path / "y", year=2023)


def test_detect_year_and_ids():
    assert detect_year("BraTS-GLI-00000-000") == 2023
    assert detect_year("BraTS2021_01666") == 2021
    assert detect_year("BraTS20_Validation_125") == 2020
    assert detect_year("patient_01") is None
    assert case_id_for(2023, 7) == "BraTS-GLI-00007-000"
    assert all(detect_year(case_id_for(y, 3)) == y for y in keys.YEARS)
