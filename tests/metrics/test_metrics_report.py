"""evaluate_folder on tiny BraTS-layout folders written with nibabel (2021 and 2023 naming)."""
from __future__ import annotations

import csv
import json
import re

import nibabel as nib
import numpy as np
import pytest

from trifuse import keys
from trifuse.metrics.report import evaluate_folder

SHAPE = (16, 16, 12)
LAYOUT = {
    2021: ("BraTS2021_{:05d}", "_", ("t1", "t1ce", "t2", "flair")),
    2023: ("BraTS-GLI-{:05d}-000", "-", ("t1n", "t1c", "t2w", "t2f")),
}


def save(path, data, spacing=(1.0, 1.0, 1.0), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([*spacing, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(np.asarray(data), aff), str(path))


def label_map(year: int, wt=None, tc=None, et=None) -> np.ndarray:
    """uint8 labels from region slices, in ``year``'s convention (ED=2, NCR=1, ET=4 or 3)."""
    seg = np.zeros(SHAPE, dtype=np.uint8)
    for sl, value in ((wt, 2), (tc, 1), (et, 4 if year == 2021 else 3)):
        if sl is not None:
            seg[sl] = value
    return seg


def write_case(root, year, index, seg, spacing=(1.0, 1.0, 1.0), with_images=True):
    fmt, sep, suffixes = LAYOUT[year]
    cid = fmt.format(index)
    d = root / cid
    if with_images:
        for s in suffixes:
            save(d / f"{cid}{sep}{s}.nii.gz", np.zeros(SHAPE, np.float32), spacing)
    if seg is not None:
        save(d / f"{cid}{sep}seg.nii.gz", seg, spacing)
    return cid


BOX = np.s_[4:8, 4:8, 4:8]  # 64 voxels
BOX_SHIFT = np.s_[6:10, 4:8, 4:8]  # overlaps BOX by 32 → Dice 0.5
CORE = np.s_[5:7, 5:7, 5:7]


def read_rows(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("year", [2021, 2023])
def test_evaluate_folder_values_and_files(tmp_path, year):
    data, pred, out = tmp_path / "data", tmp_path / "pred", tmp_path / "out"
    # case 0: WT shifted (Dice 0.5, HD95 2 mm along D at 1 mm), TC and ET absent in both
    c0 = write_case(data, year, 0, label_map(year, wt=BOX))
    save(pred / f"{c0}.nii.gz", label_map(year, wt=BOX_SHIFT))
    # case 1: perfect WT/TC/ET with 2 mm slices along W
    seg1 = label_map(year, wt=BOX, tc=CORE, et=np.s_[5:6, 5:6, 5:6])
    c1 = write_case(data, year, 1, seg1, spacing=(1.0, 1.0, 2.0))
    save(pred / f"{c1}.nii.gz", seg1, spacing=(1.0, 1.0, 2.0))
    # case 2: no prediction file → scored as empty, listed
    c2 = write_case(data, year, 2, label_map(year, wt=BOX))
    # a validation-style case without seg, and a stray prediction
    c3 = write_case(data, year, 3, None)
    save(pred / "stray.nii.gz", np.zeros(SHAPE, np.uint8))

    summary = evaluate_folder(pred, data, out, print_table=False)

    header, rows = read_rows(out / "per_case.csv")
    assert header == ["case_id", "region", "dice", "hd95"]
    got = {(r["case_id"], r["region"]): (float(r["dice"]), float(r["hd95"])) for r in rows}
    assert len(rows) == 9
    assert got[(c0, "WT")] == pytest.approx((0.5, 2.0), abs=1e-6)
    assert got[(c0, "TC")] == (1.0, 0.0)  # both empty
    assert got[(c0, "ET")] == (1.0, 0.0)
    assert all(got[(c1, r)] == pytest.approx((1.0, 0.0)) for r in keys.REGIONS)
    assert got[(c2, "WT")] == (0.0, keys.HD95_EMPTY_MM)  # missing prediction = empty prediction
    assert got[(c2, "TC")] == (1.0, 0.0)  # no TC in the reference either

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["n_cases"] == 3 and summary["n_missing"] == 1 and summary["n_evaluated"] == 2
    assert summary["missing_predictions"] == [c2]
    assert summary["unmatched_predictions"] == ["stray"]
    assert summary["cases_without_reference"] == [c3]
    assert summary["year"] == year
    wt = [0.5, 1.0, 0.0]
    assert summary["regions"]["WT"]["dice"]["mean"] == pytest.approx(np.mean(wt))
    assert summary["regions"]["WT"]["dice"]["std"] == pytest.approx(np.std(wt, ddof=1))
    assert summary["dice_WT"] == pytest.approx(np.mean(wt))
    case_means = [np.mean([0.5, 1, 1]), 1.0, np.mean([0, 1, 1])]
    assert summary["overall"]["dice"]["mean"] == pytest.approx(np.mean(case_means))
    assert summary["overall"]["dice"]["std"] == pytest.approx(np.std(case_means, ddof=1))
    assert summary["hd95_mean"] == pytest.approx(np.mean([2.0, 0, 0, 0, 0, 0, keys.HD95_EMPTY_MM, 0, 0]))
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.json"]


def test_evaluate_folder_lesion_wise_and_default_out(tmp_path, capsys):
    data, pred = tmp_path / "data", tmp_path / "pred"
    seg = np.zeros(SHAPE, np.uint8)
    seg[1:5, 1:5, 1:5] = 2  # 64 mm³ lesion
    c0 = write_case(data, 2021, 0, seg, with_images=False)
    save(pred / f"{c0}.nii.gz", seg)
    summary = evaluate_folder(pred, data, lesion_wise=True)
    assert "region" in capsys.readouterr().out  # the table is printed
    header, rows = read_rows(pred / "per_case_lesionwise.csv")
    assert header == ["case_id", "region", "dice", "hd95", "tp", "fp", "fn"]
    assert rows[0]["tp"] == "1" and float(rows[0]["dice"]) == pytest.approx(1.0)
    assert summary["lesion_wise"]["dice_WT"] == pytest.approx(1.0)
    assert (pred / "per_case.csv").exists()


def test_shape_mismatch_names_file(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    c0 = write_case(data, 2021, 0, label_map(2021, wt=BOX), with_images=False)
    save(pred / f"{c0}.nii.gz", np.zeros((16, 16, 10), np.uint8))
    # the case is scored as a missing prediction and listed with the reason, naming the file
    summary = evaluate_folder(pred, data, tmp_path / "out", print_table=False)
    assert re.search(rf"{c0}\.nii\.gz: shape .* differs", summary["invalid_predictions"][c0])
    assert summary["dice_WT"] == 0.0 and summary["hd95_WT"] == pytest.approx(keys.HD95_EMPTY_MM)


def test_affine_mismatch_names_file(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    c0 = write_case(data, 2023, 0, label_map(2023, wt=BOX), with_images=False)
    shifted = np.diag([1.0, 1.0, 1.0, 1.0])
    shifted[0, 3] = 5.0
    save(pred / f"{c0}.nii.gz", label_map(2023, wt=BOX), affine=shifted)
    # the case is scored as a missing prediction and listed with the reason, naming the file
    summary = evaluate_folder(pred, data, tmp_path / "out", print_table=False)
    assert re.search(rf"{c0}\.nii\.gz: affine differs", summary["invalid_predictions"][c0])
    assert summary["dice_WT"] == 0.0 and summary["hd95_WT"] == pytest.approx(keys.HD95_EMPTY_MM)


def test_wrong_label_convention_names_file(tmp_path):
    # a 2021-style ET = 4 prediction in a 2023 dataset is caught, not silently scored
    data, pred = tmp_path / "data", tmp_path / "pred"
    c0 = write_case(data, 2023, 0, label_map(2023, wt=BOX), with_images=False)
    save(pred / f"{c0}.nii.gz", label_map(2021, wt=BOX, et=CORE))
    # the case is scored as a missing prediction and listed with the reason, naming the file
    summary = evaluate_folder(pred, data, tmp_path / "out", print_table=False)
    assert re.search(r"unexpected label values \[4\]", summary["invalid_predictions"][c0])
    assert summary["dice_WT"] == 0.0 and summary["hd95_WT"] == pytest.approx(keys.HD95_EMPTY_MM)


def test_no_reference_at_all(tmp_path):
    data, pred = tmp_path / "data", tmp_path / "pred"
    write_case(data, 2021, 0, None)
    pred.mkdir()
    with pytest.raises(ValueError, match="no case has a reference"):
        evaluate_folder(pred, data, tmp_path / "out", print_table=False)
    with pytest.raises(FileNotFoundError):
        evaluate_folder(tmp_path / "nope", data, print_table=False)
