"""Kill-and-rerun harness: run a `trifuse` stage as a subprocess, SIGKILL it at a point seen
from outside (a temporary file or the n-th output appearing in its output folder), then
check what it left: nothing half-written under a final name, and a rerun that completes,
skips finished work and produces the outputs of an uninterrupted run.

The kill points are observed by polling the output folder (every ~1 ms), never by hooks in
the code under test, so the harness tests the stage as a user's `kill -9` or a pre-empted
cluster job would meet it.
"""
from __future__ import annotations

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
_ENTRY = "import sys; from lightning_app.cli import main; sys.exit(main(sys.argv[1:]))"


def stage_env() -> dict:
    """The environment of a stage subprocess: offline W&B, two threads (as the tests use)."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)})
    return env


def listing(folders) -> list[Path]:
    """Every file and folder under ``folders`` (recursive), hidden ones included."""
    out = []
    for f in folders:
        f = Path(f)
        if not f.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(f):
            out += [Path(dirpath) / n for n in dirnames + filenames]
    return out


def is_temp(p: Path) -> bool:
    """A writer's temporary: ``.<name>.<random>[.tmp]`` files and ``.<case>.<random>`` folders."""
    return any(part.startswith(".") for part in p.parts[-3:]) or p.name.endswith((".tmp", ".part"))


def first_temp(paths: list[Path]) -> bool:
    """Kill point: a temporary file or folder exists (a write is in progress)."""
    return any(is_temp(p) for p in paths)


def first_write(paths: list[Path]) -> bool:
    """Kill point: a temporary exists or the first output file has appeared (a write is in
    progress or has just finished). A small file's write can complete between two polls; its
    appearance is then the earliest moment seen from outside."""
    return any(is_temp(p) or p.is_file() for p in paths)


def n_outputs(n: int, pattern: str):
    """Kill point: at least ``n`` final (non-temporary) files matching ``pattern`` exist."""

    def when(paths: list[Path]) -> bool:
        return sum(1 for p in paths if p.match(pattern) and not is_temp(p) and p.is_file()) >= n

    when.__name__ = f"after_{n}_{pattern}"
    return when


@dataclass
class KillResult:
    killed: bool  #: SIGKILL was sent before the stage finished
    rc: int | None
    seconds: float
    temp_at_kill: list[str] = field(default_factory=list)  #: temporaries present when the kill landed
    stderr: str = ""


def run_and_kill(argv: list[str], watch, when, cwd, timeout: float = 300.0, poll_s: float = 0.001) -> KillResult:
    """Start ``trifuse <argv>`` and SIGKILL it as soon as ``when(listing(watch))`` is true.

    Returns whether the kill happened before the stage exited on its own.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _ENTRY, *argv], cwd=cwd, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            paths = listing(watch)
            if when(paths):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return KillResult(True, proc.returncode, time.perf_counter() - t0,
                                  sorted(str(p) for p in paths if is_temp(p)), proc.stderr.read().decode()[-2000:])
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"trifuse {' '.join(argv)} ran {timeout} s without reaching the kill point")
            time.sleep(poll_s)
        return KillResult(False, proc.returncode, time.perf_counter() - t0, [], proc.stderr.read().decode()[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_stage(argv: list[str], cwd, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``trifuse <argv>`` to completion in a subprocess."""
    return subprocess.run([sys.executable, "-c", _ENTRY, *argv], cwd=cwd, env=stage_env(), capture_output=True,
                          text=True, timeout=timeout)


def finals(folder) -> dict[str, Path]:
    """Relative path → file, for the final (non-temporary) files under ``folder``."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p for p in listing([folder]) if p.is_file() and not is_temp(p.relative_to(folder))}


def read_fully(p: Path) -> None:
    """Read a stage output completely the way its consumer does; raise if it is partial."""
    name = p.name
    if name.endswith((".nii.gz", ".nii")):
        np.asarray(nib.load(str(p)).dataobj)
    elif name.endswith(".npy"):
        np.load(p)
    elif name.endswith(".npz"):
        with np.load(p) as z:
            for k in z.files:
                z[k]
    elif name.endswith(".json"):
        json.loads(p.read_text())
    elif name.endswith(".jsonl"):
        for line in p.read_text().splitlines():
            if line.strip():
                json.loads(line)
    elif name.endswith((".pt", ".ckpt")):
        torch.load(p, map_location="cpu", weights_only=False)
    elif name.endswith(".csv"):
        list(csv.reader(open(p, newline="")))
    elif name.endswith(".gz"):
        gzip.decompress(p.read_bytes())


def assert_all_readable(folder) -> int:
    """Every final file under ``folder`` reads back completely. Returns how many were read."""
    files = finals(folder)
    for rel, p in files.items():
        try:
            read_fully(p)
        except Exception as exc:  # noqa: BLE001 - the message must name the half-written file
            raise AssertionError(f"{p}: a final-named output does not read back ({type(exc).__name__}: {exc})") from None
    return len(files)


def stamps(folder) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every final file: unchanged stamps mean the rerun skipped it."""
    return {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in finals(folder).items()}


def differing(a, b, ignore=()) -> list[str]:
    """Relative paths whose bytes differ between two output folders (or exist in one only)."""
    fa, fb = finals(a), finals(b)
    keys = (set(fa) | set(fb)) - {k for k in set(fa) | set(fb) if any(Path(k).match(g) for g in ignore)}
    return sorted(k for k in keys if k not in fa or k not in fb or fa[k].read_bytes() != fb[k].read_bytes())


def leftovers(folder) -> list[str]:
    """Temporaries still present (a completed rerun should have cleaned what it owns)."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in listing([folder]) if is_temp(p.relative_to(folder)))
