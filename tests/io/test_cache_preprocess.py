import json
import os

import nibabel as nib
import numpy as np
import pytest

from lightning_app.cli import main
from trifuse import keys
from trifuse.io import cache as cache_mod
from trifuse.io.labels import labels_to_regions
from trifuse.io.manifest import kfold_splits, read_manifest
from trifuse.io.preprocess import default_cache_dir, preprocess
from tests.conftest import write_tiny_case


def test_cache_round_trip_equals_nifti(tiny_dataset, tmp_path):
    root = tiny_dataset(2021, 2)
    cache = tmp_path / "cache"
    report = preprocess(root, cache, n_folds=2)
    assert report.ok and len(report.written) == 2
    case_dir = root / "BraTS2021_00001"
    sample = cache_mod.load_sample(cache, "BraTS2021_00001")
    meta = sample[keys.META]
    imgs = np.stack([nib.load(str(case_dir / f"BraTS2021_00001_{m}.nii.gz")).get_fdata() for m in keys.MODALITIES])
    seg = np.asarray(nib.load(str(case_dir / "BraTS2021_00001_seg.nii.gz")).dataobj)
    brain = (imgs != 0).any(0)
    sl = tuple(slice(a, b) for a, b in meta["crop_box"])
    # labels exact, images = z-score over the brain (float16 precision)
    np.testing.assert_array_equal(sample[keys.SEG][0].numpy(), seg[sl])
    np.testing.assert_array_equal(sample[keys.LABEL].numpy(), labels_to_regions(seg[sl], 2021))
    for c in range(4):
        v = imgs[c][brain]
        z = np.where(brain, (imgs[c] - v.mean()) / v.std(), 0)[sl]
        np.testing.assert_allclose(sample[keys.MRI][c].numpy(), z, atol=2e-2, rtol=2e-3)
    assert sample[keys.MRI].dtype.is_floating_point and sample[keys.LABEL].dtype.itemsize == 1
    # pasting the crop back gives the original grid
    back = cache_mod.paste_back(sample[keys.SEG][0].numpy(), meta)
    np.testing.assert_array_equal(back, seg)
    assert np.allclose(meta["affine"], nib.load(str(case_dir / "BraTS2021_00001_t1.nii.gz")).affine)


def test_preprocess_is_resumable_and_detects_changes(tiny_dataset, tmp_path):
    root = tiny_dataset(2023, 2)
    cache = tmp_path / "cache"
    preprocess(root, cache)
    again = preprocess(root, cache)
    assert again.written == [] and len(again.skipped) == 2
    # touching a source invalidates that case only
    f = root / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t1n.nii.gz"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    third = preprocess(root, cache)
    assert third.written == ["BraTS-GLI-00001-000"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_manifest_and_folds(tiny_dataset, tmp_path):
    root = tiny_dataset(2023, 5)
    preprocess(root, tmp_path / "c", n_folds=5, seed=1)
    m = read_manifest(tmp_path / "c")
    assert m["year"] == 2023 and len(m["cases"]) == 5 and m["invalid"] == {}
    vals = [c for f in m["folds"]["splits"] for c in f["val"]]
    assert sorted(vals) == sorted(c["case_id"] for c in m["cases"])  # each case validated once
    for f in m["folds"]["splits"]:
        assert not set(f["train"]) & set(f["val"])
    assert kfold_splits(["a", "b", "c"], 3, seed=1) == kfold_splits(["c", "b", "a"], 3, seed=1)


def test_default_cache_dir(tmp_path):
    assert default_cache_dir(tmp_path / "data" / "synthetic") == (tmp_path / "data" / "cache" / "synthetic").resolve()


def test_cli_preprocess_2023_layout(tiny_dataset, tmp_path, capsys):
    root = tiny_dataset(2023, 3)
    rc = main(["preprocess", "--data", str(root), "--cache", str(tmp_path / "c")])
    out = capsys.readouterr().out
    assert rc == 0 and "BraTS 2023: 3 written" in out
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["year"] == 2023 and [c["case_id"] for c in m["cases"]] == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]


def test_cli_preprocess_broken_cases(tiny_dataset, tmp_path, capsys):
    root = tiny_dataset(2021, 3)
    (root / "BraTS2021_00000" / "BraTS2021_00000_t1ce.nii.gz").unlink()
    f = root / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz"
    data = nib.load(str(f)).get_fdata().astype(np.float32)
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, nib.load(str(f)).affine), str(f))
    cache = tmp_path / "c"
    rc = main(["preprocess", "--data", str(root), "--cache", str(cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    text = "\n".join(err)
    assert "INVALID BraTS2021_00000" in text and "missing modality t1ce" in text
    assert "INVALID BraTS2021_00002" in text and "NaN/Inf" in text and str(f) in text
    assert err[-1].startswith("trifuse preprocess: error: 2 invalid case(s): BraTS2021_00000, BraTS2021_00002")
    # nothing written for the bad cases; the good one is cached and the manifest lists the bad ones
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == ["BraTS2021_00001", "manifest.json"]
    assert set(read_manifest(cache)["invalid"]) == {"BraTS2021_00000", "BraTS2021_00002"}
    assert main(["preprocess", "--data", str(root), "--cache", str(cache), "--skip-invalid"]) == 0


def test_stale_cache_removed_when_case_breaks(tiny_dataset, tmp_path):
    root = tiny_dataset(2021, 1)
    cache = tmp_path / "c"
    preprocess(root, cache)
    (root / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz").write_bytes(b"garbage")
    report = preprocess(root, cache)
    assert "BraTS2021_00000" in report.invalid and not (cache / "BraTS2021_00000").exists()


def test_preprocess_workers_write_the_same_cache(tiny_dataset, tmp_path):
    """Two worker processes produce byte-identical cached arrays and the same manifest as one."""
    root = tiny_dataset(2021, 3)
    one, two = tmp_path / "c1", tmp_path / "c2"
    r1 = preprocess(root, one, workers=1)
    r2 = preprocess(root, two, workers=2)
    assert r1.written == r2.written == sorted(r1.written) and len(r1.written) == 3
    for cid in r1.written:
        for name in ("mri", "seg", "label", "brain", "fg"):
            assert (one / cid / f"{name}.npy").read_bytes() == (two / cid / f"{name}.npy").read_bytes()
    m1, m2 = read_manifest(one), read_manifest(two)
    assert m1["cases"] == m2["cases"] and m1["folds"] == m2["folds"]
