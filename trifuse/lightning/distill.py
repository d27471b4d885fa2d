"""Asynchronous multi-teacher distillation, run by a callback.

:class:`AsyncTeacherDistillation` owns the frozen teachers (they are *not* submodules
of the student, so their weights never reach student checkpoints) and provides the
student with each batch's teacher targets: region logits and bottleneck features.

Asynchrony:

* the targets of a batch are computed in a background thread (on GPU in a side CUDA
  stream, in bf16/fp16 autocast), started in ``on_train_batch_start`` so they overlap
  the student's forward pass;
* when Lightning's data fetcher has already fetched the *next* batch (it prefetches one
  to detect the epoch end), its targets are started as well, overlapping the rest of the
  student's step. A look-ahead result is used only if it belongs to the same patches
  (case ids and patch boxes match); otherwise targets are computed for the batch at hand,
  so asynchrony never changes what is learned;
* every ``poll_every_n_steps`` the teachers' checkpoint files are checked and a newer one
  is swapped in, so the student can start while the teachers are still training.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch

from trifuse import keys

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """A checkpoint file, or the newest ``*.ckpt`` of a folder (``best.ckpt`` preferred)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (p / name).exists():
                return p / name
        ckpts = sorted(p.rglob("*.ckpt"), key=lambda q: q.stat().st_mtime)
        return ckpts[-1] if ckpts else None
    return None


def load_teacher(path: Path, device: torch.device) -> L.LightningModule:
    from trifuse.lightning.teacher import TeacherModule

    teacher = TeacherModule.load_from_checkpoint(str(path), map_location=device, weights_only=False)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher.to(device)


def _batch_key(batch: dict) -> tuple:
    metas = batch.get(keys.META) or []
    boxes = tuple(str(m.get("patch_box")) + str([a for a in m.get("applied", []) if a.get("name") == "RandomAugment"]) for m in metas)
    return tuple(batch.get(keys.CASE_ID) or ()), boxes


class AsyncTeacherDistillation(L.Callback):
    """Frozen teachers → targets for the student, computed ahead in the background.

    Args:
        teachers: modality → checkpoint file or folder (e.g. ``{"mri": "runs/teachers/mri/checkpoints"}``).
        asynchronous: compute in a background thread (``False``: inline, for comparison).
        lookahead: also start the next batch's targets when the loader already has it.
        watch: swap in newer teacher checkpoints as they land.
        poll_every_n_steps: how often to look for newer checkpoints.
        precision: teacher autocast dtype on GPU (``"bf16"``, ``"fp16"`` or ``"fp32"``);
            teachers always run in fp32 on CPU.
        wait_for_teachers_s: at fit start, wait this long for missing teacher checkpoints
            (teachers still training); then fail with a clear error.
    """

    def __init__(
        self,
        teachers: dict[str, str],
        asynchronous: bool = True,
        lookahead: bool = True,
        watch: bool = True,
        poll_every_n_steps: int = 20,
        precision: str = "bf16",
        wait_for_teachers_s: float = 0.0,
    ):
        if not teachers:
            raise ValueError("AsyncTeacherDistillation needs at least one teacher checkpoint")
        self.teacher_paths = {m: str(p) for m, p in teachers.items()}
        self.asynchronous = asynchronous
        self.lookahead = lookahead
        self.watch = watch
        self.poll_every_n_steps = max(1, int(poll_every_n_steps))
        self.precision = precision
        self.wait_for_teachers_s = wait_for_teachers_s
        self.teachers: dict[str, L.LightningModule] = {}
        self.loaded: dict[str, tuple[str, int]] = {}  # modality → (file, mtime_ns)
        self.swaps = 0
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pending: dict[tuple, cf.Future] = {}
        self._lock = threading.Lock()
        self._stream = None
        self.stats = {"lookahead_hits": 0, "computed_now": 0}
        self.enabled = True

    # --- teachers -------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.teacher_paths)

    def _load_all(self, device: torch.device, wanted: Optional[Sequence[str]] = None) -> None:
        """Load the teachers (only the ``wanted`` modalities, if given)."""
        import time

        deadline = time.monotonic() + self.wait_for_teachers_s
        if wanted is not None:
            unknown = [m for m in wanted if m not in self.teacher_paths]
            if unknown:
                raise ValueError(f"the student wants teachers {unknown} but the callback has no checkpoint path for them")
            self.teacher_paths = {m: p for m, p in self.teacher_paths.items() if m in wanted}
        for m, path in self.teacher_paths.items():
            ckpt = resolve_checkpoint(path)
            while ckpt is None and time.monotonic() < deadline:
                time.sleep(min(5.0, self.wait_for_teachers_s))
                ckpt = resolve_checkpoint(path)
            if ckpt is None:
                raise FileNotFoundError(f"teacher {m!r}: no checkpoint at {path} (run `make teachers` first)")
            self.teachers[m] = load_teacher(ckpt, device)
            self.loaded[m] = (str(ckpt), ckpt.stat().st_mtime_ns)
            if getattr(self.teachers[m], "modality", m) != m:
                log.warning("teacher %s: checkpoint %s is a %s teacher", m, ckpt, self.teachers[m].modality)

    def refresh(self, device: torch.device) -> int:
        """Swap in teachers whose checkpoint file changed; returns how many were swapped."""
        n = 0
        for m, path in self.teacher_paths.items():
            ckpt = resolve_checkpoint(path)
            if ckpt is None:
                continue
            stamp = (str(ckpt), ckpt.stat().st_mtime_ns)
            if stamp != self.loaded.get(m):
                self._drain()
                try:
                    self.teachers[m] = load_teacher(ckpt, device)
                except Exception as exc:  # a checkpoint still being written: try again later
                    log.warning("teacher %s: could not load %s yet (%s)", m, ckpt, exc)
                    continue
                self.loaded[m] = stamp
                self.swaps += 1
                n += 1
                log.info("teacher %s: swapped in %s", m, ckpt)
        return n

    # --- target computation -----------------------------------------------------------
    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.precision in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def compute_targets(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Teacher logits and bottleneck features of a batch: ``{modality: {"logits", "bottleneck"}}``."""
        out = {}
        device = batch[keys.MRI].device
        stream_ctx = torch.cuda.stream(self._stream) if (self._stream is not None and device.type == "cuda") else contextlib.nullcontext()
        with torch.no_grad(), stream_ctx, self._autocast(device):
            for m, teacher in self.teachers.items():
                x = teacher.net_input(batch)
                logits, feats = teacher.net(x, return_features=True)
                out[m] = {"logits": logits.float(), "bottleneck": feats["bottleneck"].float()}
        if self._stream is not None and device.type == "cuda":
            self._stream.synchronize()
        return out

    def _submit(self, batch: dict) -> cf.Future:
        if not self.asynchronous:
            fut: cf.Future = cf.Future()
            fut.set_result(self.compute_targets(batch))
            return fut
        return self._pool.submit(self.compute_targets, batch)

    def _drain(self) -> None:
        for fut in list(self._pending.values()):
            with contextlib.suppress(Exception):
                fut.result()
        self._pending.clear()

    def targets(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """The targets of ``batch`` (joins the background computation)."""
        key = _batch_key(batch)
        fut = self._pending.pop(key, None)
        if fut is None:
            fut = self._submit(batch)
        return fut.result()

    # --- hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # the student decides which teachers it learns from (ablations: none, MRI only, ...)
        wanted = getattr(pl_module, "teacher_modalities", None)
        self.enabled = wanted is None or len(wanted) > 0
        if not self.enabled:
            return
        self._load_all(pl_module.device, wanted)
        pl_module.distiller = self
        if hasattr(pl_module, "check_teachers"):
            pl_module.check_teachers(self.teachers)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        device = pl_module.device
        for m, t in self.teachers.items():
            self.teachers[m] = t.to(device)
        if self.asynchronous:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-targets")
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        pl_module.distiller = self

    def _next_batch(self, trainer) -> Any:
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        batches = getattr(fetcher, "batches", None)
        return batches[0] if batches else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.enabled:
            return
        if self.watch and batch_idx % self.poll_every_n_steps == 0 and batch_idx > 0:
            if self.refresh(pl_module.device):
                pl_module.log("distill/teacher_swaps", float(self.swaps), rank_zero_only=True)
        key = _batch_key(batch)
        if key in self._pending:
            self.stats["lookahead_hits"] += 1
        else:
            self.stats["computed_now"] += 1
            self._pending[key] = self._submit(batch)
        if self.asynchronous and self.lookahead:
            nxt = self._next_batch(trainer)
            if isinstance(nxt, dict) and keys.MRI in nxt:
                nxt = trainer.strategy.batch_to_device(nxt, pl_module.device)
                dm = trainer.datamodule
                if dm is not None and hasattr(dm, "on_after_batch_transfer") and getattr(dm, "transforms_on_device", False):
                    return  # device-side transforms would draw new randomness: no look-ahead
                nkey = _batch_key(nxt)
                if nkey not in self._pending:
                    self._pending[nkey] = self._submit(nxt)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def state_dict(self) -> dict:
        # paths and counters only: teacher weights never go into student checkpoints
        return {"loaded": dict(self.loaded), "swaps": self.swaps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.swaps = int(state_dict.get("swaps", 0))
