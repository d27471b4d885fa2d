"""NIfTI read/write that keeps affine and header, with clear errors and atomic writes."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np


log = logging.getLogger(__name__)


class DataError(ValueError):
    """A problem with an input file. The message names the file and the problem."""


class OutOfSpaceError(OSError):
    """The disk (or quota) of an output folder is full; the message names the folder."""


#: errno values that mean "the output folder is full"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextlib.contextmanager
def disk_full_names(folder: str | os.PathLike, what: str = ""):
    """Turn ``ENOSPC``/``EDQUOT`` raised inside the block into :class:`OutOfSpaceError` naming ``folder``.

    The writers below clean their temporary files up in ``finally`` blocks, so no partial
    output remains; this only gives the failure a message a user can act on.
    """
    try:
        yield
    except OutOfSpaceError:
        raise
    except OSError as exc:
        # numpy's tofile reports a short write as "N requested and M written", without errno
        short = exc.errno is None and re.search(r"\d+ requested and \d+ written", str(exc))
        if exc.errno not in _FULL and not short:
            raise
        detail = f" while writing {what}" if what else ""
        raise OutOfSpaceError(
            f"{Path(folder)}: no space left on device{detail} ({os.strerror(exc.errno or errno.ENOSPC)}); "
            "nothing partial was kept: free space there or write elsewhere"
        ) from None


@dataclass
class NiftiVolume:
    """A decoded volume with its geometry.

    Attributes:
        data: array in the file's own voxel order (no reorientation), shape ``(X, Y, Z)``.
        affine: 4×4 voxel → world (RAS+, mm) matrix.
        header: the original NIfTI header (copied on write so the output grid matches).
        path: source file.
        notes: what reading changed, one line each (e.g. a squeezed 4-D singleton axis).
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path
    notes: list[str] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, in array-axis order."""
        return tuple(float(z) for z in self.header.get_zooms()[:3])


def load_header(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI lazily (header only); raise :class:`DataError` naming the file if unreadable."""
    path = Path(path)
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as exc:  # nibabel raises several types for corrupt headers
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None


def read_nifti(path: str | os.PathLike, dtype=np.float32) -> NiftiVolume:
    """Decode a NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        dtype: output dtype; ``None`` keeps the on-disk dtype (used for label maps).

    Raises:
        DataError: missing, corrupt or truncated file, or a file that is not 3-D.
    """
    img = load_header(path)
    path = Path(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass  # a trailing singleton is harmless
    elif len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(shape)} ({len(shape)}-D)")
    try:
        if dtype is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = np.asarray(img.get_fdata(dtype=np.float32) if np.dtype(dtype).kind == "f" else img.dataobj, dtype=dtype)
    except Exception as exc:  # EOFError / zlib.error / OSError on truncated gzip
        raise DataError(f"{path}: corrupt or truncated data ({type(exc).__name__}: {exc})") from None
    notes = []
    if data.ndim == 4:
        data = data[..., 0]
        notes.append(f"{path}: 4-D file of shape {tuple(shape)} with a singleton 4th axis; squeezed to 3-D {data.shape}")
        log.warning(notes[-1])
    return NiftiVolume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path, notes=notes)


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(name: str) -> str:
    """Prefix of a writer's temporary sibling of ``name``: hidden, and tagged with the writer.

    ``.<name>.~<pid>@<host hash>~.`` lets :func:`sweep_dead_temps` tell the debris of a killed
    writer from the temporary of one that is still running (another rank, another stage).
    """
    return f".{name}.~{os.getpid()}@{_host_tag()}~."


_TEMP_TAG = re.compile(r"^\..*\.~(\d+)@([0-9a-f]{8})~\.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed writers of this host left directly in ``folder``.

    Only names made by :func:`temp_prefix` whose process is gone are removed; a live writer's
    temporary (another process writing into the same folder) is left alone. Nothing removed
    here was ever visible under a final name, so this only reclaims disk.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = _host_tag()
    for p in folder.iterdir():
        m = _TEMP_TAG.match(p.name)
        if not m or m.group(2) != host or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        log.info("removed %s, left by an interrupted writer", p)
    return removed


def _file_mode() -> int:
    """Mode of a new regular file under this process's umask (what ``open(path, "w")`` gives)."""
    global _FILE_MODE
    if _FILE_MODE is None:
        try:  # /proc reads the umask without changing it (os.umask would, racing other threads)
            with open("/proc/self/status") as fh:
                mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError):
            mask = os.umask(0o022)
            os.umask(mask)
        _FILE_MODE = 0o666 & ~mask
    return _FILE_MODE


_FILE_MODE: int | None = None


def atomic_path(path: Path, suffix: str | None = None) -> Path:
    """A temporary sibling of ``path`` (same folder, so ``os.replace`` is atomic), tagged with
    this writer (:func:`temp_prefix`).

    ``suffix`` defaults to ``.tmp`` plus ``path``'s own suffixes (``.tmp.nii.gz``: writers that
    pick the format from the name, such as nibabel, see the right one); pass ``".tmp"`` where a
    reader may glob the final suffix (``*.json``, ``*.ckpt``) and must not see the temporary.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name),
                               suffix=".tmp" + "".join(path.suffixes) if suffix is None else suffix, dir=path.parent)
    try:
        # mkstemp makes 0600 files; outputs get the umask's mode like any file (shared clusters, group-readable runs)
        os.fchmod(fd, _file_mode())
    finally:
        os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, what: str = "", suffix: str | None = None):
    """Write ``path`` atomically: yield a tagged temporary sibling (:func:`atomic_path`) to write,
    then ``os.replace`` it onto ``path``.

    The block writes the temporary completely (and fsyncs it where it can). On an error
    nothing remains but the previous ``path``; after a kill the temporary remains, hidden and
    never read, until the next run sweeps it (:func:`sweep_dead_temps`). A full disk raises
    :class:`OutOfSpaceError` naming ``path``'s folder (``what`` says what was being written,
    default the file name).
    """
    path = Path(path)
    with disk_full_names(path.parent, what or path.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = atomic_path(path, suffix)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, header=None) -> Path:
    """Write a volume atomically (temp file + rename), keeping affine and header.

    Args:
        path: destination ``.nii`` or ``.nii.gz``.
        data: 3-D array; its dtype is written (the header's datatype is updated to match).
        affine: 4×4 matrix, normally the input's.
        header: optional source header; spacing, units and qform/sform codes are kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine), header=hdr)
    img.set_data_dtype(np.asarray(data).dtype)
    if hdr is not None:
        # keep the same qform/sform codes as the source so viewers align the output
        img.set_qform(np.asarray(affine), code=int(hdr["qform_code"]) or 1)
        img.set_sform(np.asarray(affine), code=int(hdr["sform_code"]) or 1)
        # scaling from the source (e.g. float MRI) must not apply to labels
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_target(path) as tmp:
        nib.save(img, str(tmp))
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str = ""):
    """Write ``path`` atomically through a binary file: yield the open writer-tagged temporary
    (:func:`atomic_target`), then flush, fsync and ``os.replace`` it onto ``path``.

    The temporary ends in ``.tmp``, not ``.tmp.json``: a reader globbing ``*.json`` / ``*.npz``
    / ``*.ckpt`` never sees it. A full disk raises :class:`OutOfSpaceError` naming the folder.
    """
    with atomic_target(path, what, suffix=".tmp") as tmp, open(tmp, "wb") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write bytes atomically (writer-tagged temp file in the same folder, fsync, ``os.replace``)."""
    with atomic_file(path) as fh:
        fh.write(payload)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_file` (a writer-tagged
    ``.<name>.~<pid>@<host>~.<random>.tmp`` in the same folder, fsync, rename).

    The temporary never ends in ``.ckpt`` / ``.pt`` (a reader globbing those never picks it
    up); a full disk raises :class:`OutOfSpaceError` naming the folder, and nothing partial
    remains. Torch is imported here, not with this module.
    """
    import torch

    with atomic_file(path) as fh:
        out = _WriteErrors(fh)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is not None:  # torch's zip writer reports a failed write as "unexpected pos ..."
                raise out.error from None
            raise


class _WriteErrors:
    """A binary file that remembers the ``OSError`` of a failed write (``ENOSPC``: a full disk).

    ``torch.save`` turns an exception raised by its file's ``write`` into a ``RuntimeError``
    about a position mismatch; this keeps the original, so the caller can name the cause.
    """

    def __init__(self, fh) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.fh.flush()
