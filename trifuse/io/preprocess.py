"""The preprocess stage: validate every case, decode once into the cache, write the manifest."""
from __future__ import annotations

import logging
import multiprocessing as mp
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from trifuse.io import cache as cache_mod
from trifuse.io.discovery import discover_cases
from trifuse.io.nifti import sweep_dead_temps
from trifuse.io.manifest import MANIFEST_VERSION, kfold_splits, write_manifest
from trifuse.io.validate import CONTENT_CHECKS, CaseValidationError, decode_case

log = logging.getLogger(__name__)


def default_cache_dir(data_dir: str | Path) -> Path:
    """``<data_dir>/../cache/<name>``: the cache lives beside the data, in the data root."""
    data_dir = Path(data_dir).resolve()
    return data_dir.parent / "cache" / data_dir.name


@dataclass
class PreprocessReport:
    cache_dir: Path
    year: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    invalid: dict[str, list[str]] = field(default_factory=dict)
    #: cases cached with warnings (``allow=`` checks, squeezed 4-D singletons)
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.invalid


def _process_case(rec, cache_dir: Path, require_seg: bool, allow: tuple[str, ...], margin_mm: float):
    """Validate and cache one case: ``(status, problems, warnings, manifest entry | None)``.

    Runs in the main process or in a worker; holds one decoded case at a time, so the
    peak memory of a worker does not grow with the number of cases.
    """
    cached = cache_mod.is_cached(cache_dir, rec)
    if cached and not set(cache_mod.read_meta(cache_dir, rec.case_id).get("allowed_checks", [])) <= set(allow):
        cached = False  # cached under an --allow that this run does not give: validate again
    if cached:
        status, problems, warnings = "cached", [], []
    else:
        try:
            case = decode_case(rec, require_seg=require_seg, allow=allow)
        except CaseValidationError as exc:
            # a stale cache entry for a now-broken case must not be used
            shutil.rmtree(cache_dir / rec.case_id, ignore_errors=True)
            return "INVALID", exc.problems, [], None
        cache_mod.write_case(cache_dir, case, margin_mm=margin_mm)
        status, problems, warnings = "written", [], case.warnings
        del case
    meta = cache_mod.read_meta(cache_dir, rec.case_id)
    warnings = warnings or meta.get("warnings", [])
    entry = {
        "case_id": rec.case_id,
        "has_seg": meta["has_seg"],
        "shape": meta["shape"],
        "cropped_shape": meta["cropped_shape"],
        "spacing": meta["spacing"],
        "directory": str(rec.directory),
    }
    return status, problems, warnings, entry


def preprocess(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    year="auto",
    n_folds: int = 5,
    seed: int = 0,
    margin_mm: float = cache_mod.DEFAULT_MARGIN_MM,
    require_seg: bool = False,
    progress=None,
    allow=(),
    workers: int = 1,
) -> PreprocessReport:
    """Validate and cache every case under ``data_dir``; write ``manifest.json``.

    Bad cases are listed in the report and the manifest (``invalid``) and nothing is
    written for them. Cases whose source files are unchanged since the last run are
    skipped (resumable); every write is atomic, and temp folders a killed run left
    behind are removed first.

    The dataset is processed as a stream: one decoded case per process at a time, so peak
    memory is that of one case (plus the interpreter) whatever the number of cases.

    Args:
        data_dir: BraTS (or synthetic) dataset folder.
        cache_dir: output folder; default :func:`default_cache_dir`.
        year: ``"auto"`` or a release to enforce.
        n_folds, seed: k-fold split of the valid labelled cases.
        require_seg: treat a missing label file as an error (training data).
        progress: optional callable ``(i, n, case_id, status)``.
        allow: content checks (:data:`trifuse.io.validate.CONTENT_CHECKS`) whose failures are
            warnings, not errors; the case is cached and the warning recorded.
        workers: processes decoding and writing cases in parallel (1: in this process).

    Raises:
        trifuse.io.nifti.OutOfSpaceError: the cache folder is full (named in the message);
            the case being written leaves nothing behind.
    """
    allow = tuple(sorted(set(allow)))
    unknown = set(allow) - set(CONTENT_CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) to allow: {sorted(unknown)}; choose from {list(CONTENT_CHECKS)}")
    records = discover_cases(data_dir, year=year)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sweep_dead_temps(cache_dir)  # temp folders of a killed run (never a live writer's)
    report = PreprocessReport(cache_dir=cache_dir, year=records[0].year)
    entries = []
    args = (cache_dir, require_seg, allow, margin_mm)
    if workers > 1 and len(records) > 1:
        # spawn: workers start clean (no inherited torch/OpenMP thread state); each takes one
        # case at a time and map() yields in input order, so progress and the manifest are ordered
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(records)), mp_context=ctx)
        results = pool.map(_process_case, records, *[[a] * len(records) for a in args])
    else:
        pool = None
        results = (_process_case(rec, *args) for rec in records)
    try:
        for i, (rec, (status, problems, warnings, entry)) in enumerate(zip(records, results)):
            if status == "INVALID":
                report.invalid[rec.case_id] = problems
            elif status == "written":
                report.written.append(rec.case_id)
            else:
                report.skipped.append(rec.case_id)
            if warnings:
                report.warnings[rec.case_id] = list(warnings)
            if entry is not None:
                entries.append(entry)
            if progress:
                progress(i + 1, len(records), rec.case_id, status + (f" ({len(warnings)} warning(s))" if warnings else ""))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    labelled = [e["case_id"] for e in entries if e["has_seg"]]
    manifest = {
        "version": MANIFEST_VERSION,
        "data_dir": str(Path(data_dir).resolve()),
        "year": report.year,
        "cases": entries,
        "invalid": report.invalid,
        "warnings": report.warnings,
        "allow": list(allow),
        "folds": {"n_folds": n_folds, "seed": seed, "splits": kfold_splits(labelled, n_folds, seed)},
    }
    write_manifest(cache_dir, manifest)
    return report
