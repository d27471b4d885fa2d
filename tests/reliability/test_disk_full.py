"""A stage that runs out of disk space fails with a one-line message naming the folder and
leaves no partial output: on a real size-limited tmpfs folder where the machine lets us
mount one (root), and always with ENOSPC simulated at the write call. Covered: preprocess,
evaluate, describe, physics fit-ct and fit-us, semantic, Lightning checkpoints (`trifuse fit`) and
the atomic writers."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_app.cli import main
from trifuse.io import cache as cache_mod
from trifuse.io import nifti as nifti_mod


def mount_tmpfs(d, size: str = "40k") -> str | None:
    """Mount a ``size`` tmpfs on folder ``d``; the reason why not, where mounting is not allowed."""
    d.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "cannot run mount"
    return None if r.returncode == 0 else f"cannot mount a tmpfs here: {r.stderr.decode().strip()}"


def umount(d) -> None:
    subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=20)


@pytest.fixture
def small_folder(tmp_path):
    """A 40 KiB tmpfs folder, or skip where mounting is not allowed."""
    d = tmp_path / "small"
    why = mount_tmpfs(d)
    if why:
        pytest.skip(why)
    yield d
    umount(d)


def _fill(folder, leave: int = 512) -> None:
    """Fill a 40 KiB tmpfs but ``leave`` bytes: less than the page any new file needs."""
    (folder / "filler").write_bytes(b"\0" * (40 * 1024 - leave))


def _last_err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def _files(folder) -> list[str]:
    """Every file (not folder) under ``folder``, hidden ones included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


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
    _fill(small_folder)
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


# --- describe, physics fit-ct and Lightning checkpoints ------------------------------------------
def _cached(tiny_dataset, tmp_path):
    data = tiny_dataset(2021, 2)
    cache = tmp_path / "cache"
    assert main(["preprocess", "--data", str(data), "--cache", str(cache)]) == 0
    return data, cache


def _describe(data, cache, out) -> int:
    return main(["describe", "--data", str(data), "--cache", str(cache), "--backend", "offline", "--no-progress",
                 "--out", str(out)])


def _full_when_writing(prefix: str):
    """An ``os.fsync`` that fails with ENOSPC when the file is a temporary of a ``prefix…`` file."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(f".{prefix}"):
            _enospc()
        return real(fd)

    return fsync


def test_describe_on_a_full_tmpfs(tiny_dataset, small_folder, tmp_path, capsys):
    data, cache = _cached(tiny_dataset, tmp_path)
    _fill(small_folder)
    out = small_folder / "desc"
    assert _describe(data, cache, out) == 1
    last = _last_err(capsys)
    assert re.match(rf"trifuse describe: error: {re.escape(str(out / 'cache'))}: no space left on device while writing "
                    r"[0-9a-f]{64}\.json \(No space left on device\); nothing partial was kept", last), last
    assert _files(out) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the file of a descriptor through /proc")
def test_describe_simulated_enospc_at_a_case_file(tiny_dataset, tmp_path, monkeypatch, capsys):
    """The disk fills up when the first case file is written: the stage names the output folder; the
    view descriptions already cached are complete files (a rerun reuses them), no case file is partial."""
    data, cache = _cached(tiny_dataset, tmp_path)
    out = tmp_path / "desc"
    monkeypatch.setattr(nifti_mod.os, "fsync", _full_when_writing("BraTS2021_"))
    assert _describe(data, cache, out) == 1
    assert _last_err(capsys).startswith(f"trifuse describe: error: {out}: no space left on device while writing "
                                        "BraTS2021_00000.json")
    files = _files(out)
    assert files and all(f.startswith("cache/") and not Path(f).name.startswith(".") for f in files), files
    for f in files:
        json.loads((out / f).read_text())
    monkeypatch.undo()
    assert _describe(data, cache, out) == 0
    assert "cached 3" in capsys.readouterr().out  # the first case's three views were kept, not asked again


def _fit_ct(data, cache, out, components=3) -> int:
    return main(["physics", "fit-ct", "--data", str(data), "--cache", str(cache), "--out", str(out),
                 "--components", str(components), "--max-voxels", "20000"])


def test_fit_ct_on_a_full_tmpfs(tiny_dataset, small_folder, tmp_path, capsys):
    data, cache = _cached(tiny_dataset, tmp_path)
    _fill(small_folder)
    out = small_folder / "ct" / "ct_mixture.json"
    assert _fit_ct(data, cache, out) == 1
    assert _last_err(capsys).startswith(f"trifuse physics: error: {out.parent}: no space left on device while "
                                        "writing ct_mixture.json")
    assert _files(out.parent) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the file of a descriptor through /proc")
def test_fit_ct_simulated_enospc_keeps_the_previous_model(tiny_dataset, tmp_path, monkeypatch, capsys):
    data, cache = _cached(tiny_dataset, tmp_path)
    out = tmp_path / "ct" / "ct_mixture.json"
    assert _fit_ct(data, cache, out) == 0
    before = out.read_bytes()
    monkeypatch.setattr(nifti_mod.os, "fsync", _full_when_writing("ct_mixture.json"))
    assert _fit_ct(data, cache, out, components=2) == 1  # another setting: a refit, whose save finds the disk full
    assert _last_err(capsys) == (
        f"trifuse physics: error: {out.parent}: no space left on device while writing ct_mixture.json "
        "(No space left on device); nothing partial was kept: free space there or write elsewhere")
    assert out.read_bytes() == before and _files(out.parent) == ["ct_mixture.json"]


# --- physics fit-us: its state file and mapper ------------------------------------------------------
def _fit_us(paired, out, steps=3) -> int:
    return main(["physics", "fit-us", "--paired", str(paired), "--out", str(out), "--steps", str(steps)])


def test_fit_us_on_a_full_tmpfs(small_folder, tmp_path, capsys):
    from tests.reliability.stages import write_paired_us

    paired = write_paired_us(tmp_path / "paired")
    _fill(small_folder)
    out = small_folder / "us" / "us_mapper.json"
    assert _fit_us(paired, out) == 1
    assert _last_err(capsys).startswith(f"trifuse physics: error: {out.parent}: no space left on device while "
                                        "writing us_mapper.json.state.pt (No space left on device); nothing partial")
    assert _files(out.parent) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the file of a descriptor through /proc")
@pytest.mark.parametrize("full_at", ["us_mapper.json.state.pt", "us_mapper.json"])
def test_fit_us_simulated_enospc_keeps_the_previous_files(full_at, tmp_path, monkeypatch, capsys):
    """A refit (one more step, resumed from the state file) finds the disk full when it saves the
    state or the mapper: the folder is named, the previous files are intact, nothing else is
    left, and a rerun on a disk with room resumes and completes."""
    from tests.reliability.stages import write_paired_us

    paired = write_paired_us(tmp_path / "paired")
    out = tmp_path / "us" / "us_mapper.json"
    assert _fit_us(paired, out) == 0
    before = {f: (out.parent / f).read_bytes() for f in _files(out.parent)}
    assert sorted(before) == ["us_mapper.json", "us_mapper.json.state.pt"]
    monkeypatch.setattr(nifti_mod.os, "fsync", _full_when_writing(f"{full_at}.~"))  # this file's temporary only
    assert _fit_us(paired, out, steps=4) == 1
    assert _last_err(capsys) == (
        f"trifuse physics: error: {out.parent}: no space left on device while writing {full_at} "
        "(No space left on device); nothing partial was kept: free space there or write elsewhere")
    assert _files(out.parent) == sorted(before)
    assert (out.parent / full_at).read_bytes() == before[full_at]
    for f in before:
        torch.load(out.parent / f, weights_only=False) if f.endswith(".pt") else json.loads((out.parent / f).read_text())
    monkeypatch.undo()
    assert _fit_us(paired, out, steps=4) == 0
    assert "resumed at step" in capsys.readouterr().out
    assert json.loads(out.read_text())["meta"]["fit_key"]["steps"] == 4


# --- semantic: a full disk stops the stage, other per-case failures do not -----------------------------
def _semantic(inputs, out, *extra) -> int:
    from tests.reliability.stages import STAGES

    return main([*STAGES["semantic"].argv(inputs, out), *extra])


def test_semantic_on_a_full_tmpfs(fast_inputs, small_folder, capsys):
    _fill(small_folder)
    out = small_folder / "priors"
    assert _semantic(fast_inputs, out) == 1
    last = _last_err(capsys)
    assert last == (f"trifuse semantic: error: {out}: no space left on device while writing BraTS2021_00000.npz "
                    "(No space left on device); nothing partial was kept: free space there or write elsewhere"), last
    assert _files(out) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names the file of a descriptor through /proc")
def test_semantic_simulated_enospc_stops_at_the_first_case(fast_inputs, tmp_path, monkeypatch, capsys):
    """The disk fills up at the first case of a forced rerun: the stage stops there (the second
    case is not attempted, the summary not rewritten), names the folder and keeps the previous files."""
    out = tmp_path / "priors"
    assert _semantic(fast_inputs, out) == 0
    before = {f: ((out / f).read_bytes(), (out / f).stat().st_ino) for f in _files(out)}
    assert sorted(before) == ["BraTS2021_00000.npz", "BraTS2021_00001.npz", "priors_summary.json"]
    monkeypatch.setattr(nifti_mod.os, "fsync", _full_when_writing("BraTS2021_00000.npz"))
    assert _semantic(fast_inputs, out, "--force") == 1
    assert _last_err(capsys) == (
        f"trifuse semantic: error: {out}: no space left on device while writing BraTS2021_00000.npz "
        "(No space left on device); nothing partial was kept: free space there or write elsewhere")
    assert {f: ((out / f).read_bytes(), (out / f).stat().st_ino) for f in _files(out)} == before


def test_semantic_other_case_failures_still_go_on(fast_inputs, tmp_path, monkeypatch, capsys):
    """A case that fails otherwise (here an unwritable file: EACCES) is listed and the next case is written."""
    from trifuse.semantic import priors

    real = priors.save_prior

    def refuse_first(path, *a, **k):
        if Path(path).name == "BraTS2021_00000.npz":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(priors, "save_prior", refuse_first)
    out = tmp_path / "priors"
    assert _semantic(fast_inputs, out) == 1
    err = capsys.readouterr().err
    assert "FAILED BraTS2021_00000: PermissionError" in err and "priors failed for 1 case(s): BraTS2021_00000" in err
    assert _files(out) == ["BraTS2021_00001.npz", "priors_summary.json"]


def test_atomic_checkpoint_io_simulated_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from trifuse.lightning.checkpoint_io import AtomicCheckpointIO

    io_ = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(nifti_mod.os, "fsync", _enospc)
    with pytest.raises(nifti_mod.OutOfSpaceError, match=rf"^{path.parent}: no space left on device while writing last\.ckpt"):
        io_.save_checkpoint({"global_step": 2}, path)
    assert path.read_bytes() == before and _files(path.parent) == ["last.ckpt"]


class _SmallDisk:
    """A binary file on a disk with ``room`` bytes left: a write past it fails with ENOSPC."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            _enospc()
        self.room -= n
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_fit_checkpoint_out_of_space_names_the_folder(disk, tiny_dataset, tmp_path, monkeypatch, capsys):
    """`trifuse fit` whose checkpoint folder fills up (a 200 KiB tmpfs under a ~340 KB checkpoint,
    or a checkpoint file whose writes fail with ENOSPC after 64 KiB) fails with the folder's name
    and leaves no checkpoint, partial or temporary. (torch.save reports a failed write as
    "unexpected pos": the writer must still name the full disk.)"""
    import builtins

    from tests.reliability.stages import CFG, fit_overlay

    data = tiny_dataset(2021, 2)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    if disk == "tmpfs":
        why = mount_tmpfs(ckpts, "200k")
        if why:
            pytest.skip(why)
    else:
        monkeypatch.setattr(nifti_mod, "open", lambda f, mode="r", *a, **k:  # the shared writers' files
                            _SmallDisk(builtins.open(f, mode, *a, **k), 64 * 1024), raising=False)
    try:
        monkeypatch.chdir(tmp_path)
        overlay = fit_overlay(tmp_path / "overlay.yaml", run, data, tmp_path / "cache", max_epochs=1, fast=True)
        rc = main(["fit", "-c", str(CFG / "trainer" / "cpu.yaml"), "-c", str(CFG / "data" / "synthetic.yaml"),
                   "-c", str(CFG / "teacher_mri.yaml"), "-c", str(overlay)])
        last = _last_err(capsys)
        left = _files(ckpts)
    finally:
        if disk == "tmpfs":
            umount(ckpts)
    assert rc == 1 and last.startswith(f"trifuse fit: error: {ckpts}: no space left on device while writing best.ckpt"), last
    assert left == []


def test_atomic_outputs_get_the_umask_mode_not_mkstemp_0600(tmp_path):
    """Outputs on a shared cluster must be readable by the group like any file the user writes."""
    from trifuse.io import nifti as nifti_mod

    old = os.umask(0o027)
    try:
        nifti_mod._FILE_MODE = None  # read the umask anew
        nifti_mod.atomic_write_text(tmp_path / "a.json", "{}")
        mode = (tmp_path / "a.json").stat().st_mode & 0o777
    finally:
        os.umask(old)
        nifti_mod._FILE_MODE = None
    assert mode == 0o640, oct(mode)
