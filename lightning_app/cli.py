"""The ``trifuse`` command.

``trifuse fit|validate|test|predict`` are LightningCLI (see :mod:`lightning_app.lightning_cli`);
the other subcommands are pipeline stages that hand off through files. Every stage
exits non-zero on failure with a one-line reason as the last line on stderr, and can
be run twice without harm (the second run skips finished work).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class StageError(RuntimeError):
    """A stage failed for a reason already explained above; the message is the one-line reason."""


def _progress(prefix: str):
    def report(i: int, n: int, case_id: str, status: str) -> None:
        print(f"[{prefix} {i}/{n}] {case_id}: {status}", flush=True)

    return report


# --- stages ----------------------------------------------------------------------------
def cmd_synth(args) -> int:
    from trifuse.synth import synthesize_cohort

    out = synthesize_cohort(args.out, args.n, seed=args.seed, layout=args.layout, size=args.size, progress=_progress("synth"))
    print(f"synthetic cohort: {len(out)} case(s) in {args.out} (BraTS {args.layout} layout, size {args.size})")
    return 0


def cmd_preprocess(args) -> int:
    from trifuse.io.preprocess import preprocess

    report = preprocess(
        args.data, args.cache, year=args.year, n_folds=args.folds, seed=args.seed, require_seg=args.require_seg, progress=_progress("preprocess")
    )
    print(
        f"BraTS {report.year}: {len(report.written)} written, {len(report.skipped)} unchanged, "
        f"{len(report.invalid)} invalid; cache and manifest in {report.cache_dir}"
    )
    if report.invalid:
        for case_id, problems in sorted(report.invalid.items()):
            print(f"INVALID {case_id}:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        if not args.skip_invalid:
            raise StageError(f"{len(report.invalid)} invalid case(s): {', '.join(sorted(report.invalid))} (see above; --skip-invalid to continue without them)")
    return 0


def cmd_figures(args) -> int:
    import numpy as np

    from trifuse import keys
    from trifuse.io.cache import zscore
    from trifuse.io.discovery import discover_cases
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case

    records = discover_cases(args.data)
    if args.case:
        records = [r for r in records if r.case_id == args.case]
        if not records:
            raise StageError(f"case {args.case} not found in {args.data}")
    rec = records[0]
    case = decode_case(rec)
    stack = np.stack([v.data for v in case.images]).astype(np.float32)
    brain = (stack != 0).any(0)
    mri = np.stack([zscore(c, brain)[0] for c in stack])
    sample = {
        keys.MRI: mri,
        keys.BRAIN: brain[None],
        keys.CASE_ID: rec.case_id,
        keys.META: {"spacing": case.reference.spacing, "affine": case.reference.affine.tolist(), "year": rec.year},
    }
    if case.seg is not None:
        sample[keys.LABEL] = labels_to_regions(case.seg.data, rec.year)
        sample[keys.SEG] = case.seg.data[None]
    out = Path(args.out) if args.out else Path("reports/figures") / f"{args.kind}.png"
    if args.kind == "cohort":
        from trifuse.figures.cohort import render_cohort_figure

        render_cohort_figure(sample, out)
    else:  # pragma: no cover - argparse restricts choices
        raise StageError(f"unknown figure {args.kind}")
    print(f"wrote {out}")
    return 0


# --- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trifuse", description="Three-tier fusion brain tumour segmentation (BraTS 2020/2021/2023).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (trifuse {name} --help)")

    s = sub.add_parser("synth", help="write a synthetic BraTS-like cohort on MNI152 anatomy")
    s.add_argument("--out", "--data", dest="out", default="data/synthetic", help="output dataset folder")
    s.add_argument("--n", type=int, default=16, help="number of cases")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layout", type=int, choices=(2020, 2021, 2023), default=2021, help="BraTS naming and label convention")
    s.add_argument("--size", choices=("full", "small", "tiny"), default="small", help="full: 240x240x155 @1 mm; small: 120x120x78 @2 mm; tiny: 60x60x39 @4 mm")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("preprocess", help="validate every case, decode once into the cache, write the manifest")
    s.add_argument("--data", required=True, help="dataset folder (BraTS layout)")
    s.add_argument("--cache", default=None, help="cache folder (default: <data>/../cache/<name>)")
    s.add_argument("--year", default="auto", help="auto, 2020, 2021 or 2023")
    s.add_argument("--folds", type=int, default=5)
    s.add_argument("--seed", type=int, default=0, help="k-fold split seed")
    s.add_argument("--require-seg", action="store_true", help="a missing label file is an error")
    s.add_argument("--skip-invalid", action="store_true", help="exit 0 even if some cases are invalid (they stay out of the cache)")
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("figures", help="PNG figures for checking stages by eye")
    s.add_argument("kind", choices=("cohort",))
    s.add_argument("--data", default="data/synthetic")
    s.add_argument("--case", default=None, help="case id (default: the first)")
    s.add_argument("--out", default=None, help="PNG path")
    s.set_defaults(func=cmd_figures)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from lightning_app.lightning_cli import run

        try:
            return run(argv)
        except SystemExit:
            raise
        except Exception as exc:
            print(f"trifuse {argv[0]}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"trifuse {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"trifuse {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " | ") or type(exc).__name__
    return text if len(text) < 2000 else text[:1997] + "..."


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
