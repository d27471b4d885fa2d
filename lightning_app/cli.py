"""The ``trifuse`` command.

``trifuse fit|validate|test|predict`` are LightningCLI (see :mod:`lightning_app.lightning_cli`);
``trifuse predict --ckpt C --input DIR --output DIR`` is the inference stage. The other
subcommands are pipeline stages (one module each in :mod:`lightning_app.stages`) that
hand off through files. Every stage exits non-zero on failure with a one-line reason as
the last line on stderr, and can be run twice without harm.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lightning_app.stages import STAGE_MODULES, StageError  # noqa: F401  (re-exported)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _stage_modules():
    for name in STAGE_MODULES:
        try:
            yield importlib.import_module(f"lightning_app.stages.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lightning_app.stages.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trifuse", description="Three-tier fusion brain tumour segmentation (BraTS 2020/2021/2023).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ("fit", "validate", "test"):
        sub.add_parser(name, help=f"LightningCLI {name} (trifuse {name} --help)")
    for mod in _stage_modules():
        mod.register(sub)
    if "predict" not in sub.choices:
        sub.add_parser("predict", help="LightningCLI predict")
    return p


def _is_stage_predict(argv: list[str]) -> bool:
    """``trifuse predict --ckpt ... --input ...`` is the inference stage; otherwise LightningCLI."""
    return argv[0] == "predict" and any(a == "--input" or a.startswith("--input=") for a in argv[1:]) and "predict" in STAGE_MODULES


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS and not _is_stage_predict(argv):
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
