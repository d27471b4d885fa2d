"""What ``trifuse describe --dry-run`` prints for a BraTS-sized cohort, per model, online and batch.

A dry run's estimate per view depends only on the rendered slice (always a 512×512 PNG,
four 256-px panels), the prompt text and the model family — not on the case — so the
figures for a cohort of ``--cases`` (default 1,251: BraTS 2021 training) are the
per-view estimate of a few generated cases times ``3 · cases``. The run itself is a real
``describe_cases(..., dry_run=True)`` over those generated cases (nothing is sent).

Usage::

    python bench/bench_describe_cost.py --models gpt-4o,gpt-4o-mini --cases 1251
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt-4o,gpt-4o-mini")
    ap.add_argument("--cases", type=int, default=1251)
    ap.add_argument("--sample", type=int, default=3, help="generated cases the estimate is measured on")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    from trifuse.io.cache import load_sample
    from trifuse.semantic.clip_data import resolve_cache
    from trifuse.semantic.describe import ASSUMED_SECONDS_PER_REQUEST, _hms, describe_cases
    from trifuse.semantic.pricing import PRICE_SOURCE, model_family
    from trifuse.synth import synthesize_cohort

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synthetic"
        synthesize_cohort(data, args.sample, seed=0, layout=2021, size="tiny")
        cache, ids = resolve_cache(data)
        samples = [load_sample(cache, c) for c in ids]
        print(f"prices: {PRICE_SOURCE}; per 1M tokens (input/output): "
              + ", ".join(f"{m} ${model_family(m).price_input:.2f}/${model_family(m).price_output:.2f}"
                          for m in args.models.split(",")))
        print(f"{'model':<14}{'mode':<8}{'requests':>10}{'prompt tok':>13}{'compl. tok':>12}{'cost USD':>11}  ETA")
        for model in args.models.split(","):
            for batch in (False, True):
                s = describe_cases(samples, "openai", Path(tmp) / "out", model=model, dry_run=True,
                                   concurrency=args.concurrency, batch=batch)
                k = args.cases / s.cases
                req, pt, ct, usd = s.would_request * k, s.est_prompt_tokens * k, s.est_completion_tokens * k, \
                    s.est_cost_usd * k
                eta = ("≤ 24 h (Batch API completion window)" if batch else
                       f"~{_hms(req * ASSUMED_SECONDS_PER_REQUEST / args.concurrency)} at {args.concurrency} in "
                       f"flight, {ASSUMED_SECONDS_PER_REQUEST:.0f} s per request (assumed)")
                print(f"{model:<14}{'batch' if batch else 'online':<8}{req:>10.0f}{pt:>13,.0f}{ct:>12,.0f}"
                      f"{usd:>11.2f}  {eta}")


if __name__ == "__main__":
    main()
