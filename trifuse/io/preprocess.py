"""The preprocess stage: validate every case, decode once into the cache, write the manifest."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from trifuse.io import cache as cache_mod
from trifuse.io.discovery import discover_cases
from trifuse.io.manifest import MANIFEST_VERSION, kfold_splits, write_manifest
from trifuse.io.validate import CaseValidationError, decode_case

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

    @property
    def ok(self) -> bool:
        return not self.invalid


def preprocess(
    data_dir: str | Path,
    cache_dir: str | Path | None = None,
    year="auto",
    n_folds: int = 5,
    seed: int = 0,
    margin_mm: float = cache_mod.DEFAULT_MARGIN_MM,
    require_seg: bool = False,
    progress=None,
) -> PreprocessReport:
    """Validate and cache every case under ``data_dir``; write ``manifest.json``.

    Bad cases are listed in the report and the manifest (``invalid``) and nothing is
    written for them. Cases whose source files are unchanged since the last run are
    skipped (resumable); every write is atomic.

    Args:
        data_dir: BraTS (or synthetic) dataset folder.
        cache_dir: output folder; default :func:`default_cache_dir`.
        year: ``"auto"`` or a release to enforce.
        n_folds, seed: k-fold split of the valid labelled cases.
        require_seg: treat a missing label file as an error (training data).
        progress: optional callable ``(i, n, case_id, status)``.
    """
    records = discover_cases(data_dir, year=year)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(data_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    report = PreprocessReport(cache_dir=cache_dir, year=records[0].year)
    entries = []
    for i, rec in enumerate(records):
        status = "cached"
        if cache_mod.is_cached(cache_dir, rec):
            report.skipped.append(rec.case_id)
        else:
            try:
                case = decode_case(rec, require_seg=require_seg)
            except CaseValidationError as exc:
                report.invalid[rec.case_id] = exc.problems
                status = "INVALID"
                # a stale cache entry for a now-broken case must not be used
                stale = cache_dir / rec.case_id
                if stale.exists():
                    import shutil

                    shutil.rmtree(stale, ignore_errors=True)
            else:
                cache_mod.write_case(cache_dir, case, margin_mm=margin_mm)
                report.written.append(rec.case_id)
                status = "written"
        if progress:
            progress(i + 1, len(records), rec.case_id, status)
        if rec.case_id not in report.invalid:
            meta = cache_mod.read_meta(cache_dir, rec.case_id)
            entries.append(
                {
                    "case_id": rec.case_id,
                    "has_seg": meta["has_seg"],
                    "shape": meta["shape"],
                    "cropped_shape": meta["cropped_shape"],
                    "spacing": meta["spacing"],
                    "directory": str(rec.directory),
                }
            )
    labelled = [e["case_id"] for e in entries if e["has_seg"]]
    manifest = {
        "version": MANIFEST_VERSION,
        "data_dir": str(Path(data_dir).resolve()),
        "year": report.year,
        "cases": entries,
        "invalid": report.invalid,
        "folds": {"n_folds": n_folds, "seed": seed, "splits": kfold_splits(labelled, n_folds, seed)},
    }
    write_manifest(cache_dir, manifest)
    return report
