"""Checkpoint writes that a reader can never see half-done (temporary file in the same folder + rename).

The student reads the teachers' checkpoints while they train (checkpoint hot-swap of
:class:`~trifuse.lightning.distill.AsyncTeacherDistillation`). Lightning's own save goes
through an fsspec transaction whose temporary file lives in the *system* temp folder
(``tempfile.mkstemp()``) and is moved with ``shutil.move``: when ``/tmp`` and the run folder
are on different file systems (the rule on clusters) that move is a copy, and a reader can
open a truncated ``best.ckpt``. Here the temporary file is created next to the target and
``os.replace``-d onto it, which POSIX makes atomic within one file system.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through ``.<name>.<random>.tmp`` in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: local checkpoints are written atomically (see module doc).

    Remote URLs (``s3://`` …) keep Lightning's own path. Use it in a trainer config::

        trainer:
          plugins:
            - class_path: trifuse.lightning.checkpoint_io.AtomicCheckpointIO
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
