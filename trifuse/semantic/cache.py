"""On-disk description cache: one JSON per (case, view, image, model, prompt version).

Layout under a describe output folder ``OUT``::

    OUT/cache/<key>.json      successful view descriptions (never paid for twice)
    OUT/failures/<case>__<view>.json   the last failure of a view; removed when it succeeds
    OUT/failures.jsonl        report of current failures, rewritten at the end of a run

``key = sha256(json([case_id, view, image_hash, model, prompt_version, request_params]))``:
a new image, model, prompt text or request setting gives a new key, the same ones give
a cache hit. Writes are
atomic (writer-tagged temporary file in the same folder, fsync, ``os.replace``), so an
interrupted run leaves either the old file or the new one, and the next run resumes (and
sweeps the temporaries a killed run left, :func:`sweep_dead_temps`); a full disk fails with a
message naming the folder.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from trifuse.io.nifti import atomic_write_text, sweep_dead_temps
from trifuse.semantic.schema import ViewDescription

log = logging.getLogger(__name__)


def cache_key(case_id: str, view: str, image_hash: str, model: str, prompt_version: str,
              params: dict[str, Any] | None = None) -> str:
    """Hex sha256 of ``(case_id, view, image_hash, model, prompt_version[, params])``.

    ``params`` is the describer's :meth:`request_params`: every request setting that
    can change the answer (base_url, detail, max_tokens, temperature, response format,
    extra request arguments) and the hash of the prompt text itself.
    """
    items: list[Any] = [str(case_id), str(view), str(image_hash), str(model), str(prompt_version)]
    if params:
        items.append(params)
    payload = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON-serialise ``obj`` (sorted keys, indented) and write it atomically
    (:func:`trifuse.io.nifti.atomic_write_text`: a writer-tagged temporary that a rerun sweeps)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


class DescriptionCache:
    """Successful and failed view descriptions of one output folder.

    Args:
        root: the describe output folder (``OUT`` above).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.entries = self.root / "cache"
        self.failure_dir = self.root / "failures"
        self.report_path = self.root / "failures.jsonl"

    def sweep(self) -> None:
        """Remove the temporaries killed writers left in the output folder and its cache/failure folders."""
        for folder in (self.root, self.entries, self.failure_dir):
            sweep_dead_temps(folder)

    # -- successes --------------------------------------------------------------------
    def path(self, key: str) -> Path:
        return self.entries / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached record, or ``None`` when absent or unreadable (then it is redone)."""
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            rec["description"] = ViewDescription.model_validate(rec["description"])
            return rec
        except (OSError, ValueError, KeyError, TypeError, ValidationError) as e:
            log.warning("ignoring unreadable cache entry %s (%s); it will be redone", p, type(e).__name__)
            return None

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store a success (``record['description']`` may be a model or a dict).

        A failure recorded for the same ``(record['case_id'], record['view'])`` is cleared.
        """
        rec = dict(record)
        if isinstance(rec.get("description"), ViewDescription):
            rec["description"] = rec["description"].model_dump(mode="json")
        rec.setdefault("created", now_iso())
        atomic_write_json(self.path(key), rec)
        if "case_id" in rec and "view" in rec:
            self.clear_failure(rec["case_id"], rec["view"])

    # -- failures ---------------------------------------------------------------------
    def failure_path(self, case_id: str, view: str) -> Path:
        """One failure file per (case, view), whatever the key: a later success under
        another key (new image or prompt) still clears it."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id))
        return self.failure_dir / f"{safe}__{view}.json"

    def put_failure(self, case_id: str, view: str, record: dict[str, Any]) -> None:
        """Record the latest failure of a view (overwrites the previous one)."""
        rec = dict(record)
        rec.setdefault("created", now_iso())
        atomic_write_json(self.failure_path(case_id, view), rec)

    def clear_failure(self, case_id: str, view: str) -> None:
        try:
            self.failure_path(case_id, view).unlink()
        except FileNotFoundError:
            pass

    def failures(self) -> list[dict[str, Any]]:
        """All recorded failures, sorted by (case_id, view)."""
        out = []
        if self.failure_dir.is_dir():
            for p in sorted(self.failure_dir.glob("*.json")):
                try:
                    out.append(json.loads(p.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    log.warning("unreadable failure record %s", p)
        return sorted(out, key=lambda r: (str(r.get("case_id")), str(r.get("view"))))

    def write_failure_report(self, records: Iterable[dict[str, Any]] | None = None) -> Path:
        """Rewrite ``failures.jsonl`` (one JSON object per line); removed when there are none."""
        recs = list(self.failures() if records is None else records)
        if not recs:
            try:
                self.report_path.unlink()
            except FileNotFoundError:
                pass
            return self.report_path
        atomic_write_text(self.report_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
        return self.report_path
