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

from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

# atomic_torch_save lives with the other shared writers (no Lightning import there); re-exported here
from trifuse.io.nifti import atomic_torch_save, sweep_dead_temps  # noqa: F401


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: local checkpoints are written atomically (see module doc).

    The first local save also removes the temporaries a killed earlier run left in the
    checkpoint folder. A full disk fails the run with a message naming the folder.
    Remote URLs (``s3://`` …) keep Lightning's own path. Use it in a trainer config::

        trainer:
          plugins:
            - class_path: trifuse.lightning.checkpoint_io.AtomicCheckpointIO
    """

    def __init__(self) -> None:
        super().__init__()
        self._swept: set[Path] = set()  #: checkpoint folders already cleaned of a killed run's temporaries

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if Path(path).parent not in self._swept:  # a killed run's temporaries (never a live writer's)
            sweep_dead_temps(Path(path).parent)
            self._swept.add(Path(path).parent)
        atomic_torch_save(checkpoint, path)
