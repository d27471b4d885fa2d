"""Requests a describe run sends before it stops, for each fatal server behaviour.

Runs ``describe_cases`` over ``--cases`` phantom cases (3 views each) against the test
suite's OpenAI-compatible HTTP server on 127.0.0.1 (``tests/semantic/conftest.py``),
scripted to answer every request with one failure, and prints the requests the server
received, the views not sent, and the stop message. Nothing leaves the machine.

Usage::

    python bench/bench_describe_failfast.py --cases 1251
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1251)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.semantic.conftest import FakeOpenAIServer, phantom_sample
    from tests.semantic.test_semantic_failfast import FATAL
    from trifuse.semantic.describe import describe_cases
    from trifuse.semantic.openai_describer import OpenAIDescriber

    os.environ["OPENAI_API_KEY"] = "sk-local-placeholder"
    cases = lambda: (phantom_sample(case_id=f"case_{i:04d}", seed=i) for i in range(args.cases))  # noqa: E731
    print(f"{args.cases} cases ({3 * args.cases} views), concurrency {args.concurrency}, default retries (5)")
    print(f"{'server behaviour':<22}{'requests':>9}{'cases read':>11}  stop message")
    for name, (status, payload, _) in sorted(FATAL.items()):
        server = FakeOpenAIServer()
        server.script = lambda n, body, st=status, pl=payload: (st, pl, {})
        with tempfile.TemporaryDirectory() as tmp:
            d = OpenAIDescriber(base_url=server.url, concurrency=args.concurrency, timeout=5.0)
            s = describe_cases(cases(), d, tmp, concurrency=args.concurrency)
        server.close()
        print(f"{name:<22}{server.n_requests:>9}{s.cases:>11}  {s.aborted[:110]}")
    server = FakeOpenAIServer()  # the quota runs out after 30 answered requests
    quota = FATAL["insufficient_quota"]
    server.script = lambda n, body: server.ok(n, body) if n <= 30 else (quota[0], quota[1], {})
    with tempfile.TemporaryDirectory() as tmp:
        d = OpenAIDescriber(base_url=server.url, concurrency=args.concurrency, timeout=5.0)
        s = describe_cases(cases(), d, tmp, concurrency=args.concurrency)
    server.close()
    print(f"{'quota gone mid-run':<22}{server.n_requests:>9}{s.cases:>11}  {s.aborted[:110]} "
          f"({s.described} views described before)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        d = OpenAIDescriber(base_url=f"http://127.0.0.1:{port}/v1", concurrency=args.concurrency, timeout=5.0)
        s = describe_cases(cases(), d, tmp, concurrency=args.concurrency)
    print(f"{'wrong --base-url':<22}{s.requests:>9}{s.cases:>11}  {s.aborted[:110]} ({s.elapsed_s:.0f} s)")


if __name__ == "__main__":
    main()
