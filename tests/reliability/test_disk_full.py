"""A stage that runs out of disk space fails with a one-line message naming the folder and
leaves no partial output: on a real size-limited tmpfs folder where the machine lets us
mount one (root), and always with ENOSPC simulated at the write call."""
from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest

from lightning_app.cli import main
from trifuse.io import cache as cache_mod
from trifuse.io import nifti as nifti_mod


@pytest.fixture
def small_folder(tmp_path):
    """A 40 KiB tmpfs folder, or skip where mounting is not allowed."""
    d = tmp_path / "small"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(d)], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("cannot run mount")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=20)


def _visible(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_preprocess_on_a_full_tmpfs(tiny_dataset, small_folder, capsys):
    data = tiny_dataset(2021, 2, shape=(40, 48, 32))  # ~250 KiB per cached case: the first one does not fit
    cache = small_folder / "cache"
    rc = main(["preprocess", "--data", str(data), "--cache", str(cache)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1
    assert last.startswith(f"trifuse preprocess: error: {cache}: no space left on device while writing cached case BraTS2021_00000")
    assert _visible(cache) == []  # no case folder, no temporary, no manifest


def test_evaluate_on_a_full_tmpfs(tiny_dataset, small_folder, tmp_path, capsys):
    import nibabel as nib

    data = tiny_dataset(2021, 1)
    pred = tmp_path / "pred"
    pred.mkdir()
    rec = next(data.iterdir())
    seg = nib.load(str(rec / f"{rec.name}_seg.nii.gz"))
    nib.save(seg, str(pred / f"{rec.name}.nii.gz"))
    (small_folder / "filler").write_bytes(b"\0" * (40 * 1024 - 512))  # leave less than a page
    out = small_folder / "eval"
    rc = main(["evaluate", "--pred", str(pred), "--data", str(data), "--out", str(out)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and last.startswith(f"trifuse evaluate: error: {out}: no space left on device while writing per_case.csv")
    assert _visible(out) == []


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_preprocess_simulated_enospc_names_folder_and_leaves_nothing(tiny_dataset, tmp_path, monkeypatch, capsys):
    data = tiny_dataset(2021, 2)
    cache = tmp_path / "cache"
    assert main(["preprocess", "--data", str(data), "--cache", str(cache)]) == 0  # both cached
    (data / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz").touch()  # changed: case 1 is rewritten
    before = {p: p.read_bytes() for p in (cache / "BraTS2021_00001").iterdir()}
    calls = []
    real_save = np.save

    def full_on_third_array(fh, arr, *a, **k):  # two arrays of the case are written, then the disk is full
        calls.append(1)
        if len(calls) == 3:
            _enospc()
        return real_save(fh, arr, *a, **k)

    monkeypatch.setattr(cache_mod.np, "save", full_on_third_array)
    rc = main(["preprocess", "--data", str(data), "--cache", str(cache)])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and last == (
        f"trifuse preprocess: error: {cache}: no space left on device while writing cached case BraTS2021_00001 "
        "(No space left on device); nothing partial was kept: free space there or write elsewhere"
    )
    # the previous complete copy of the case is still there, untouched; no temporary remains
    assert {p: p.read_bytes() for p in (cache / "BraTS2021_00001").iterdir()} == before
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("writer", ["nifti", "bytes"])
def test_atomic_writers_simulated_enospc(tmp_path, monkeypatch, writer):
    dest = tmp_path / "out" / ("seg.nii.gz" if writer == "nifti" else "summary.json")
    if writer == "nifti":
        monkeypatch.setattr(nifti_mod.nib, "save", lambda img, path: (open(path, "wb").write(b"\x1f\x8b partial"), _enospc()))
        call = lambda: nifti_mod.write_nifti(dest, np.zeros((4, 4, 4), np.uint8), np.eye(4))  # noqa: E731
    else:
        monkeypatch.setattr(nifti_mod.os, "fsync", _enospc)
        call = lambda: nifti_mod.atomic_write_text(dest, "{}")  # noqa: E731
    with pytest.raises(nifti_mod.OutOfSpaceError, match=rf"^{dest.parent}: no space left on device while writing {dest.name}"):
        call()
    assert list(dest.parent.iterdir()) == []
