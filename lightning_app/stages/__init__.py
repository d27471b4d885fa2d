"""Pipeline stages of the ``trifuse`` command, one module each.

Each module defines ``register(subparsers)`` that adds its subcommand(s) and sets
``func`` to a callable ``(args) -> int``. A stage raises an exception with a one-line
reason on failure; :func:`lightning_app.cli.main` prints it last on stderr and exits 1.
"""


class StageError(RuntimeError):
    """A stage failed for a reason already explained above; the message is the one-line reason."""


def progress(prefix: str):
    """Per-case progress printer ``(i, n, case_id, status)``."""

    def report(i: int, n: int, case_id: str, status: str) -> None:
        print(f"[{prefix} {i}/{n}] {case_id}: {status}", flush=True)

    return report


#: stage modules, in help order; a module that is missing (not built yet) is skipped
STAGE_MODULES = (
    "synth",
    "preprocess",
    "physics",
    "describe",
    "clip",
    "semantic",
    "predict",
    "evaluate",
    "compare",
    "figures",
    "report",
    "bench",
)
