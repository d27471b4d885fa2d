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
    summary = describe_cases(samples, args.backend, out, model=args.model, base_url=args.base_url,
                             concurrency=args.concurrency, dry_run=args.dry_run)
    print(summary.format())
    if not args.dry_run:
        print(f"descriptions of {summary.cases_complete}/{summary.cases} case(s) in {out}")
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
    s.add_argument("--dry-run", action="store_true", help="send nothing; estimate tokens and cost of what is not cached")
    s.add_argument("--out", default=None, help="output folder (default: <data>/../descriptions/<name>)")
    s.set_defaults(func=run)
