"""``trifuse describe``: clinical descriptions of every case (OpenAI vision model or offline)."""
from __future__ import annotations

import sys

from lightning_app.stages import StageError


def run(args) -> int:
    from trifuse.io.cache import load_sample
    from trifuse.semantic.clip_data import default_descriptions_dir, resolve_cache
    from trifuse.semantic.describe import describe_cases

    cache_dir, case_ids = resolve_cache(args.data, args.cache)
    out = args.out or default_descriptions_dir(args.data)
    samples = (load_sample(cache_dir, cid) for cid in case_ids)  # lazily: one case in memory at a time
    kw = {}
    if args.backend != "offline":  # OpenAI settings (also what `auto` uses when the key is set)
        kw = dict(price_input=args.price_input, price_output=args.price_output, detail=args.detail,
                  max_tokens=args.max_tokens, response_format=args.response_format, batch=args.batch)
        if args.batch:
            kw.update(batch_poll_s=args.batch_poll, batch_max_wait_s=args.batch_wait)
    summary = describe_cases(samples, args.backend, out, model=args.model, base_url=args.base_url,
                             concurrency=args.concurrency, dry_run=args.dry_run, progress=not args.no_progress,
                             total=len(case_ids), retry_refused=args.retry_refused, **kw)
    print(summary.format())
    if not args.dry_run:
        print(f"descriptions of {summary.cases_complete}/{summary.cases} case(s) in {out}")
    if summary.batch_pending:
        print(f"batch(es) {', '.join(summary.batch_pending)} still running; re-run the same command to collect them")
    if summary.aborted:
        raise StageError(f"stopped after {summary.requests} request(s): {summary.aborted}")
    if summary.failures:
        for f in summary.failures:
            print(f"FAILED {f['case_id']}/{f['view']} [{f['kind']}]: {f['message']}", file=sys.stderr)
        names = sorted({f"{f['case_id']}/{f['view']}" for f in summary.failures})
        raise StageError(f"{len(names)} view(s) could not be described: {', '.join(names[:20])}"
                         f"{' …' if len(names) > 20 else ''} (recorded in {out}/failures.jsonl; re-run to retry them)")
    return 0


def register(sub) -> None:
    s = sub.add_parser("describe", help="describe every case's abnormality in three views (OpenAI vision model or offline)")
    s.add_argument("--data", required=True, help="dataset folder (preprocessed on the fly if needed)")
    s.add_argument("--cache", default=None, help="preprocessed cache (default: <data>/../cache/<name>)")
    s.add_argument("--backend", choices=("auto", "openai", "offline"), default="auto",
                   help="auto: OpenAI when OPENAI_API_KEY is set, else the offline describer")
    s.add_argument("--model", default="gpt-4o", help="vision model name (OpenAI backend)")
    s.add_argument("--base-url", default=None, help="any OpenAI-compatible server, e.g. http://localhost:8000/v1")
    s.add_argument("--concurrency", type=int, default=8, help="requests in flight at most")
    s.add_argument("--dry-run", action="store_true",
                   help="send nothing; print the requests, tokens, cost and ETA of what is not cached")
    s.add_argument("--price-input", type=float, default=None,
                   help="USD per 1M prompt tokens (default: the model family's list price on OpenAI, 0 elsewhere)")
    s.add_argument("--price-output", type=float, default=None, help="USD per 1M completion tokens (see --price-input)")
    s.add_argument("--detail", choices=("low", "high", "auto"), default="low", help="image detail sent to the model")
    s.add_argument("--max-tokens", type=int, default=None, help="completion cap (default: per model family)")
    s.add_argument("--response-format", choices=("json_schema", "json_object", "prompt"), default="json_schema",
                   help="first response format tried; a server that rejects it gets the next")
    s.add_argument("--batch", action="store_true", help="OpenAI Batch API: upload, poll, download (half price, resumable)")
    s.add_argument("--batch-poll", type=float, default=30.0, help="seconds between batch status polls")
    s.add_argument("--batch-wait", type=float, default=None,
                   help="stop polling after this many seconds (the batch keeps running; re-run to collect it)")
    s.add_argument("--retry-refused", action="store_true", help="request views the model refused before once more")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.add_argument("--out", default=None, help="output folder (default: <data>/../descriptions/<name>)")
    s.set_defaults(func=run)
