"""Describe a cohort: slices → cache → backend → per-case :class:`Description` files.

:func:`describe_cases` is what ``trifuse describe`` runs. For each sample it finds the
abnormality, renders the slice through it in each view, looks every (case, view) up in
the cache (:mod:`trifuse.semantic.cache`), sends only the misses to the backend (under
its concurrency limit), caches successes, records failures (retried on the next run,
never replaced by another backend's output), and writes ``OUT/<case_id>.json`` for each
case whose views are all described.

Output folder::

    OUT/<case_id>.json          Description (all views present)
    OUT/cache/<key>.json        per-view cache entries
    OUT/failures/…, OUT/failures.jsonl   current failures
    OUT/describe_summary.json   counts, tokens, cost of the last (non-dry) run
    OUT/describe_manifest.json  the describer identity and the status of every case it
                                described (``clip``/``semantic`` read only these; see
                                :func:`load_descriptions`)

Fail fast: the first uncached view is sent alone (the **preflight**: auth, model, image
input and response format in one real request); when it fails for a reason that is not
about this one image, nothing else is sent. During the run a **breaker** stops after
``breaker_threshold`` failures of a fatal kind (401, 403, 404, no image input,
unsupported response format, ``insufficient_quota``) or as many transport failures in
a row; views not sent are counted as ``skipped``, not recorded as failures, and nothing
is cached as a success. A view the model refused ``max_refusals`` times (same cache
key) is not requested again unless ``retry_refused``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from trifuse import keys
from trifuse.io.nifti import sweep_dead_temps
from trifuse.semantic.backend import API_KEY_ENV, FATAL_KINDS, DescribeError, Describer, redact
from trifuse.semantic.cache import DescriptionCache, atomic_write_json, cache_key, now_iso
from trifuse.semantic.provenance import (DescriberMismatchError, describer_identity, description_identity,  # noqa: F401
                                         format_identity, same_describer, single_identity)
from trifuse.semantic.schema import VIEWS, Description, SliceRef, ViewDescription
from trifuse.semantic.slices import ViewSlice, extract_view_slices, find_abnormality, sample_arrays

log = logging.getLogger(__name__)

SUMMARY_NAME = "describe_summary.json"
MANIFEST_NAME = "describe_manifest.json"
_RESERVED = {Path(SUMMARY_NAME).stem, Path(MANIFEST_NAME).stem}
#: answers that say nothing about the server (a bad image, an odd answer): they never trip the preflight
CONTENT_KINDS = frozenset({"refusal", "invalid_json", "schema", "wrong_view", "truncated", "empty"})
#: seconds per request assumed by a dry run's ETA when no earlier run measured it
ASSUMED_SECONDS_PER_REQUEST = 6.0


@dataclass
class DescribeSummary:
    """What a :func:`describe_cases` run did.

    Attributes:
        backend, model, prompt_version, dry_run, out_dir: the run's settings.
        describer: the describer identity (:mod:`trifuse.semantic.provenance`).
        cases: cases seen; cases_complete: cases with every view described (file written).
        views: (case, view) pairs seen; described: newly described this run; cached:
            served from the cache; failed: failed this run; skipped: not sent because
            the run stopped; refusal_capped: refused too often before, not re-requested.
        requests, retries, prompt_tokens, completion_tokens, cost_usd: backend usage.
        would_request, est_prompt_tokens, est_completion_tokens, est_cost_usd: dry-run
            estimates for the uncached views; est_seconds: their ETA at the run's
            concurrency, from ``seconds_per_request`` (measured by an earlier run in
            the same folder, or :data:`ASSUMED_SECONDS_PER_REQUEST`).
        price_source: where the prices come from (table row, given, or 0 for local servers).
        fallbacks: request changes the server forced (response format, options).
        aborted: why the run stopped early (``None``: it did not).
        failures: ``{case_id, view, kind, message, attempts, status}`` per failure this run.
        elapsed_s: wall time.
    """

    backend: str
    model: str
    prompt_version: str
    dry_run: bool
    out_dir: str
    describer: dict[str, Any] = field(default_factory=dict)
    cases: int = 0
    cases_complete: int = 0
    views: int = 0
    described: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    refusal_capped: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    would_request: int = 0
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    est_cost_usd: float = 0.0
    est_seconds: float = 0.0
    seconds_per_request: float = 0.0
    concurrency: int = 1
    batch: bool = False
    price_source: str = ""
    fallbacks: list[str] = field(default_factory=list)
    batch_requests: int = 0
    batch_pending: list[str] = field(default_factory=list)
    aborted: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No view failed, the run was not stopped and no batch is still running."""
        return self.failed == 0 and self.aborted is None and self.skipped == 0 and not self.batch_pending

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cost_usd", "est_cost_usd"):
            d[k] = round(d[k], 6)
        for k in ("elapsed_s", "est_seconds", "seconds_per_request"):
            d[k] = round(d[k], 3)
        return d

    def format(self) -> str:
        """Human-readable multi-line summary (for the CLIs)."""
        lines = [
            f"describer {format_identity(self.describer) if self.describer else self.backend + '/' + self.model}"
            + (" (batch)" if self.batch else "") + (" (dry run)" if self.dry_run else ""),
            f"cases {self.cases} (complete {self.cases_complete}); views {self.views}: "
            f"described {self.described}, cached {self.cached}, failed {self.failed}"
            + (f", not sent {self.skipped}" if self.skipped else "")
            + (f", refused before (not re-requested) {self.refusal_capped}" if self.refusal_capped else ""),
        ]
        if self.dry_run:
            lines.append(f"would send {self.would_request} request(s): ~{self.est_prompt_tokens} prompt + "
                         f"~{self.est_completion_tokens} completion tokens, ~${self.est_cost_usd:.4f}")
            if self.would_request:
                if self.batch:
                    eta = "within the Batch API's 24 h completion window"
                else:
                    eta = (f"~{_hms(self.est_seconds)} at {self.concurrency} in flight "
                           f"({self.seconds_per_request:.1f} s per request)")
                lines.append(f"ETA {eta}")
        else:
            lines.append(f"requests {self.requests} (retries {self.retries}); tokens {self.prompt_tokens} prompt + "
                         f"{self.completion_tokens} completion; cost ${self.cost_usd:.4f}")
        if self.batch_requests:
            lines.append(f"batch: {self.batch_requests} request(s) uploaded")
        if self.batch_pending:
            lines.append(f"batch still running: {', '.join(self.batch_pending)} (re-run to collect the results)")
        if self.price_source:
            lines.append(f"prices: {self.price_source}")
        for f in self.fallbacks:
            lines.append(f"fallback: {f}")
        for f in self.failures[:20]:
            lines.append(f"FAILED {f['case_id']}/{f['view']} [{f['kind']}]: {f['message']}")
        if len(self.failures) > 20:
            lines.append(f"… and {len(self.failures) - 20} more failures (see failures.jsonl)")
        if self.aborted:
            lines.append(f"STOPPED: {self.aborted}")
        return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------
def select_backend(backend: str | Describer | None = "auto", *, model: str = "gpt-4o", base_url: str | None = None,
                   concurrency: int = 8, dry_run: bool = False, **openai_kwargs: Any) -> Describer:
    """Build the describer for ``backend``.

    Args:
        backend: ``"openai"``, ``"offline"``, ``"auto"``/``None`` (OpenAI when
            ``OPENAI_API_KEY`` is set, otherwise offline), or a ready describer.
        model, base_url, concurrency, dry_run: OpenAI settings.
        **openai_kwargs: further :class:`~trifuse.semantic.openai_describer.OpenAIDescriber`
            arguments (``max_retries``, ``timeout``, prices, ``prompt_version``, …).

    Raises:
        MissingAPIKeyError: ``backend="openai"`` without a key and without ``dry_run``.
        ValueError: unknown backend name.
    """
    if backend is not None and not isinstance(backend, str):
        return backend
    name = (backend or "auto").lower()
    if name == "auto":
        if os.environ.get(API_KEY_ENV):
            name = "openai"
            log.info("%s is set: using the OpenAI describer (model %s)", API_KEY_ENV, model)
        else:
            name = "offline"
            log.info("%s is not set: using the OFFLINE describer (deterministic, image statistics + atlas "
                     "position); set the key or pass --backend openai for a vision model", API_KEY_ENV)
    if name == "offline":
        from trifuse.semantic.offline import OfflineDescriber

        return OfflineDescriber()
    if name == "openai":
        from trifuse.semantic.openai_describer import OpenAIDescriber

        d = OpenAIDescriber(model=model, base_url=base_url, concurrency=concurrency, dry_run=dry_run,
                            **openai_kwargs)
        log.info("OpenAI describer: model=%s base_url=%s concurrency=%d prompt=%s%s", model,
                 base_url or "(default)", concurrency, d.prompt_version, " DRY RUN" if dry_run else "")
        return d
    raise ValueError(f"unknown describe backend {backend!r}; expected 'openai', 'offline' or 'auto'")


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
@dataclass
class _CaseWork:
    case_id: str
    slices: dict[str, ViewSlice]
    keys: dict[str, str]
    cached: dict[str, ViewDescription]
    todo: list[str]
    context: Any = None
    capped: list[str] = field(default_factory=list)


class _Run:
    def __init__(self, describer: Describer, out_dir: Path, views: tuple[str, ...], dry_run: bool, *,
                 breaker_threshold: int = 3, max_refusals: int = 2, retry_refused: bool = False,
                 progress: Any = None) -> None:
        self.d = describer
        self.out = out_dir
        self.views = views
        self.dry_run = dry_run
        self.cache = DescriptionCache(out_dir)
        self.seen: set[str] = set()
        self.identity = describer_identity(describer)
        params = getattr(describer, "request_params", None)
        self.params = params() if callable(params) else None
        prices = getattr(describer, "prices", None)
        self.summary = DescribeSummary(backend=describer.source, model=describer.model,
                                       prompt_version=describer.prompt_version, dry_run=dry_run, out_dir=str(out_dir),
                                       describer=self.identity, concurrency=int(getattr(describer, "concurrency", 1)),
                                       batch=bool(getattr(describer, "batch", False)),
                                       price_source=getattr(prices, "source", "") if prices else "")
        self.breaker_threshold = int(breaker_threshold)
        self.max_refusals = int(max_refusals)
        self.retry_refused = bool(retry_refused)
        self.case_status: dict[str, str] = {}
        self.stop: str | None = None
        self.fatal = 0
        self.transport_in_a_row = 0
        self.preflight: asyncio.Event | None = None
        self.preflight_started = False
        self.bar = progress

    # -- worker thread: load and prepare one case ----------------------------------------
    def next_case(self, it: Iterator[Mapping[str, Any]]) -> _CaseWork | None:
        while True:
            if self.stop:
                return None
            try:
                sample = next(it)
            except StopIteration:
                return None
            case_id = str(sample.get(keys.CASE_ID) or "")
            if not case_id:
                raise ValueError(f"sample without {keys.CASE_ID!r}")
            if case_id in self.seen:
                log.warning("case %s appears twice in the input; skipping the repeat", case_id)
                continue
            if case_id in _RESERVED:
                raise ValueError(f"case id {case_id!r} clashes with a describe file name")
            self.seen.add(case_id)
            try:
                mri, brain, geo = sample_arrays(sample)
                abn = find_abnormality(mri, brain, geo.spacing)
                slices = extract_view_slices(sample, abn, self.views)
            except ValueError as e:
                raise ValueError(f"{case_id}: {e}") from e
            kk = {v: cache_key(case_id, v, slices[v].image_hash, self.d.model, self.d.prompt_version, self.params)
                  for v in self.views}
            cached: dict[str, ViewDescription] = {}
            for v in self.views:
                rec = self.cache.get(kk[v])
                if rec is not None:
                    cached[v] = rec["description"]
            todo = [v for v in self.views if v not in cached]
            capped = [v for v in todo if self._refusal_capped(case_id, v, kk[v])]
            todo = [v for v in todo if v not in capped]
            context = None
            if todo and not self.dry_run:
                context = self.d.prepare(sample, {v: slices[v] for v in todo}, abn)
            if not abn.found:
                log.info("%s: no FLAIR/T2 abnormality found; slices through the brain centre", case_id)
            return _CaseWork(case_id, slices, kk, cached, todo, context, capped)

    def _refusal_capped(self, case_id: str, view: str, key: str) -> bool:
        """The model refused this very request ``max_refusals`` times already."""
        if self.retry_refused or self.max_refusals <= 0:
            return False
        p = self.cache.failure_path(case_id, view)
        if not p.is_file():
            return False
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return rec.get("key") == key and int(rec.get("refusals", 0)) >= self.max_refusals

    # -- event loop: describe one case ----------------------------------------------------
    async def run_case(self, w: _CaseWork) -> None:
        self.count_case(w)
        if self.dry_run:
            for v in w.todo:
                self.d.estimate(w.slices[v])
            self._tick()
            return
        results = await asyncio.gather(*(self.one_view(w, v) for v in w.todo))
        views = dict(w.cached)
        views.update({v: r for v, r in zip(w.todo, results, strict=True) if r is not None})
        await self.complete_case(w, views)

    def count_case(self, w: _CaseWork) -> None:
        s = self.summary
        s.cases += 1
        s.views += len(self.views)
        s.cached += len(w.cached)
        if w.capped:
            s.refusal_capped += len(w.capped)
            s.failed += len(w.capped)
            for v in w.capped:
                s.failures.append({"case_id": w.case_id, "view": v, "kind": "refusal_capped", "attempts": 0,
                                   "status": None, "message": f"refused {self.max_refusals} time(s) before; not "
                                   "requested again (pass --retry-refused to try once more)"})

    async def complete_case(self, w: _CaseWork, views: Mapping[str, ViewDescription]) -> None:
        """Write the case file when every view is described; record the case's status."""
        s = self.summary
        if all(v in views for v in self.views):
            refs = {v: SliceRef(index=w.slices[v].index, index_original=w.slices[v].index_original,
                                axis=w.slices[v].geometry.slice_axis, image_hash=w.slices[v].image_hash)
                    for v in self.views}
            desc = Description(case_id=w.case_id, views=views, source=self.d.source, model=self.d.model,
                               prompt_version=self.d.prompt_version, prompt_hash=self.identity.get("prompt_hash", ""),
                               slices=refs)
            await asyncio.to_thread(atomic_write_json, self.out / f"{w.case_id}.json", desc.model_dump(mode="json"))
            s.cases_complete += 1
            self.case_status[w.case_id] = "complete"
        else:
            self.case_status[w.case_id] = "incomplete"
        self._tick()

    def _tick(self) -> None:
        if self.bar is None:
            return
        s, u = self.summary, self.d.usage
        self.bar.update(1)
        post = {"done": s.described, "cached": s.cached, "failed": s.failed}
        if self.dry_run:
            post.update(req=u.would_send, tok=u.est_prompt_tokens + u.est_completion_tokens,
                        usd=f"{u.est_cost_usd:.2f}")
        else:
            post.update(tok=u.prompt_tokens + u.completion_tokens, usd=f"{u.cost_usd:.2f}")
        self.bar.set_postfix(post, refresh=False)

    def trip(self, reason: str) -> None:
        """Stop the run: nothing more is sent (requests in flight finish)."""
        if self.stop is None:
            self.stop = reason
            log.error("describe stopped: %s", reason)
            if hasattr(self.d, "stop_reason"):
                self.d.stop_reason = reason

    async def one_view(self, w: _CaseWork, view: str) -> ViewDescription | None:
        # the preflight: the first view goes alone; the others wait for its verdict
        if self.preflight is None:
            self.preflight = asyncio.Event()
        if not self.preflight_started:
            self.preflight_started = True
            try:
                return await self._one_view(w, view, preflight=True)
            finally:
                self.preflight.set()
        await self.preflight.wait()
        return await self._one_view(w, view)

    async def _one_view(self, w: _CaseWork, view: str, preflight: bool = False) -> ViewDescription | None:
        if self.stop:
            self.summary.skipped += 1
            return None
        vs, key = w.slices[view], w.keys[view]
        base = _base_record(self, w, view)
        try:
            out = await self.d.describe_view(w.case_id, vs, w.context)
        except DescribeError as e:
            err = e.to_dict()
        except Exception as e:  # noqa: BLE001 - a bug in a backend must not lose the other cases' work
            log.debug("unexpected error describing %s/%s", w.case_id, view, exc_info=True)
            err = {"kind": "error", "message": redact(f"{type(e).__name__}: {e}"), "attempts": 0, "status": None}
        else:
            rec = dict(base, description=out.description, attempts=out.attempts, prompt_tokens=out.prompt_tokens,
                       completion_tokens=out.completion_tokens, cost_usd=round(out.cost_usd, 8),
                       response_model=out.response_model, response_format=out.response_format)
            await asyncio.to_thread(self.cache.put, key, rec)
            self.summary.described += 1
            self.transport_in_a_row = 0
            return out.description
        if err["kind"] == "aborted":  # never sent: the breaker tripped while it waited
            self.summary.skipped += 1
            return None
        await self.record_failure(w.case_id, view, base, err)
        self._judge(err, preflight)
        return None

    async def record_failure(self, case_id: str, view: str, base: Mapping[str, Any], err: dict[str, Any]) -> None:
        """Count, log and store the failure of one view (refusals counted per cache key)."""
        self.summary.failed += 1
        self.summary.failures.append({"case_id": case_id, "view": view, **err})
        log.warning("describe failed %s/%s [%s]: %s", case_id, view, err["kind"], err["message"])
        if err["kind"] == "refusal":  # counted per cache key, so the cap applies to this very request
            prev = self.cache.failure_path(case_id, view)
            n = 0
            try:
                old = json.loads(prev.read_text(encoding="utf-8"))
                n = int(old.get("refusals", 0)) if old.get("key") == base["key"] else 0
            except (OSError, ValueError):
                pass
            err = dict(err, refusals=n + 1)
        await asyncio.to_thread(self.cache.put_failure, case_id, view, dict(base, **err))

    def _judge(self, err: Mapping[str, Any], preflight: bool) -> None:
        """The breaker: decide after a failure whether the run can go on."""
        kind = err["kind"]
        cause = f"{kind}" + (f" (HTTP {err['status']})" if err.get("status") else "") + f": {err['message']}"
        if kind in CONTENT_KINDS:
            self.transport_in_a_row = 0
            return
        if preflight:
            self.trip(f"the preflight request failed — {cause}")
            return
        if kind in FATAL_KINDS:
            self.fatal += 1
            if self.fatal >= self.breaker_threshold:
                self.trip(f"{self.fatal} fatal failure(s) — {cause}")
            return
        self.transport_in_a_row += 1
        if self.transport_in_a_row >= self.breaker_threshold:
            self.trip(f"{self.transport_in_a_row} views in a row failed after retries — {cause}")

    def finish(self, t0: float) -> DescribeSummary:
        s, u = self.summary, self.d.usage
        s.requests, s.retries = u.requests, u.retries
        s.prompt_tokens, s.completion_tokens, s.cost_usd = u.prompt_tokens, u.completion_tokens, u.cost_usd
        s.would_request, s.est_prompt_tokens = u.would_send, u.est_prompt_tokens
        s.est_completion_tokens, s.est_cost_usd = u.est_completion_tokens, u.est_cost_usd
        s.fallbacks = list(getattr(self.d, "fallbacks", []))
        s.aborted = self.stop
        s.elapsed_s = time.perf_counter() - t0
        if self.dry_run:
            s.seconds_per_request = _measured_seconds_per_request(self.out)
            s.est_seconds = s.would_request * s.seconds_per_request / max(1, s.concurrency)
        else:
            if s.requests:
                s.seconds_per_request = s.elapsed_s * max(1, s.concurrency) / s.requests
            self.cache.write_failure_report()
            atomic_write_json(self.out / SUMMARY_NAME, s.to_dict())
            self.write_manifest()
        return s

    def write_manifest(self) -> None:
        """Record which cases this describer produced (merged with an earlier run of the same describer)."""
        old = read_describe_manifest(self.out)
        cases: dict[str, str] = {}
        if old and same_describer(old.get("describer"), self.identity):
            cases.update(old.get("cases", {}))
        cases.update(self.case_status)
        for cid in self.seen:  # seen but never run (the run stopped first)
            cases.setdefault(cid, "incomplete")
        atomic_write_json(self.out / MANIFEST_NAME, {"describer": self.identity, "views": list(self.views),
                                                     "updated": now_iso(), "cases": dict(sorted(cases.items()))})


def _measured_seconds_per_request(out: Path) -> float:
    """Seconds per request (per slot of concurrency) measured by the last real run in ``out``."""
    try:
        prev = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
        if prev.get("requests") and prev.get("seconds_per_request"):
            return float(prev["seconds_per_request"])
    except (OSError, ValueError, TypeError):
        pass
    return ASSUMED_SECONDS_PER_REQUEST


def read_describe_manifest(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``describe_manifest.json`` of a describe folder, or ``None``."""
    p = Path(out_dir) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log.warning("unreadable %s; treating the folder as unmanifested", p)
        return None


# --------------------------------------------------------------------------------------
# OpenAI Batch API mode
# --------------------------------------------------------------------------------------
BATCH_DIR = "batches"
BATCH_STATE = "state.json"
#: OpenAI's limits per batch input file (50,000 requests, 200 MB); we stay below them
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 190 * 1024 * 1024
_TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class _Pending:
    case_id: str
    view: str
    mode: str
    base: dict[str, Any]


async def _run_batch(run: _Run, it: Iterator[Mapping[str, Any]], poll_s: float, max_wait_s: float | None) -> None:
    """Batch mode: preflight online, then every other uncached view through the Batch API.

    Resumable: the ids of uploaded batches live in ``OUT/batches/state.json`` until their
    results are in the cache, so a restarted run polls the same batches instead of
    paying again. ``max_wait_s`` bounds the polling of one run (the batches keep running;
    the summary names them in ``batch_pending``).
    """
    d, out = run.d, run.out
    bdir = out / BATCH_DIR
    bdir.mkdir(parents=True, exist_ok=True)
    lines_path = bdir / "requests.jsonl"
    pending: dict[str, _Pending] = {}
    cases: dict[str, _CaseWork] = {}
    known = {k for b in _load_state(bdir / BATCH_STATE)["batches"] for k in b.get("keys", [])}
    with open(lines_path, "w", encoding="utf-8") as f:
        while True:
            w = await asyncio.to_thread(run.next_case, it)
            if w is None:
                break
            run.count_case(w)
            todo = list(w.todo)
            fresh = [v for v in todo if w.keys[v] not in known]  # not already in a running batch
            if fresh and not run.preflight_started:  # the preflight goes online, alone
                v0 = fresh[0]
                todo.remove(v0)
                vd = await run.one_view(w, v0)
                if vd is not None:
                    w.cached[v0] = vd
                if run.stop:
                    run.summary.skipped += len(todo)
                    cases[w.case_id] = w
                    break
            for v in todo:
                vs = w.slices[v]
                body = d.request_body(vs)
                f.write(json.dumps({"custom_id": w.keys[v], "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}) + "\n")
                pending[w.keys[v]] = _Pending(w.case_id, v, d.mode, _base_record(run, w, v))
            w.slices = {v: _SliceStub(s) for v, s in w.slices.items()}  # drop the PNGs: the cohort is large
            cases[w.case_id] = w
    if not run.stop:
        await _batch_cycle(run, pending, lines_path, poll_s, max_wait_s)
    for w in cases.values():
        views = {}
        for v in run.views:
            rec = run.cache.get(w.keys[v])
            if rec is not None:
                views[v] = rec["description"]
        await run.complete_case(w, views)


class _SliceStub:
    """What a case file needs of a rendered slice once its PNG has gone into the batch file."""

    def __init__(self, vs: ViewSlice) -> None:
        self.index, self.index_original, self.image_hash = vs.index, vs.index_original, vs.image_hash
        self.geometry = vs.geometry
        self.view = vs.view


def _base_record(run: _Run, w: _CaseWork, view: str) -> dict[str, Any]:
    vs = w.slices[view]
    return {"key": w.keys[view], "case_id": w.case_id, "view": view, "image_hash": vs.image_hash,
            "model": run.d.model, "prompt_version": run.d.prompt_version, "source": run.d.source,
            "describer": run.identity, "request": run.params,
            "slice": {"index": vs.index, "index_original": vs.index_original, "axis": vs.geometry.slice_axis}}


def _load_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"batches": []}


async def _batch_cycle(run: _Run, pending: dict[str, _Pending], lines_path: Path, poll_s: float,
                       max_wait_s: float | None) -> None:
    d = run.d
    d._ensure_client()
    client = d._client
    state_path = run.out / BATCH_DIR / BATCH_STATE
    state = _load_state(state_path)
    known = {k for b in state["batches"] for k in b.get("keys", [])}
    todo = [k for k in pending if k not in known]
    if todo:  # upload what no earlier (still running) batch covers
        for chunk in _chunks(lines_path, set(todo)):
            f = await client.files.create(file=("trifuse-describe.jsonl", chunk["data"]), purpose="batch")
            b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                            completion_window="24h",
                                            metadata={"trifuse": "describe", "model": d.model})
            state["batches"].append({"id": b.id, "input_file_id": f.id, "keys": chunk["keys"], "status": b.status})
            atomic_write_json(state_path, state)  # before anything else: a restart finds the batch
            run.summary.batch_requests += len(chunk["keys"])
            log.info("batch %s: %d request(s) uploaded", b.id, len(chunk["keys"]))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while state["batches"]:
        for entry in list(state["batches"]):
            b = await client.batches.retrieve(entry["id"])
            entry["status"] = b.status
            if b.status in _TERMINAL:
                await _collect(run, b, entry, pending)
                state["batches"].remove(entry)
            atomic_write_json(state_path, state)
        if not state["batches"]:
            break
        if max_wait_s is not None and loop.time() - t0 >= max_wait_s:
            run.summary.batch_pending = [b["id"] for b in state["batches"]]
            run.summary.skipped += sum(1 for b in state["batches"] for k in b["keys"] if k in pending)
            return
        await asyncio.sleep(poll_s)
    try:
        state_path.unlink()
    except FileNotFoundError:
        pass


def _chunks(lines_path: Path, keep: set[str]) -> Iterator[dict[str, Any]]:
    buf: list[bytes] = []
    keys_: list[str] = []
    size = 0
    with open(lines_path, "rb") as f:
        for raw in f:
            cid = json.loads(raw)["custom_id"]
            if cid not in keep:
                continue
            if buf and (len(buf) >= BATCH_MAX_LINES or size + len(raw) > BATCH_MAX_BYTES):
                yield {"data": b"".join(buf), "keys": keys_}
                buf, keys_, size = [], [], 0
            buf.append(raw)
            keys_.append(cid)
            size += len(raw)
    if buf:
        yield {"data": b"".join(buf), "keys": keys_}


async def _collect(run: _Run, batch: Any, entry: dict[str, Any], pending: dict[str, _Pending]) -> None:
    """Download a finished batch's results, validate them into the cache, record its failures."""
    from openai.types.chat import ChatCompletion

    client, d = run.d._client, run.d
    seen: set[str] = set()
    for file_id in (getattr(batch, "output_file_id", None), getattr(batch, "error_file_id", None)):
        if not file_id:
            continue
        text = (await client.files.content(file_id)).text
        for line in text.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key = item.get("custom_id")
            p = pending.get(key)
            if p is None:
                continue
            seen.add(key)
            resp = item.get("response") or {}
            status = resp.get("status_code")
            if status == 200:
                try:
                    out = d._outcome(ChatCompletion.model_validate(resp.get("body") or {}), p.view, 1, p.mode)
                except DescribeError as e:
                    await run.record_failure(p.case_id, p.view, p.base, e.to_dict())
                    continue
                rec = dict(p.base, description=out.description, attempts=1, prompt_tokens=out.prompt_tokens,
                           completion_tokens=out.completion_tokens, cost_usd=round(out.cost_usd, 8),
                           response_model=out.response_model, response_format=p.mode, batch_id=batch.id)
                await asyncio.to_thread(run.cache.put, key, rec)
                run.summary.described += 1
            else:
                err = (resp.get("body") or {}).get("error") or item.get("error") or {}
                await run.record_failure(p.case_id, p.view, p.base, {
                    "kind": "batch_error", "status": status, "attempts": 1,
                    "message": redact(f"batch {batch.id}: {err.get('code') or ''} {err.get('message') or status}")})
    for key in entry["keys"]:
        if key in pending and key not in seen:  # a failed/expired batch returns no line for these
            p = pending[key]
            await run.record_failure(p.case_id, p.view, p.base, {
                "kind": "batch_error", "status": None, "attempts": 1,
                "message": f"batch {batch.id} ended {batch.status!r} without a result for this request"})


async def describe_cases_async(samples: Iterable[Mapping[str, Any]], backend: str | Describer | None,
                               out_dir: str | os.PathLike, *, model: str = "gpt-4o", base_url: str | None = None,
                               concurrency: int = 8, dry_run: bool = False, views: tuple[str, ...] = VIEWS,
                               max_pending_cases: int | None = None, breaker_threshold: int = 3,
                               max_refusals: int = 2, retry_refused: bool = False, progress: bool = False,
                               total: int | None = None, batch_poll_s: float = 30.0,
                               batch_max_wait_s: float | None = None, **backend_kwargs: Any) -> DescribeSummary:
    """Async form of :func:`describe_cases` (for callers that already run an event loop)."""
    t0 = time.perf_counter()
    for v in views:
        if v not in VIEWS:
            raise ValueError(f"unknown view {v!r}; expected a subset of {VIEWS}")
    describer = select_backend(backend, model=model, base_url=base_url, concurrency=concurrency, dry_run=dry_run,
                               **backend_kwargs)
    if dry_run and not getattr(describer, "dry_run", True):
        raise ValueError("dry_run=True but the given describer is not in dry-run mode")
    out = Path(out_dir)
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="describe" + (" (dry run)" if dry_run else ""), unit="case", dynamic_ncols=True)
    run = _Run(describer, out, tuple(views), dry_run, breaker_threshold=breaker_threshold,
               max_refusals=max_refusals, retry_refused=retry_refused, progress=bar)
    if not dry_run:  # what a killed earlier run left half-written (never a live writer's temporaries)
        run.cache.sweep()
        sweep_dead_temps(out / BATCH_DIR)
    # enough cases in flight to keep `concurrency` requests busy while the next
    # sample loads, but bounded so a large cohort is never all in memory
    limit = max_pending_cases or max(2, 2 * concurrency // max(1, len(views)) + 1)
    pending: set[asyncio.Task] = set()
    it = iter(samples)
    batch_mode = bool(getattr(describer, "batch", False)) and not dry_run
    try:
        if batch_mode:
            await _run_batch(run, it, batch_poll_s, batch_max_wait_s)
        while not batch_mode:
            work = await asyncio.to_thread(run.next_case, it)
            if work is None:
                break
            pending.add(asyncio.create_task(run.run_case(work)))
            # until the preflight has its verdict, one case at a time
            cap = 1 if (run.preflight is None or not run.preflight.is_set()) else limit
            while len(pending) >= cap:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
                cap = limit
        if pending:
            done, pending = await asyncio.wait(pending)
            for t in done:
                t.result()
    finally:
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await describer.aclose()
        if bar is not None:
            bar.close()
    summary = run.finish(t0)
    log.info("describe summary:\n%s", summary.format())
    return summary


def describe_cases(samples: Iterable[Mapping[str, Any]], backend: str | Describer | None,
                   out_dir: str | os.PathLike, *, model: str = "gpt-4o", base_url: str | None = None,
                   concurrency: int = 8, dry_run: bool = False, views: tuple[str, ...] = VIEWS,
                   max_pending_cases: int | None = None, breaker_threshold: int = 3, max_refusals: int = 2,
                   retry_refused: bool = False, progress: bool = False, total: int | None = None,
                   batch_poll_s: float = 30.0, batch_max_wait_s: float | None = None,
                   **backend_kwargs: Any) -> DescribeSummary:
    """Describe every sample, resumably; nothing already cached is paid for again.

    Args:
        samples: iterable of sample dicts (``case_id``, ``mri``, ``brain``, ``meta``);
            consumed lazily in a worker thread, so a generator over the cache is fine.
        backend: ``"openai"``, ``"offline"``, ``"auto"``/``None`` (OpenAI if
            ``OPENAI_API_KEY`` is set, else offline — logged), or a describer object.
        out_dir: output folder (see module docstring); created if missing.
        model, base_url, concurrency, dry_run: OpenAI settings; ``dry_run`` sends
            nothing, writes nothing, and estimates requests, tokens, cost and ETA of
            the uncached views.
        views: which views to describe.
        max_pending_cases: cases prepared ahead (default from ``concurrency``).
        breaker_threshold: fatal failures (or transport failures in a row) that stop the run.
        max_refusals: refusals of the same request after which a view is not re-requested.
        retry_refused: request refused views again anyway.
        progress: show a progress bar (done/failed/cached, tokens, cost, ETA) on stderr.
        total: number of cases, for the bar's ETA.
        batch_poll_s, batch_max_wait_s: Batch API mode (``batch=True``): seconds between
            status polls, and how long this run polls before leaving the batches running
            (their ids are kept; the next run collects them).
        **backend_kwargs: passed to the OpenAI describer (``max_retries``, ``timeout``,
            ``price_input``, ``price_output``, ``prompt_version``, ``batch``, …).

    Returns:
        :class:`DescribeSummary` (also written to ``OUT/describe_summary.json``); its
        ``aborted`` says why a run stopped early.

    Raises:
        MissingAPIKeyError: OpenAI requested without a key and not a dry run.
        ValueError: a malformed sample (the message names the case).
    """
    return asyncio.run(describe_cases_async(samples, backend, out_dir, model=model, base_url=base_url,
                                            concurrency=concurrency, dry_run=dry_run, views=views,
                                            max_pending_cases=max_pending_cases, breaker_threshold=breaker_threshold,
                                            max_refusals=max_refusals, retry_refused=retry_refused,
                                            progress=progress, total=total, batch_poll_s=batch_poll_s,
                                            batch_max_wait_s=batch_max_wait_s, **backend_kwargs))


def load_descriptions(out_dir: str | os.PathLike, describer: Mapping[str, Any] | None = None) -> dict[str, Description]:
    """The per-case :class:`Description` records of ONE describer in a describe output folder, by case id.

    With a manifest (written by every describe run), the describer is the manifest's
    (or ``describer``); cases the last run of that describer could not complete are
    left out; a case file made by another describer (stale, from an earlier run) is
    refused. Without a manifest, all case files must share one describer.

    Raises:
        DescriberMismatchError: a mixture (the message names the cases and describers).
    """
    out_dir = Path(out_dir)
    found: dict[str, Description] = {}
    for p in sorted(out_dir.glob("*.json")):
        if p.stem in _RESERVED:
            continue
        d = Description.model_validate(json.loads(p.read_text(encoding="utf-8")))
        found[d.case_id] = d
    manifest = read_describe_manifest(out_dir)
    want = describer or (manifest or {}).get("describer")
    if want is None:
        single_identity(found, str(out_dir))
        return found
    stale = sorted(c for c, d in found.items() if not same_describer(description_identity(d), want))
    if stale:
        others = sorted({format_identity(description_identity(found[c])) for c in stale})
        raise DescriberMismatchError(
            f"{out_dir} mixes describers: the last describe run used {format_identity(want)}, but "
            f"{len(stale)} case file(s) were made by {', '.join(others)}: {', '.join(stale[:10])}"
            f"{' …' if len(stale) > 10 else ''} (stale from an earlier run; re-describe them with one describer, "
            f"or use another --out/--descriptions folder)")
    status = (manifest or {}).get("cases", {}) if manifest and same_describer(manifest.get("describer"), want) else {}
    return {c: d for c, d in found.items() if status.get(c, "complete") == "complete"}
