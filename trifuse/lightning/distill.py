"""Asynchronous multi-teacher distillation, run by a callback.

:class:`AsyncTeacherDistillation` owns the frozen teachers (they are *not* submodules
of the student, so their weights never reach student checkpoints) and provides the
student with each batch's teacher targets: region logits and bottleneck features.

Asynchrony (DESIGN.md, "Asynchronous distillation"):

* **look-ahead through a supported route**: the data module's training loader is a
  :class:`LookaheadDataLoader`. It fetches batch t+1 before it hands batch t to Lightning
  and gives it to the callback, which moves it to the device and starts its targets in a
  background thread while the student learns on batch t. Lightning's prefetching fetcher
  is never read (it does not prefetch sized loaders anyway);
* without the look-ahead (a plain loader, device-side transforms that would draw new
  randomness) a batch's targets start in ``on_train_batch_start``, overlapping the
  student's forward pass;
* a result is used only for the same inputs (identical tensors, or equal ones), so
  asynchrony never changes what is learned;
* on CUDA the thread works on a side stream that first waits on the stream that copied
  the batch (``non_blocking`` transfers), ``record_stream`` marks every tensor that
  crosses streams, and the student's stream waits on an event before reading targets;
* every ``poll_every_n_steps`` optimizer steps the teachers' checkpoint files are checked
  and a newer one swapped in (the student can start while the teachers still train). A
  checkpoint is accepted only when its size and mtime did not change while it was read;
  a vanished or unreadable file is skipped; under DDP rank 0 decides and broadcasts, and
  all ranks swap at the same step or none does.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader

from trifuse import keys

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """A checkpoint file, or the newest ``*.ckpt`` of a folder (``best.ckpt`` preferred).

    Temporary files of atomic writes (``.<name>.<random>.tmp``) are never returned. Returns
    None when there is none (yet), also when files vanish while the folder is listed.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (p / name).exists():
                return p / name
        stamped = []
        for q in p.rglob("*.ckpt"):
            with contextlib.suppress(FileNotFoundError):
                stamped.append((q.stat().st_mtime_ns, q))
        return max(stamped)[1] if stamped else None
    return None


def file_stamp(path: Path) -> Optional[tuple[int, int]]:
    """``(size in bytes, mtime in ns)`` of a file, or None when it does not exist (any more)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def load_teacher(path: Path, device: torch.device) -> L.LightningModule:
    """A frozen teacher (eval mode, no grad) from a TeacherModule checkpoint."""
    from trifuse.lightning.teacher import TeacherModule

    teacher = TeacherModule.load_from_checkpoint(str(path), map_location=device, weights_only=False)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher.to(device)


def resolve_teacher_dtype(
    precision: str, trainer_precision: Optional[str], device: torch.device, bf16_supported: Optional[bool] = None
) -> Optional[torch.dtype]:
    """Autocast dtype of the frozen teachers (None: fp32).

    Args:
        precision: ``"auto"`` (follow the trainer: ``bf16-mixed`` → bf16, ``16-mixed`` → fp16,
            ``32-true`` → fp32, so the Makefile's ``PRECISION`` holds for student and teachers
            alike), ``"reduced"`` (bf16 where ``torch.cuda.is_bf16_supported()``, else fp16),
            ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        trainer_precision: ``str(trainer.precision)``.
        device: teachers' device; on CPU they always run in fp32.
        bf16_supported: whether the GPU has bfloat16 (default: ``torch.cuda.is_bf16_supported()``).

    bf16 on a GPU without it (V100, T4) falls back to fp16 with a warning.
    """
    if precision not in ("auto", "reduced", "bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be auto, reduced, bf16, fp16 or fp32, got {precision!r}")
    if device.type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    want = precision
    if precision == "auto":
        tp = str(trainer_precision or "32-true")
        want = "bf16" if "bf16" in tp else ("fp16" if tp.startswith("16") else "fp32")
    if want == "reduced":
        want = "bf16" if bf16_supported else "fp16"
    if want == "bf16" and not bf16_supported:
        log.warning("teachers: this GPU has no bfloat16; running them in float16")
        want = "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[want]


class LookaheadDataLoader(DataLoader):
    """A ``DataLoader`` that fetches one batch ahead and shows it to ``on_fetch`` first.

    Iterating yields the same batches in the same order as a plain ``DataLoader``; the
    difference is *when* they are fetched: batch t+1 is fetched (and passed through
    ``on_fetch(batch) -> batch``) before batch t is yielded, so work on t+1 can start while
    the consumer works on t. Lightning re-creates it with a ``DistributedSampler`` under DDP
    like any ``DataLoader`` subclass (``on_fetch`` is an ``__init__`` argument).

    Args:
        *args, **kwargs: as ``torch.utils.data.DataLoader``.
        on_fetch: called with every batch as soon as it is fetched; returns the batch to
            yield (e.g. moved to the device). ``None``: a plain ``DataLoader``.
    """

    def __init__(self, *args: Any, on_fetch: Optional[Callable[[Any], Any]] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_fetch = on_fetch

    def __iter__(self):
        it = super().__iter__()
        if self.on_fetch is None:
            return it
        return self._ahead(it, self.on_fetch)

    @staticmethod
    def _ahead(it, on_fetch):
        done = object()
        nxt = next(it, done)
        if nxt is done:
            return
        nxt = on_fetch(nxt)
        while True:
            cur = nxt
            nxt = next(it, done)
            if nxt is not done:
                nxt = on_fetch(nxt)
            yield cur
            if nxt is done:
                return


@dataclasses.dataclass
class _Pending:
    inputs: dict  # key → tensor: what the teachers read
    future: cf.Future
    ahead_of_step: int  # optimizer steps completed when it was submitted


def _same_inputs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is y:
            continue
        if x.shape != y.shape or x.device != y.device or not torch.equal(x, y):
            return False
    return True


class AsyncTeacherDistillation(L.Callback):
    """Frozen teachers → targets for the student, computed ahead in the background.

    Args:
        teachers: modality → checkpoint file or folder (e.g. ``{"mri": "runs/teachers/mri/checkpoints"}``).
        asynchronous: compute in a background thread (``False``: inline, for comparison).
        lookahead: start batch t+1's targets while the student learns on batch t (needs a
            data module with a ``train_lookahead`` slot, as :class:`~trifuse.lightning.data.BratsDataModule`).
        watch: swap in newer teacher checkpoints as they land.
        poll_every_n_steps: how often (optimizer steps) to look for newer checkpoints.
        precision: teachers' autocast on GPU, see :func:`resolve_teacher_dtype` (default
            ``"auto"``: the trainer's precision); teachers run in fp32 on CPU.
        wait_for_teachers_s: at fit start, wait this long for missing teacher checkpoints
            (teachers still training); then fail with a clear error.
        mode: ``"online"`` (teachers run on every patch; checkpoint hot-swap) or ``"cached"``
            (each teacher's targets are computed once per training case by sliding window and
            stored next to the data cache, :mod:`trifuse.lightning.target_cache`; patches read
            them, cropped and augmented (flips, rotation, scaling) like the label; no hot-swap,
            and a cache made by another teacher checkpoint is refused). Only a batch without a
            recorded ``patch_box`` (not from the patch loader) gets online targets in cached
            mode; ``stats["fallback"]`` counts those.
        cache_dir: data cache holding ``teacher_targets/`` (default: the data module's cache).
        cache_roi: sliding-window ROI of the cached targets (default: the data module's patch size).
        cache_overlap: sliding-window overlap of the cached targets.

    Attributes:
        stats: ``steps`` (batches whose targets were used), ``started_ahead`` (of those,
            started while the student was still on an earlier batch), ``wait_s`` (time the
            student spent blocked on targets), ``step_s`` (time from batch start to end),
            ``cached`` (batches read from the target cache) and ``fallback`` (cached mode:
            batches that got online targets instead).
        swap_log: ``(global_step, modality, path)`` of every swap.
    """

    def __init__(
        self,
        teachers: dict[str, str],
        asynchronous: bool = True,
        lookahead: bool = True,
        watch: bool = True,
        poll_every_n_steps: int = 20,
        precision: str = "auto",
        wait_for_teachers_s: float = 0.0,
        mode: str = "online",
        cache_dir: Optional[str] = None,
        cache_roi: Optional[Sequence[int]] = None,
        cache_overlap: float = 0.5,
    ):
        if not teachers:
            raise ValueError("AsyncTeacherDistillation needs at least one teacher checkpoint")
        resolve_teacher_dtype(precision, None, torch.device("cpu"))  # validates the name
        self.teacher_paths = {m: str(p) for m, p in teachers.items()}
        self.asynchronous = asynchronous
        self.lookahead = lookahead
        self.watch = watch
        self.poll_every_n_steps = max(1, int(poll_every_n_steps))
        self.precision = precision
        self.wait_for_teachers_s = wait_for_teachers_s
        if mode not in ("online", "cached"):
            raise ValueError(f"mode must be online or cached, got {mode!r}")
        self.mode = mode
        self.cache_dir, self.cache_roi, self.cache_overlap = cache_dir, cache_roi, cache_overlap
        self.caches: dict = {}  # modality → TeacherTargetCache (cached mode)
        self.teachers: dict[str, L.LightningModule] = {}
        self.loaded: dict[str, tuple[str, int, int]] = {}  # modality → (file, size, mtime_ns)
        self.swaps = 0
        self.swap_log: list[tuple[int, str, str]] = []
        self.dtype: Optional[torch.dtype] = None
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._stream = None
        self._trainer = None
        self._completed = 0
        self._t_start: Optional[float] = None
        self.stats = {"steps": 0, "started_ahead": 0, "wait_s": 0.0, "step_s": 0.0, "cached": 0, "fallback": 0}
        self.enabled = True

    @classmethod
    def from_modules(cls, teachers: dict[str, L.LightningModule], **kwargs) -> "AsyncTeacherDistillation":
        """A callback around teachers already in memory (benchmarks, tests): nothing to load or watch."""
        cb = cls({m: f"<in memory: {m}>" for m in teachers}, watch=False, **kwargs)
        cb.teachers = {m: t.eval().requires_grad_(False) for m, t in teachers.items()}
        return cb

    # --- teachers -------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.teacher_paths)

    @property
    def input_keys(self) -> list[str]:
        """Sample keys the teachers read (the union of their ``inputs``)."""
        out: list[str] = []
        for t in self.teachers.values():
            out += [k for k in getattr(t, "inputs", (keys.MRI,)) if k not in out]
        return out

    @property
    def sample_keys(self) -> list[str]:
        """Sample keys the training batches must carry for the targets: the teachers' inputs
        online; none in cached mode (targets are cut from the cache by each patch's geometry)."""
        if not self.enabled:
            return []
        return [] if self.mode == "cached" else self.input_keys

    def _load_stable(self, path: Path, device: torch.device) -> Optional[tuple[L.LightningModule, tuple[str, int, int]]]:
        """Load a teacher if its file did not change while it was read; None otherwise."""
        before = file_stamp(path)
        if before is None:
            return None
        try:
            teacher = load_teacher(path, device)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated or still being written without an atomic rename
            log.warning("teacher checkpoint %s unreadable (%s); trying again later", path, exc)
            return None
        after = file_stamp(path)
        if after != before:
            log.info("teacher checkpoint %s changed while it was read; trying again later", path)
            return None
        return teacher, (str(path), *before)

    def _load_all(self, device: torch.device, wanted: Optional[Sequence[str]] = None) -> None:
        """Load the teachers (only the ``wanted`` modalities, if given)."""
        deadline = time.monotonic() + self.wait_for_teachers_s
        if wanted is not None:
            unknown = [m for m in wanted if m not in self.teacher_paths]
            if unknown:
                raise ValueError(f"the student wants teachers {unknown} but the callback has no checkpoint path for them")
            self.teacher_paths = {m: p for m, p in self.teacher_paths.items() if m in wanted}
        for m, path in self.teacher_paths.items():
            while True:
                ckpt = resolve_checkpoint(path)
                got = self._load_stable(ckpt, device) if ckpt is not None else None
                if got is not None or time.monotonic() >= deadline:
                    break
                time.sleep(min(5.0, max(self.wait_for_teachers_s, 0.1)))
            if got is None:
                what = "no checkpoint" if ckpt is None else f"checkpoint {ckpt} unreadable or still being written"
                raise FileNotFoundError(f"teacher {m!r}: {what} at {path} (run `make teachers` first)")
            self.teachers[m], self.loaded[m] = got
            if getattr(self.teachers[m], "modality", m) != m:
                log.warning("teacher %s: checkpoint %s is a %s teacher", m, ckpt, self.teachers[m].modality)

    def _changed(self) -> dict[str, str]:
        """Modalities whose checkpoint file differs from the loaded one: ``{modality: path}``."""
        out = {}
        for m, path in self.teacher_paths.items():
            ckpt = resolve_checkpoint(path)
            stamp = file_stamp(ckpt) if ckpt is not None else None
            if stamp is not None and (str(ckpt), *stamp) != self.loaded.get(m):
                out[m] = str(ckpt)
        return out

    def refresh(self, device: torch.device, trainer=None) -> int:
        """Swap in teachers whose checkpoint changed; returns how many were swapped.

        Under DDP (``trainer`` given) rank 0 decides which files to read and broadcasts
        them; every rank loads them, and the swap happens only if it succeeded on all ranks
        (``reduce_boolean_decision``), so all ranks swap at the same step.
        """
        strategy = getattr(trainer, "strategy", None)
        distributed = strategy is not None and getattr(trainer, "world_size", 1) > 1
        changed = self._changed() if (not distributed or trainer.global_rank == 0) else {}
        if distributed:
            changed = strategy.broadcast(changed, src=0)
        if not changed:
            return 0
        new = {}
        for m, path in changed.items():
            got = self._load_stable(Path(path), device)
            if got is not None:
                new[m] = got
        ok = len(new) == len(changed)
        if distributed:
            ok = strategy.reduce_boolean_decision(ok, all=True)
        if not ok:
            return 0
        with self._lock:
            stale = [e.inputs for e in self._pending]
        self._drain(clear=True)  # targets computed by the old teachers are not used ...
        step = int(getattr(trainer, "global_step", -1)) if trainer is not None else -1
        for m, (teacher, stamp) in new.items():
            self.teachers[m] = teacher
            self.loaded[m] = stamp
            self.swaps += 1
            self.swap_log.append((step, m, stamp[0]))
            log.info("teacher %s: swapped in %s at step %d", m, stamp[0], step)
        for inputs in stale:  # ... but started again with the new ones
            self._submit(inputs, ahead=True)
        return len(new)

    # --- target computation -----------------------------------------------------------
    def _inputs_of(self, batch: dict) -> dict:
        return {k: batch[k] for k in self.input_keys if k in batch}

    def _compute(self, inputs: dict, ready: Optional[Any], consumer: Optional[Any]):
        """Teacher targets of ``inputs``; on CUDA on the side stream: ``(targets, done event or None)``."""
        device = next(iter(inputs.values())).device
        on_side = self._stream is not None and device.type == "cuda"
        out: dict[str, dict[str, torch.Tensor]] = {}
        dev_ctx = torch.cuda.device(device) if on_side else contextlib.nullcontext()
        stream_ctx = torch.cuda.stream(self._stream) if on_side else contextlib.nullcontext()
        # explicit autocast (enabled or not): the student's autocast must not leak into the
        # inline path, and the background thread does not inherit it
        amp = torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)
        with torch.no_grad(), dev_ctx, stream_ctx:
            if on_side:
                if ready is not None:
                    self._stream.wait_event(ready)  # the batch's (non_blocking) copy is complete
                for t in inputs.values():
                    t.record_stream(self._stream)  # allocated on the student's stream, read here
            with amp:
                for m, teacher in self.teachers.items():
                    logits, feats = teacher.net(teacher.net_input(inputs), return_features=True)
                    out[m] = {"logits": logits.float(), "bottleneck": feats["bottleneck"].float()}
            done = None
            if on_side:
                for pair in out.values():
                    for t in pair.values():
                        t.record_stream(consumer)  # allocated here, read on the student's stream
                done = torch.cuda.Event()
                done.record(self._stream)
        return out, done

    def _handoff(self, inputs: dict):
        """On CUDA with a side stream: (event after the batch's copy on the current stream, that stream)."""
        device = next(iter(inputs.values())).device
        if self._stream is None or device.type != "cuda":
            return None, None
        consumer = torch.cuda.current_stream(device)
        ready = torch.cuda.Event()
        ready.record(consumer)
        return ready, consumer

    @torch.no_grad()
    def compute_targets(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """Teacher logits and bottleneck features of a batch, now: ``{modality: {"logits", "bottleneck"}}``."""
        inputs = self._inputs_of(batch)
        out, done = self._compute(inputs, *self._handoff(inputs))
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return out

    def _submit(self, batch: dict, ahead: bool) -> _Pending:
        inputs = self._inputs_of(batch)
        ready, consumer = self._handoff(inputs)
        if self.asynchronous and self._pool is not None:
            fut = self._pool.submit(self._compute, inputs, ready, consumer)
        else:
            fut = cf.Future()
            fut.set_result(self._compute(inputs, ready, consumer))
        entry = _Pending(inputs, fut, self._completed if ahead else self._completed + 1)
        with self._lock:
            self._pending.append(entry)
            del self._pending[:-4]  # never more than a few in flight (skipped batches)
        return entry

    def _take(self, inputs: dict) -> Optional[_Pending]:
        with self._lock:
            for i, e in enumerate(self._pending):
                if _same_inputs(e.inputs, inputs):
                    del self._pending[: i + 1]  # older entries were skipped by the loader
                    return e
        return None

    def _drain(self, clear: bool = True) -> None:
        with self._lock:
            pending, self._pending = list(self._pending), ([] if clear else self._pending)
        for e in pending:
            with contextlib.suppress(Exception):
                e.future.result()

    def _cached_targets(self, batch: dict) -> Optional[dict]:
        """Targets of a batch read from the per-case cache, or None when a sample has no recorded patch box."""
        from trifuse.lightning.target_cache import TeacherTargetCache

        metas = batch.get(keys.META) or []
        if not metas or not all(TeacherTargetCache.replayable(m) for m in metas):
            return None
        ref = batch[keys.MRI]
        size = tuple(ref.shape[2:])
        bsize = tuple(-(-s // 8) for s in size)
        out = {}
        for m, cache in self.caches.items():
            pairs = [cache.crop(cid, meta, size, bsize, ref.device) for cid, meta in zip(batch[keys.CASE_ID], metas)]
            out[m] = {"logits": torch.stack([p[0] for p in pairs]), "bottleneck": torch.stack([p[1] for p in pairs])}
        return out

    def prepare_cache(self, datamodule, device: torch.device, trainer=None) -> int:
        """Cached mode: build (rank 0; resumable) or check the per-case targets of the training cases.

        Returns how many case files were written. Raises
        :class:`~trifuse.lightning.target_cache.StaleTargetCache` for a cache of another checkpoint.
        """
        from trifuse.lightning.data import CaseDataset
        from trifuse.lightning.target_cache import TeacherTargetCache

        root = Path(self.cache_dir) if self.cache_dir else Path(datamodule.resolved_cache_dir)
        roi = tuple(self.cache_roi or datamodule.patch_size)
        self.caches = {m: TeacherTargetCache(root / "teacher_targets" / m, self.loaded[m][0], roi, self.cache_overlap) for m in self.teachers}
        rank0 = trainer is None or trainer.global_rank == 0
        written = 0
        if rank0:
            ds = CaseDataset(datamodule.resolved_cache_dir, datamodule.train_ids, datamodule._worker_transforms(every=True))
            dtype = resolve_teacher_dtype(self.precision, str(getattr(trainer, "precision", "32-true")), device)
            for m, cache in self.caches.items():
                n = cache.build(self.teachers[m].to(device), (ds[i] for i in range(len(ds))), device, dtype)
                log.info("teacher %s: cached targets of %d new case(s) in %s", m, n, cache.root)
                written += n
        if trainer is not None and trainer.world_size > 1:
            trainer.strategy.barrier("teacher_targets")
        for cache in self.caches.values():
            cache.check_stamp()
        return written

    def targets(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        """The targets of ``batch`` (joins the background computation started for it, if any)."""
        if self.mode == "cached":
            t0 = time.perf_counter()
            out = self._cached_targets(batch)
            if out is not None:
                self.stats["wait_s"] += time.perf_counter() - t0
                self.stats["steps"] += 1
                self.stats["cached"] += 1
                return out
            self.stats["fallback"] += 1
            missing = [k for k in self.input_keys if k not in batch]
            if missing:
                raise RuntimeError(
                    f"cached teacher targets cannot be cut for this batch (a sample without a recorded patch_box) and "
                    f"the batch lacks the teachers' inputs {missing}: the data module skipped their transforms "
                    f"(needed_keys); train with distill mode online, or sample patches with PatchDataset")
        inputs = self._inputs_of(batch)
        t0 = time.perf_counter()
        entry = self._take(inputs)
        if entry is None:
            entry = self._submit(batch, ahead=False)
            self._take(inputs)
        out, done = entry.future.result()
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        self.stats["wait_s"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["started_ahead"] += int(entry.ahead_of_step < self._completed)
        return out

    def _cached_ok(self, batch: dict) -> bool:
        from trifuse.lightning.target_cache import TeacherTargetCache

        metas = batch.get(keys.META) or []
        return bool(metas) and all(TeacherTargetCache.replayable(m) for m in metas)

    @property
    def lookahead_share(self) -> float:
        """Share of the batches whose targets were started while the student was on an earlier batch."""
        return self.stats["started_ahead"] / max(self.stats["steps"], 1)

    @property
    def wait_share(self) -> float:
        """Share of the training-step time the student spent waiting for targets."""
        return self.stats["wait_s"] / max(self.stats["step_s"], 1e-12)

    # --- look-ahead (LookaheadDataLoader.on_fetch) ------------------------------------
    def on_fetch(self, batch: Any) -> Any:
        """Batch t+1, fetched while batch t is handed to the student: move it and start its targets."""
        trainer = self._trainer
        if not (self.enabled and self.asynchronous and self.lookahead) or trainer is None or not isinstance(batch, dict):
            return batch
        if self.mode == "cached" and self._cached_ok(batch):
            return batch  # read from the cache when its step comes
        dm = trainer.datamodule
        if dm is not None and getattr(dm, "transforms_on_device", False):
            return batch  # device-side transforms would draw new randomness when Lightning moves it
        batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.strategy.batch_to_device(batch)
        if all(k in batch for k in self.input_keys):
            self._submit(batch, ahead=True)
        return batch

    # --- hooks ------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        # the student decides which teachers it learns from (ablations: none, MRI only, ...)
        wanted = getattr(pl_module, "teacher_modalities", None)
        self.enabled = wanted is None or len(wanted) > 0
        if not self.enabled:
            return
        if not self.teachers:
            self._load_all(pl_module.device, wanted)
        if self.mode == "cached":
            if self.watch:
                log.info("distillation mode cached: teacher checkpoint hot-swap is off")
            self.watch = False
            self.prepare_cache(trainer.datamodule, pl_module.device, trainer)
        pl_module.distiller = self
        if hasattr(pl_module, "check_teachers"):
            pl_module.check_teachers(self.teachers)
        self._trainer = trainer
        dm = trainer.datamodule
        if self.asynchronous and self.lookahead:
            if dm is not None and hasattr(dm, "train_lookahead"):
                dm.train_lookahead = self.on_fetch
            else:
                log.warning("no look-ahead: the data module has no train_lookahead slot (targets start with each batch)")

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.enabled:
            return
        device = pl_module.device
        for m, t in self.teachers.items():
            self.teachers[m] = t.to(device)
        self.dtype = resolve_teacher_dtype(self.precision, str(trainer.precision), device)
        if self.asynchronous:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-targets")
        if device.type == "cuda":
            self._stream = torch.cuda.Stream(device=device)
        pl_module.distiller = self
        self._trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.enabled:
            return
        self._t_start = time.perf_counter()
        step = trainer.global_step
        if self.watch and step > 0 and step % self.poll_every_n_steps == 0:
            if self.refresh(pl_module.device, trainer):
                pl_module.log("distill/teacher_swaps", float(self.swaps), rank_zero_only=True)
        if isinstance(batch, dict) and all(k in batch for k in self.input_keys):
            inputs = self._inputs_of(batch)
            with self._lock:
                have = any(_same_inputs(e.inputs, inputs) for e in self._pending)
            # (asynchronous only: inline targets are computed when the student asks for them)
            if self.asynchronous and not have and not (self.mode == "cached" and self._cached_ok(batch)):  # no look-ahead for this batch: start now, overlapping the student's forward
                self._submit(batch, ahead=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        self._completed += 1
        if self._t_start is not None:
            self.stats["step_s"] += time.perf_counter() - self._t_start
        pl_module.log("distill/lookahead_share", self.lookahead_share, on_step=True, on_epoch=False, batch_size=1)
        pl_module.log("distill/wait_share", self.wait_share, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._drain(clear=True)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._drain(clear=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and getattr(dm, "train_lookahead", None) == self.on_fetch:
            dm.train_lookahead = None
        self._trainer = None

    def state_dict(self) -> dict:
        # paths and counters only: teacher weights never go into student checkpoints
        return {"loaded": dict(self.loaded), "swaps": self.swaps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.swaps = int(state_dict.get("swaps", 0))
