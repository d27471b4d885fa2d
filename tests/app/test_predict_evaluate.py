"""`trifuse predict` and `trifuse evaluate` on tiny BraTS-layout folders (2021 and 2023 naming).

The model is a real TeacherModule whose final 1×1×1 convolution is set by hand (zero
weights, chosen biases), so its output is known exactly: every voxel of the network input
(the brain box) gets the same regions. That makes the expected label map a closed form:
the region's label in the input year's convention inside the brain box, 0 outside.
"""
from __future__ import annotations

import csv
import json
import os

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_app.cli import main
from trifuse.inference import prepare_case
from trifuse import keys
from trifuse.io.cache import DEFAULT_MARGIN_MM, brain_box, load_sample
from trifuse.io.discovery import case_file_name, discover_cases
from trifuse.io.labels import convention
from trifuse.io.preprocess import preprocess
from trifuse.io.validate import decode_case
from trifuse.lightning.teacher import TeacherModule
from trifuse.nets import SegResNetBackbone


def constant_model_ckpt(path, bias, modality="mri") -> str:
    """Checkpoint of a TeacherModule whose logits are ``bias`` (per region) at every voxel."""
    channels = 4 if modality == "mri" else (keys.CT_CHANNELS if modality == "ct" else 1)
    net = SegResNetBackbone(in_channels=channels, out_channels=3, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    final = net.conv_final[-1].conv if hasattr(net.conv_final[-1], "conv") else net.conv_final[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    model = TeacherModule(modality=modality, net=net, roi_size=(16, 16, 16))
    # a real Lightning checkpoint without a training run; the net config travels as a class path
    ckpt = {
        "state_dict": model.state_dict(),
        "pytorch-lightning_version": L.__version__,
        "hyper_parameters": {
            **dict(model.hparams),
            "_class_path": "trifuse.lightning.teacher.TeacherModule",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
            "net": {
                "class_path": "trifuse.nets.SegResNetBackbone",
                "init_args": {"in_channels": channels, "out_channels": 3, "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
            },
        },
    }
    torch.save(ckpt, path)
    return str(path)


def expected_box(case_dir, year):
    rec = discover_cases(case_dir)[0]
    case = decode_case(rec)
    stack = np.stack([v.data for v in case.images])
    return brain_box(np.any(stack != 0, axis=0), case.reference.spacing, DEFAULT_MARGIN_MM)


@pytest.mark.parametrize("year,bias,region", [(2023, (9.0, 9.0, 9.0), "et"), (2021, (9.0, 9.0, 9.0), "et"), (2021, (9.0, -9.0, -9.0), "ed")])
def test_predict_writes_input_convention_on_input_grid(tiny_dataset, tmp_path, year, bias, region):
    data = tiny_dataset(year, n=2)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", bias)
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(out), "--device", "cpu"]) == 0
    conv = convention(year)
    legal = {0, 1, 2, 3} if year == 2023 else {0, 1, 2, 4}
    for rec in discover_cases(data):
        src = nib.load(str(rec.images["t1"]))
        img = nib.load(str(out / f"{rec.case_id}.nii.gz"))
        lab = np.asanyarray(img.dataobj)
        assert lab.dtype == np.uint8 and lab.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
        assert img.header.get_zooms() == src.header.get_zooms()
        assert set(np.unique(lab).tolist()) <= legal
        want = np.zeros(src.shape, np.uint8)
        box = expected_box(rec.directory, year)
        want[tuple(slice(a, b) for a, b in box)] = getattr(conv, region)
        np.testing.assert_array_equal(lab, want)


def test_prepare_case_matches_cache(tiny_dataset, tmp_path):
    data = tiny_dataset(2023, n=1)
    cache = tmp_path / "cache"
    preprocess(data, cache, n_folds=2)
    rec = discover_cases(data)[0]
    mine = prepare_case(decode_case(rec))
    cached = load_sample(cache, rec.case_id)
    assert torch.equal(mine[keys.MRI], cached[keys.MRI])
    assert torch.equal(mine[keys.BRAIN], cached[keys.BRAIN])
    assert mine[keys.META]["crop_box"] == cached[keys.META]["crop_box"]


def test_predict_resumes_and_single_file_output(tiny_dataset, tmp_path):
    data = tiny_dataset(2021, n=1)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, -9.0, -9.0))
    case_dir = next(p for p in data.iterdir() if p.is_dir())
    dest = tmp_path / "one" / "seg.nii.gz"
    assert main(["predict", "--ckpt", ckpt, "--input", str(case_dir), "--output", str(dest)]) == 0
    assert dest.exists()
    stamp = dest.stat().st_mtime_ns
    os.utime(dest, ns=(stamp - 10**9, stamp - 10**9))
    assert main(["predict", "--ckpt", ckpt, "--input", str(case_dir), "--output", str(dest)]) == 0
    assert dest.stat().st_mtime_ns == stamp - 10**9  # skipped
    assert main(["predict", "--ckpt", ckpt, "--input", str(case_dir), "--output", str(dest), "--overwrite"]) == 0
    assert dest.stat().st_mtime_ns != stamp - 10**9


def _break(data, year):
    """Three broken cases (missing FLAIR, T2 of another shape, NaN in T1ce) and one good one."""
    cases = sorted(p for p in data.iterdir() if p.is_dir())
    missing, shape, nan, good = cases
    (missing / case_file_name(missing.name, year, "flair")).unlink()
    t2 = shape / case_file_name(shape.name, year, "t2")
    nib.save(nib.Nifti1Image(np.ones((20, 24, 15), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), str(t2))
    t1ce = nan / case_file_name(nan.name, year, "t1ce")
    img = nib.load(str(t1ce))
    arr = np.asarray(img.dataobj, dtype=np.float32).copy()
    arr[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), str(t1ce))
    return missing, shape, nan, good


def test_predict_bad_inputs_clear_errors_and_no_partial_outputs(tiny_dataset, tmp_path, capsys):
    year = 2023
    data = tiny_dataset(year, n=4)
    missing, shape, nan, good = _break(data, year)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, 9.0, 9.0))
    out = tmp_path / "pred"
    rc = main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines()[-1].startswith("trifuse predict: error: 3 case(s) failed")
    assert "missing modality flair" in err and missing.name in err
    assert f"{case_file_name(shape.name, year, 't2')}: shape (20, 24, 15) does not match" in err
    assert f"{case_file_name(nan.name, year, 't1ce')}: contains 1 NaN/Inf voxels" in err
    # the good case is written; nothing (not even a temporary file) for the bad ones
    assert sorted(p.name for p in out.iterdir()) == [f"{good.name}.nii.gz"]


def test_predict_missing_checkpoint_is_one_line_error(tiny_dataset, tmp_path, capsys):
    data = tiny_dataset(2021, n=1)
    rc = main(["predict", "--ckpt", str(tmp_path / "nope.ckpt"), "--input", str(data), "--output", str(tmp_path / "o")])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"trifuse predict: error: {tmp_path / 'nope.ckpt'}: checkpoint not found"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_evaluate_hand_expected_numbers(tiny_dataset, tmp_path, capsys):
    """Case 0: prediction = reference → Dice 1, HD95 0. Case 1: ET relabelled NCR → WT and TC
    unchanged (Dice 1, HD95 0), ET empty in the prediction only → Dice 0, HD95 373.13 mm."""
    year = 2021
    data = tiny_dataset(year, n=2)
    conv = convention(year)
    pred = tmp_path / "pred"
    pred.mkdir()
    for i, rec in enumerate(discover_cases(data)):
        seg = nib.load(str(rec.seg))
        lab = np.asanyarray(seg.dataobj).astype(np.uint8)
        assert (lab == conv.et).any()
        if i == 1:
            lab = np.where(lab == conv.et, conv.ncr, lab).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, seg.affine, seg.header), str(pred / f"{rec.case_id}.nii.gz"))
    out = tmp_path / "eval"
    assert main(["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "WT" in printed and "ET" in printed and "2 cases" in printed
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    got = {(r["case_id"], r["region"]): (float(r["dice"]), float(r["hd95"])) for r in rows}
    ids = [r.case_id for r in discover_cases(data)]
    for region in keys.REGIONS:
        assert got[(ids[0], region)] == (1.0, 0.0)
    assert got[(ids[1], "WT")] == (1.0, 0.0) and got[(ids[1], "TC")] == (1.0, 0.0)
    assert got[(ids[1], "ET")][0] == 0.0 and got[(ids[1], "ET")][1] == pytest.approx(keys.HD95_EMPTY_MM)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice_WT"] == 1.0 and summary["dice_ET"] == pytest.approx(0.5)
    assert summary["hd95_ET"] == pytest.approx(keys.HD95_EMPTY_MM / 2)
    assert summary["dice_mean"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_predict_then_evaluate_round_trip(tiny_dataset, tmp_path):
    """A constant 'everything is WT' model scored by hand: WT Dice = 2|WT ∩ box| / (|WT| + |box|)."""
    year = 2023
    data = tiny_dataset(year, n=1)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, -9.0, -9.0))
    pred, out = tmp_path / "pred", tmp_path / "eval"
    assert main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(pred)]) == 0
    assert main(["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(out)]) == 0
    rec = discover_cases(data)[0]
    ref = np.asanyarray(nib.load(str(rec.seg)).dataobj) > 0
    box = np.zeros_like(ref)
    box[tuple(slice(a, b) for a, b in expected_box(rec.directory, year))] = True
    want = 2 * (ref & box).sum() / (ref.sum() + box.sum())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice_WT"] == pytest.approx(want, rel=1e-6)  # the metric sums in float32
    assert summary["dice_TC"] == 0.0 and summary["dice_ET"] == 0.0


@pytest.mark.parametrize("modality", ["us", "ct"])
def test_predict_with_a_us_or_ct_teacher_derives_its_input(tiny_dataset, tmp_path, modality):
    """Only the four MRI files are given: the pixel tier makes the teacher's input on the fly."""
    year = 2021
    data = tiny_dataset(year, n=1)
    ckpt = constant_model_ckpt(tmp_path / "m.ckpt", (9.0, 9.0, -9.0), modality=modality)
    out = tmp_path / "pred"
    assert main(["predict", "--ckpt", ckpt, "--input", str(data), "--output", str(out)]) == 0
    rec = discover_cases(data)[0]
    lab = np.asanyarray(nib.load(str(out / f"{rec.case_id}.nii.gz")).dataobj)
    want = np.zeros(lab.shape, np.uint8)
    want[tuple(slice(a, b) for a, b in expected_box(rec.directory, year))] = convention(year).ncr  # WT and TC, not ET
    np.testing.assert_array_equal(lab, want)
