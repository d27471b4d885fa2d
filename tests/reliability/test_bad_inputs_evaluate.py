"""Bad-input sweep of `trifuse evaluate`: each unusable prediction or reference is named with
its file and problem and scored by the BraTS rule (or left out, listed); the valid cases of
the same folder are still scored exactly; no case is skipped silently."""
from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from lightning_app.cli import main
from tests.conftest import write_tiny_case
from trifuse import keys


def _seg(d):
    img = nib.load(str(d / f"{d.name}_seg.nii.gz"))
    return np.asanyarray(img.dataobj).astype(np.uint8), img.affine


def _save(p, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(p))


def _build(tmp_path):
    data, pred = tmp_path / "brats2021", tmp_path / "pred"
    pred.mkdir()
    cases = {}
    names = [
        "valid", "missing", "wrong_shape", "wrong_affine", "labels_2023", "float_labels", "truncated",
        "not_nifti", "empty_ref_empty_pred", "empty_ref_full_pred", "bad_reference", "four_d_series",
    ]
    for i, name in enumerate(names):
        d = write_tiny_case(data, 2021, i)
        seg, aff = _seg(d)
        out = pred / f"{d.name}.nii.gz"
        cases[name] = (d.name, out)
        if name == "missing":
            continue
        if name == "wrong_shape":
            _save(out, seg[:, :, :-2], aff)
        elif name == "wrong_affine":
            shifted = aff.copy()
            shifted[1, 3] += 4.0
            _save(out, seg, shifted)
        elif name == "labels_2023":
            _save(out, np.where(seg == 4, 3, seg).astype(np.uint8), aff)
        elif name == "float_labels":
            _save(out, seg.astype(np.float32) + 0.5, aff)
        elif name == "truncated":
            _save(out, seg, aff)
            raw = out.read_bytes()
            out.write_bytes(raw[: len(raw) // 2])
        elif name == "not_nifti":
            out.write_bytes(b"\x00" * 400)
        elif name.startswith("empty_ref"):
            _save(d / f"{d.name}_seg.nii.gz", np.zeros_like(seg), aff)
            _save(out, np.zeros_like(seg) if name == "empty_ref_empty_pred" else seg, aff)
        elif name == "bad_reference":
            _save(d / f"{d.name}_seg.nii.gz", np.where(seg == 4, 7, seg).astype(np.uint8), aff)
            _save(out, seg, aff)
        elif name == "four_d_series":
            _save(out, np.stack([seg, seg], -1), aff)
        else:
            _save(out, seg, aff)
    return data, pred, cases


EXPECT = {  # name → words the reason must contain
    "wrong_shape": ["shape (20, 24, 14) differs from the reference"],
    "wrong_affine": ["affine differs", "input grid"],
    "labels_2023": ["unexpected label values [3]", "BraTS 2021"],
    "float_labels": ["non-integer values"],
    "truncated": ["truncated"],
    "not_nifti": ["not a readable NIfTI"],
    "four_d_series": ["expected a 3-D volume"],
}


def test_evaluate_bad_inputs_named_scored_and_listed(tmp_path, capsys):
    data, pred, cases = _build(tmp_path)
    out = tmp_path / "eval"
    rc = main(["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(out)])
    cap = capsys.readouterr()
    assert rc == 1
    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["case_id"], r["region"]): (float(r["dice"]), float(r["hd95"])) for r in csv.DictReader(open(out / "per_case.csv"))}
    cid = {n: c for n, (c, _) in cases.items()}
    # every unusable prediction: named with its file and problem, scored as missing
    assert set(summary["invalid_predictions"]) == {cid[n] for n in EXPECT}
    for name, words in EXPECT.items():
        why = summary["invalid_predictions"][cid[name]]
        assert str(cases[name][1]) in why, (name, why)
        for w in words:
            assert w in why, (name, w, why)
        assert f"INVALID {cid[name]}: {cases[name][1]}" in cap.err
    for name in [*EXPECT, "missing"]:
        for reg in keys.REGIONS:
            assert rows[(cid[name], reg)] == (0.0, pytest.approx(keys.HD95_EMPTY_MM)), name
    assert summary["missing_predictions"] == [cid["missing"]]
    # the valid case is scored exactly; empty references follow the BraTS rules
    for reg in keys.REGIONS:
        assert rows[(cid["valid"], reg)] == (1.0, 0.0)
        assert rows[(cid["empty_ref_empty_pred"], reg)] == (1.0, 0.0)
        assert rows[(cid["empty_ref_full_pred"], reg)] == (0.0, pytest.approx(keys.HD95_EMPTY_MM))
    assert summary["empty_references"] == [cid["empty_ref_empty_pred"], cid["empty_ref_full_pred"]]
    # a bad reference cannot be scored: no rows, listed with its file and problem
    ref_why = summary["invalid_references"][cid["bad_reference"]]
    assert "_seg.nii.gz: reference has unexpected label values [7]" in ref_why
    assert not any(k[0] == cid["bad_reference"] for k in rows)
    # every other case is accounted for: scored rows for all 11, none skipped silently
    assert {k[0] for k in rows} == {c for n, c in cid.items() if n != "bad_reference"}
    assert summary["n_cases"] == 11 and summary["n_evaluated"] == 11 - 1 - len(EXPECT)
    assert "7 invalid predictions scored as missing" in cap.out and "1 missing predictions" in cap.out
    assert cap.err.strip().splitlines()[-1].startswith("trifuse evaluate: error: 8 case(s) with an unusable file")


def test_evaluate_exit_zero_when_only_missing(tmp_path, capsys):
    data = tmp_path / "brats2021"
    pred = tmp_path / "pred"
    pred.mkdir()
    d0 = write_tiny_case(data, 2021, 0)
    write_tiny_case(data, 2021, 1)
    seg, aff = _seg(d0)
    _save(pred / f"{d0.name}.nii.gz", seg, aff)
    assert main(["evaluate", "--pred", str(pred), "--data", str(data)]) == 0
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["missing_predictions"] == ["BraTS2021_00001"] and summary["dice_mean"] == pytest.approx(0.5)
    assert "missing predictions (scored as empty): BraTS2021_00001" in capsys.readouterr().out
