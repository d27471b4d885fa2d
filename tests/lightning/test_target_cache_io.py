"""The cached teacher targets are written by the shared atomic writer (trifuse.io.nifti): a
writer-tagged temporary that a later run sweeps when its writer was killed, fsync before the
rename, and a full disk that names the folder and leaves nothing partial."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trifuse.io import nifti as nifti_mod
from trifuse.lightning import target_cache as tc

ROOT = Path(__file__).resolve().parents[2]


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("kind", ["npy", "json"])
def test_a_full_disk_names_the_folder_and_keeps_the_previous_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "targets" / ("BraTS2021_00000.logits.npy" if kind == "npy" else "BraTS2021_00000.json")
    path.parent.mkdir()
    save = (lambda v: tc._save_npy(path, np.full((2, 3), v, np.float16))) if kind == "npy" else (  # noqa: E731
        lambda v: tc._save_json(path, {"fill_logits": [v]}))
    save(1.0)
    before = path.read_bytes()
    monkeypatch.setattr(nifti_mod.os, "fsync", _enospc)  # the data is flushed to disk before the rename
    with pytest.raises(nifti_mod.OutOfSpaceError, match=rf"^{path.parent}: no space left on device while writing {path.name}"):
        save(2.0)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == [path.name]


_KILLED = """import os, signal, sys
import numpy as np
from pathlib import Path
from trifuse.lightning import target_cache as tc
def half(fh, arr, *a, **k):  # half of the array is out, then the process is killed
    fh.write(b"\\x93NUMPY half")
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
tc.np.save = half
tc._save_npy(Path(sys.argv[1]), np.zeros((4, 4), np.float16))
"""


def test_a_killed_writer_leaves_only_a_tagged_temporary_that_is_swept(tmp_path):
    folder = tmp_path / "targets"
    folder.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED, str(folder / "BraTS2021_00000.logits.npy")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = list(folder.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".BraTS2021_00000.logits.npy.~") and left[0].suffix == ".tmp", left
    # the next build sweeps it when it opens the folder
    ckpt = tmp_path / "teacher.ckpt"
    ckpt.write_bytes(b"a teacher checkpoint")
    tc.TeacherTargetCache(folder, ckpt, roi_size=(16, 16, 16)).check_stamp()
    assert sorted(p.name for p in folder.iterdir()) == ["stamp.json"]

