"""Kill-and-rerun harness: run a `trifuse` stage as a subprocess, SIGKILL it at a point seen
from outside (a temporary file or the n-th output appearing in its output folder), then
check what it left: nothing half-written under a final name, and a rerun that completes,
skips finished work and produces the outputs of an uninterrupted run.

The kill points are observed by polling the output folder (every ~1 ms), never by hooks in
the code under test, so the harness tests the stage as a user's `kill -9` or a pre-empted
cluster job would meet it. The stage process is a fresh interpreter (slow set) or forked from
a warm one that has imported the libraries (:class:`ForkServer`, fast set: a stage's imports
cost ~10 s on a loaded 2-core machine, its work on the tiny inputs well under a second).
:func:`plant_dead_temps` leaves the debris of a writer killed mid-write for the rerun to sweep.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import json
import os
import select
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
    """The environment of a stage subprocess: offline W&B, one thread (as the in-process runs of
    these tests: on a shared 2-core machine two-thread OpenMP kernels spin and run far slower)."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
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


def temp_beside(existing: str):
    """Kill point: a temporary is being written in the folder of an existing ``existing`` file
    (fit: the second validation writes its checkpoints over the first's ``best.ckpt`` and
    ``last.ckpt``). Should that write fall between two polls, the kill lands right after
    ``existing`` has been replaced (its inode changed)."""
    first: dict[str, int] = {}

    def when(paths: list[Path]) -> bool:
        hit = [p for p in paths if p.match(existing) and not is_temp(p)]
        if not hit:
            return False
        try:
            ino = hit[0].stat().st_ino
        except FileNotFoundError:
            return False
        if first.setdefault("ino", ino) != ino:
            return True
        return any(is_temp(p) and p.parent == hit[0].parent for p in paths)

    when.__name__ = f"temp_beside_{existing}"
    return when


_PLANT = """import os, signal, sys
from pathlib import Path
from trifuse.io.nifti import atomic_path
for d in sys.argv[1:]:
    t = atomic_path(Path(d) / "killed_writer.json")
    t.write_text('{"half')
    print(t, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def plant_dead_temps(folders) -> list[Path]:
    """Leave, in each of ``folders``, the half-written temporary of a writer SIGKILLed mid-write
    (a real process writes it through :func:`trifuse.io.nifti.atomic_path` and is killed)."""
    folders = [Path(f) for f in folders]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", _PLANT, *map(str, folders)], cwd=ROOT, env=stage_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    planted = [Path(line) for line in proc.stdout.splitlines()]
    assert len(planted) == len(folders) and all(p.is_file() for p in planted)
    return planted


@dataclass
class KillResult:
    killed: bool  #: SIGKILL was sent before the stage finished
    rc: int | None
    seconds: float
    temp_at_kill: list[str] = field(default_factory=list)  #: temporaries present when the kill landed
    stderr: str = ""


#: a warm interpreter that forks one stage process per request (see :class:`ForkServer`)
_FORK_SERVER = """import json, os, sys, traceback
ctl = os.fdopen(os.dup(1), "w")  # the control pipe: pids and exit codes only
os.dup2(2, 1)  # whatever else prints goes to stderr
for m in sys.argv[1:]:
    __import__(m)
from lightning_app.cli import main
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the stage process: its own folder, its own log, nothing of the server's pipes
        ctl.close()
        os.chdir(req["cwd"])
        log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(os.devnull)
        try:
            rc = main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        raise SystemExit(rc)
    ctl.write(f"{pid}\\n")
    ctl.flush()
    ctl.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\\n")
    ctl.flush()
"""


class ForkServer:
    """Stage processes forked from one warm interpreter that has imported the stages' libraries.

    A stage process started this way is a separate process like any other (its own pid, files
    and exit status; SIGKILL ends it where it stands), minus the ~10 s of imports a fresh
    interpreter pays on a loaded 2-core machine: the fast kill tests use it, the slow set
    starts fresh interpreters.
    """

    PRELOAD = ("lightning_app.lightning_cli", "trifuse.inference", "trifuse.io.preprocess", "trifuse.metrics.report",
               "trifuse.physics.ct", "trifuse.semantic.clip_data", "trifuse.semantic.describe", "trifuse.semantic.priors",
               "trifuse.synth", "trifuse.lightning.teacher", "trifuse.lightning.callbacks", "trifuse.physics.paired",
               "trifuse.physics.ultrasound", "monai.losses")

    def __init__(self, preload=PRELOAD):
        self.proc = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, *preload], cwd=ROOT, env=stage_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=False)
        self._buf = b""

    def spawn(self, argv: list[str], cwd, log) -> int:
        """Fork ``trifuse <argv>`` running in ``cwd``, stdout and stderr to ``log``; its pid."""
        self.proc.stdin.write((json.dumps({"argv": list(argv), "cwd": str(cwd), "log": str(log)}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(120.0)
        if line is None:
            raise RuntimeError(f"the fork server did not start trifuse {' '.join(argv)}")
        return int(line)

    def exit_code(self, timeout: float = 0.0) -> int | None:
        """The last spawned process's exit code (negative: killed by that signal), or None if still running."""
        line = self._line(timeout)
        return None if line is None else int(line)

    def _line(self, timeout: float) -> str | None:
        end = time.perf_counter() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = max(0.0, end - time.perf_counter())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server exited (rc {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        """End the (idle) server; its interpreter's orderly shutdown would only cost seconds."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def _run_and_kill_forked(server: ForkServer, argv, watch, when, cwd, timeout, poll_s) -> KillResult:
    t0 = time.perf_counter()
    log = Path(cwd) / f".stage-{time.monotonic_ns()}.log"  # hidden: the watched folders never hold it
    pid = server.spawn(argv, cwd, log)
    try:
        while (rc := server.exit_code()) is None:
            paths = listing(watch)
            if when(paths):
                os.kill(pid, signal.SIGKILL)
                rc = server.exit_code(120.0)
                return KillResult(True, rc, time.perf_counter() - t0, sorted(str(p) for p in paths if is_temp(p)),
                                  log.read_text(errors="replace")[-2000:])
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"trifuse {' '.join(argv)} ran {timeout} s without reaching the kill point")
            time.sleep(poll_s)
        return KillResult(False, rc, time.perf_counter() - t0, [], log.read_text(errors="replace")[-2000:])
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        server.exit_code(120.0)
        raise


def run_and_kill(argv: list[str], watch, when, cwd, timeout: float = 300.0, poll_s: float = 0.001,
                 server: ForkServer | None = None) -> KillResult:
    """Start ``trifuse <argv>`` and SIGKILL it as soon as ``when(listing(watch))`` is true.

    The stage runs in a fresh interpreter, or forked from ``server`` (already imported).
    Returns whether the kill happened before the stage exited on its own.
    """
    if server is not None:
        return _run_and_kill_forked(server, argv, watch, when, cwd, timeout, poll_s)
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
