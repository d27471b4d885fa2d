"""``trifuse preprocess``: validate every case, decode once into the cache, write the manifest."""
from __future__ import annotations

import sys

from lightning_app.stages import StageError, progress
from trifuse.io.validate import CONTENT_CHECKS


def run(args) -> int:
    from trifuse.io.preprocess import preprocess

    report = preprocess(
        args.data,
        args.cache,
        year=args.year,
        n_folds=args.folds,
        seed=args.seed,
        require_seg=args.require_seg,
        progress=progress("preprocess"),
        allow=args.allow or (),
        workers=args.workers,
    )
    print(
        f"BraTS {report.year}: {len(report.written)} written, {len(report.skipped)} unchanged, "
        f"{len(report.invalid)} invalid, {len(report.warnings)} with warnings; cache and manifest in {report.cache_dir}"
    )
    for case_id, warnings in sorted(report.warnings.items()):
        for w in warnings:
            print(f"WARNING {case_id}: {w}", file=sys.stderr)
    if report.invalid:
        for case_id, problems in sorted(report.invalid.items()):
            print(f"INVALID {case_id}:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        if not args.skip_invalid:
            raise StageError(
                f"{len(report.invalid)} invalid case(s): {', '.join(sorted(report.invalid))} (see above; --skip-invalid to continue without them)"
            )
    return 0


def register(sub) -> None:
    s = sub.add_parser("preprocess", help="validate every case, decode once into the cache, write the manifest")
    s.add_argument("--data", required=True, help="dataset folder (BraTS layout)")
    s.add_argument("--cache", default=None, help="cache folder (default: <data>/../cache/<name>)")
    s.add_argument("--year", default="auto", help="auto, 2020, 2021 or 2023")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0, help="k-fold split seed")
    s.add_argument("--require-seg", action="store_true", help="a missing label file is an error")
    s.add_argument("--skip-invalid", action="store_true", help="exit 0 even if some cases are invalid (they stay out of the cache)")
    s.add_argument(
        "--allow",
        action="append",
        choices=CONTENT_CHECKS,
        metavar="CHECK",
        help=f"accept images failing this content check with a warning (repeatable; one of {', '.join(CONTENT_CHECKS)})",
    )
    s.add_argument("--workers", type=int, default=1, help="worker processes decoding and writing cases (default 1)")
    s.set_defaults(func=run)
