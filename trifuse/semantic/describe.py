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
from trifuse.semantic.backend import API_KEY_ENV, DescribeError, Describer, redact
from trifuse.semantic.cache import DescriptionCache, atomic_write_json, cache_key
from trifuse.semantic.schema import VIEWS, Description, SliceRef, ViewDescription
from trifuse.semantic.slices import ViewSlice, extract_view_slices, find_abnormality, sample_arrays

log = logging.getLogger(__name__)

SUMMARY_NAME = "describe_summary.json"
_RESERVED = {Path(SUMMARY_NAME).stem}


@dataclass
class DescribeSummary:
    """What a :func:`describe_cases` run did.

    Attributes:
        backend, model, prompt_version, dry_run, out_dir: the run's settings.
        cases: cases seen; cases_complete: cases with every view described (file written).
        views: (case, view) pairs seen; described: newly described this run; cached:
            served from the cache; failed: failed this run.
        requests, retries, prompt_tokens, completion_tokens, cost_usd: backend usage.
        would_request, est_prompt_tokens, est_completion_tokens, est_cost_usd: dry-run
            estimates for the uncached views.
        failures: ``{case_id, view, kind, message, attempts, status}`` per failure this run.
        elapsed_s: wall time.
    """

    backend: str
    model: str
    prompt_version: str
    dry_run: bool
    out_dir: str
    cases: int = 0
    cases_complete: int = 0
    views: int = 0
    described: int = 0
    cached: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    would_request: int = 0
    est_prompt_tokens: int = 0
    est_completion_tokens: int = 0
    est_cost_usd: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """No view failed in this run."""
        return self.failed == 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("cost_usd", "est_cost_usd"):
            d[k] = round(d[k], 6)
        d["elapsed_s"] = round(d["elapsed_s"], 3)
        return d

    def format(self) -> str:
        """Human-readable multi-line summary (for the CLI)."""
        lines = [
            f"backend={self.backend} model={self.model} prompt={self.prompt_version}"
            + (" (dry run)" if self.dry_run else ""),
            f"cases {self.cases} (complete {self.cases_complete}); views {self.views}: "
            f"described {self.described}, cached {self.cached}, failed {self.failed}",
        ]
        if self.dry_run:
            lines.append(f"would send {self.would_request} request(s): ~{self.est_prompt_tokens} prompt + "
                         f"~{self.est_completion_tokens} completion tokens, ~${self.est_cost_usd:.4f}")
        else:
            lines.append(f"requests {self.requests} (retries {self.retries}); tokens {self.prompt_tokens} prompt + "
                         f"{self.completion_tokens} completion; cost ${self.cost_usd:.4f}")
        for f in self.failures[:20]:
            lines.append(f"FAILED {f['case_id']}/{f['view']} [{f['kind']}]: {f['message']}")
        if len(self.failures) > 20:
            lines.append(f"… and {len(self.failures) - 20} more failures (see failures.jsonl)")
        return "\n".join(lines)


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


class _Run:
    def __init__(self, describer: Describer, out_dir: Path, views: tuple[str, ...], dry_run: bool) -> None:
        self.d = describer
        self.out = out_dir
        self.views = views
        self.dry_run = dry_run
        self.cache = DescriptionCache(out_dir)
        self.seen: set[str] = set()
        self.summary = DescribeSummary(backend=describer.source, model=describer.model,
                                       prompt_version=describer.prompt_version, dry_run=dry_run, out_dir=str(out_dir))

    # -- worker thread: load and prepare one case ----------------------------------------
    def next_case(self, it: Iterator[Mapping[str, Any]]) -> _CaseWork | None:
        while True:
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
                raise ValueError(f"case id {case_id!r} clashes with the summary file name")
            self.seen.add(case_id)
            try:
                mri, brain, geo = sample_arrays(sample)
                abn = find_abnormality(mri, brain, geo.spacing)
                slices = extract_view_slices(sample, abn, self.views)
            except ValueError as e:
                raise ValueError(f"{case_id}: {e}") from e
            kk = {v: cache_key(case_id, v, slices[v].image_hash, self.d.model, self.d.prompt_version)
                  for v in self.views}
            cached: dict[str, ViewDescription] = {}
            for v in self.views:
                rec = self.cache.get(kk[v])
                if rec is not None:
                    cached[v] = rec["description"]
            todo = [v for v in self.views if v not in cached]
            context = None
            if todo and not self.dry_run:
                context = self.d.prepare(sample, {v: slices[v] for v in todo}, abn)
            if not abn.found:
                log.info("%s: no FLAIR/T2 abnormality found; slices through the brain centre", case_id)
            return _CaseWork(case_id, slices, kk, cached, todo, context)

    # -- event loop: describe one case ----------------------------------------------------
    async def run_case(self, w: _CaseWork) -> None:
        s = self.summary
        s.cases += 1
        s.views += len(self.views)
        s.cached += len(w.cached)
        if self.dry_run:
            for v in w.todo:
                self.d.estimate(w.slices[v])
            return
        results = await asyncio.gather(*(self.one_view(w, v) for v in w.todo))
        views = dict(w.cached)
        views.update({v: r for v, r in zip(w.todo, results, strict=True) if r is not None})
        if all(v in views for v in self.views):
            refs = {v: SliceRef(index=w.slices[v].index, index_original=w.slices[v].index_original,
                                axis=w.slices[v].geometry.slice_axis, image_hash=w.slices[v].image_hash)
                    for v in self.views}
            desc = Description(case_id=w.case_id, views=views, source=self.d.source, model=self.d.model,
                               prompt_version=self.d.prompt_version, slices=refs)
            await asyncio.to_thread(atomic_write_json, self.out / f"{w.case_id}.json", desc.model_dump(mode="json"))
            s.cases_complete += 1

    async def one_view(self, w: _CaseWork, view: str) -> ViewDescription | None:
        vs, key = w.slices[view], w.keys[view]
        base = {"key": key, "case_id": w.case_id, "view": view, "image_hash": vs.image_hash,
                "model": self.d.model, "prompt_version": self.d.prompt_version, "source": self.d.source,
                "slice": {"index": vs.index, "index_original": vs.index_original, "axis": vs.geometry.slice_axis}}
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
                       response_model=out.response_model)
            await asyncio.to_thread(self.cache.put, key, rec)
            self.summary.described += 1
            return out.description
        self.summary.failed += 1
        self.summary.failures.append({"case_id": w.case_id, "view": view, **err})
        log.warning("describe failed %s/%s [%s]: %s", w.case_id, view, err["kind"], err["message"])
        await asyncio.to_thread(self.cache.put_failure, w.case_id, view, dict(base, **err))
        return None

    def finish(self, t0: float) -> DescribeSummary:
        s, u = self.summary, self.d.usage
        s.requests, s.retries = u.requests, u.retries
        s.prompt_tokens, s.completion_tokens, s.cost_usd = u.prompt_tokens, u.completion_tokens, u.cost_usd
        s.would_request, s.est_prompt_tokens = u.would_send, u.est_prompt_tokens
        s.est_completion_tokens, s.est_cost_usd = u.est_completion_tokens, u.est_cost_usd
        s.elapsed_s = time.perf_counter() - t0
        if not self.dry_run:
            self.cache.write_failure_report()
            atomic_write_json(self.out / SUMMARY_NAME, s.to_dict())
        return s


async def describe_cases_async(samples: Iterable[Mapping[str, Any]], backend: str | Describer | None,
                               out_dir: str | os.PathLike, *, model: str = "gpt-4o", base_url: str | None = None,
                               concurrency: int = 8, dry_run: bool = False, views: tuple[str, ...] = VIEWS,
                               max_pending_cases: int | None = None, **backend_kwargs: Any) -> DescribeSummary:
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
    run = _Run(describer, out, tuple(views), dry_run)
    # enough cases in flight to keep `concurrency` requests busy while the next
    # sample loads, but bounded so a large cohort is never all in memory
    limit = max_pending_cases or max(2, 2 * concurrency // max(1, len(views)) + 1)
    pending: set[asyncio.Task] = set()
    it = iter(samples)
    try:
        while True:
            work = await asyncio.to_thread(run.next_case, it)
            if work is None:
                break
            pending.add(asyncio.create_task(run.run_case(work)))
            if len(pending) >= limit:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
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
    summary = run.finish(t0)
    log.info("describe summary:\n%s", summary.format())
    return summary


def describe_cases(samples: Iterable[Mapping[str, Any]], backend: str | Describer | None,
                   out_dir: str | os.PathLike, *, model: str = "gpt-4o", base_url: str | None = None,
                   concurrency: int = 8, dry_run: bool = False, views: tuple[str, ...] = VIEWS,
                   max_pending_cases: int | None = None, **backend_kwargs: Any) -> DescribeSummary:
    """Describe every sample, resumably; nothing already cached is paid for again.

    Args:
        samples: iterable of sample dicts (``case_id``, ``mri``, ``brain``, ``meta``);
            consumed lazily in a worker thread, so a generator over the cache is fine.
        backend: ``"openai"``, ``"offline"``, ``"auto"``/``None`` (OpenAI if
            ``OPENAI_API_KEY`` is set, else offline — logged), or a describer object.
        out_dir: output folder (see module docstring); created if missing.
        model, base_url, concurrency, dry_run: OpenAI settings; ``dry_run`` sends
            nothing, writes nothing, and estimates tokens and cost of the uncached views.
        views: which views to describe.
        max_pending_cases: cases prepared ahead (default from ``concurrency``).
        **backend_kwargs: passed to the OpenAI describer (``max_retries``, ``timeout``,
            ``price_per_1k_input``, ``price_per_1k_output``, ``prompt_version``,
            ``backoff_base``, …).

    Returns:
        :class:`DescribeSummary` (also written to ``OUT/describe_summary.json``).

    Raises:
        MissingAPIKeyError: OpenAI requested without a key and not a dry run.
        ValueError: a malformed sample (the message names the case).
    """
    return asyncio.run(describe_cases_async(samples, backend, out_dir, model=model, base_url=base_url,
                                            concurrency=concurrency, dry_run=dry_run, views=views,
                                            max_pending_cases=max_pending_cases, **backend_kwargs))


def load_descriptions(out_dir: str | os.PathLike) -> dict[str, Description]:
    """All per-case :class:`Description` records of a describe output folder, by case id."""
    out: dict[str, Description] = {}
    for p in sorted(Path(out_dir).glob("*.json")):
        if p.stem in _RESERVED:
            continue
        d = Description.model_validate(json.loads(p.read_text(encoding="utf-8")))
        out[d.case_id] = d
    return out
