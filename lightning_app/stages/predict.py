"""``trifuse predict --ckpt C --input CASE_DIR_OR_DATASET_DIR --output OUT_DIR``: segment BraTS cases.

A thin CLI over :class:`trifuse.inference.Predictor`, which validates the four MRI files,
prepares the input as the cache does, resamples it to the training spacing recorded in the
checkpoint, runs sliding-window inference (with test-time mirroring unless ``--no-tta``),
resamples the probabilities back, applies the post-processing stored in the checkpoint
(unless ``--no-postprocess``) and writes ``OUT_DIR/<case_id>.nii.gz`` (uint8 labels in the
input year's convention, the input's grid, affine and header) atomically, and records each
written case beside the output folder in ``OUT_DIR.predict.json`` (:func:`log_path`: input
shape and spacing, the model's training spacing, whether it was resampled, seconds; earlier
records are kept), so that the folder itself holds only the label maps.

Cases whose output exists are skipped (``--overwrite`` to redo them); failed cases are
listed and the command exits 1 after the others are done.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_app.stages import StageError, progress

#: suffix of the per-case record of a prediction run (read by ``trifuse report --fullsize``)
LOG_SUFFIX = ".predict.json"


def log_path(output) -> Path:
    """The prediction log beside ``output``: ``pred/`` → ``pred.predict.json``, ``x/seg.nii.gz`` → ``x/seg.predict.json``."""
    from trifuse.inference import NIFTI_SUFFIXES

    output = Path(output)
    output = output if output.name else output.resolve()  # `--output .`
    name = output.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return output.with_name(name + LOG_SUFFIX)


def write_log(output, ckpt, cases: dict) -> Path | None:
    """Merge the records of the cases written now into the prediction log (atomic); ``None`` if none."""
    import json

    from trifuse.io.nifti import atomic_write_text

    if not cases:
        return None
    path = log_path(output)
    old = json.loads(path.read_text()).get("cases", {}) if path.is_file() else {}
    old.update({cid: {**rec, "ckpt": str(ckpt)} for cid, rec in cases.items()})
    atomic_write_text(path, json.dumps({"cases": dict(sorted(old.items()))}, indent=2) + "\n")
    return path


def predict_cases(
    ckpt,
    input_dir,
    output,
    device: str = "auto",
    overlap: float | None = None,
    sw_batch_size: int | None = None,
    overwrite: bool = False,
    ct_model: str | None = None,
    tta: bool = True,
    postprocess: bool = True,
    report=None,
    describer: str = "as-trained",
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Segment every case under ``input_dir`` with :class:`trifuse.inference.Predictor`.

    ``workers > 1`` runs that many processes (spawned), each loading the model once and taking
    every ``workers``-th case (``shard``), with the CPU threads shared out between them.

    Returns:
        ``{"written": [...], "skipped": [...], "failed": {case_id: [problems]}, "seconds": {...}, "cases": {...}}``
        (``cases``: the per-case records of :meth:`trifuse.inference.Predictor.predict_folder`).

    Raises:
        FileNotFoundError / ValueError: no input, no checkpoint, no BraTS case found.
    """
    from trifuse.inference import NIFTI_SUFFIXES, Predictor, output_path
    from trifuse.io.discovery import discover_cases

    records = discover_cases(input_dir)  # fails early (no case) before a model is loaded
    output = Path(output)
    single = len(records) == 1
    if output.name.endswith(NIFTI_SUFFIXES) and not single:
        raise ValueError(f"{output}: a file name needs a single input case, but {input_dir} holds {len(records)}")
    if not overwrite and all(output_path(output, r.case_id, single).exists() for r in records):
        return {"written": [], "skipped": [r.case_id for r in records], "failed": {}, "seconds": {}, "cases": {}}
    if workers > 1 and len(records) > 1:
        kw = dict(ckpt=ckpt, input_dir=input_dir, output=output, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                  overwrite=overwrite, ct_model=ct_model, tta=tta, postprocess=postprocess, describer=describer)
        return _predict_parallel(kw, min(workers, len(records)))
    predictor = Predictor.from_checkpoint(
        ckpt, device=device, tta=tta, postprocess=postprocess, overlap=overlap, sw_batch_size=sw_batch_size, ct_model=ct_model
    )
    if hasattr(predictor.model, "set_describer"):  # a student with priors: its training describer, or stop now
        predictor.model.set_describer(describer)
    return predictor.predict_folder(input_dir, output, overwrite=overwrite, report=report, shard=shard)


def _predict_shard(kw: dict, shard: tuple[int, int], threads: int) -> dict:
    """One worker of ``--workers``: its share of the cases, with ``threads`` CPU threads."""
    import torch

    torch.set_num_threads(threads)
    return predict_cases(**kw, shard=shard, report=progress(f"predict w{shard[0]}"))


def _predict_parallel(kw: dict, n: int) -> dict:
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // n)
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as pool:
        parts = list(pool.map(_predict_shard, [kw] * n, [(k, n) for k in range(n)], [threads] * n))
    merged: dict = {"written": [], "skipped": [], "failed": {}, "seconds": {}, "cases": {}}
    for part in parts:
        for key in ("written", "skipped"):
            merged[key] += part[key]
        for key in ("failed", "seconds", "cases"):
            merged[key].update(part[key])
    merged["written"].sort()
    merged["skipped"].sort()
    return merged


# --- the stage ------------------------------------------------------------------------------
def run(args) -> int:
    res = predict_cases(
        args.ckpt,
        args.input,
        args.output,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        overwrite=args.overwrite,
        ct_model=args.ct_model,
        tta=args.tta,
        postprocess=args.postprocess,
        report=progress("predict"),
        describer=args.describer,
        workers=args.workers,
    )
    write_log(args.output, args.ckpt, res["cases"])
    n = len(res["written"]) + len(res["skipped"]) + len(res["failed"])
    print(f"predict: {len(res['written'])} written, {len(res['skipped'])} existing skipped, {len(res['failed'])} failed of {n} case(s) → {args.output}")
    if res["failed"]:
        for case_id, problems in sorted(res["failed"].items()):
            print(f"FAILED {case_id}:", file=sys.stderr)
            for p in problems:
                print(f"  - {p}", file=sys.stderr)
        first = next(iter(sorted(res["failed"].items())))
        raise StageError(
            f"{len(res['failed'])} case(s) failed, no output written for them: {first[0]}: {first[1][0]}"
            + (f" (and {len(res['failed']) - 1} more, see above)" if len(res["failed"]) > 1 else "")
        )
    return 0


def register(sub) -> None:
    s = sub.add_parser(
        "predict",
        help="segment BraTS cases: --ckpt C --input CASE_OR_DATASET --output OUT_DIR (without --input: LightningCLI predict)",
    )
    s.add_argument("--ckpt", required=True, help="model checkpoint (e.g. runs/teachers/mri/checkpoints/best.ckpt)")
    s.add_argument("--input", required=True, help="a case folder or a dataset folder (BraTS 2020/2021/2023 layout); only the four MRI files are needed")
    s.add_argument("--output", required=True, help="output folder (<case_id>.nii.gz per case), or a .nii.gz file for a single case")
    s.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    s.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model's)")
    s.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: the model's)")
    s.add_argument("--overwrite", action="store_true", help="redo cases whose output exists (default: skip them)")
    s.add_argument("--ct-model", default=None, help="fitted CT mixture for a CT teacher (default: the mixture the teacher was trained with, kept in its checkpoint)")
    s.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="test-time mirroring: average the 8 flips (default: on; --no-tta is ~8x faster)")
    s.add_argument("--describer", choices=("as-trained", "offline"), default="as-trained", help="student priors: the describer of the training priors (default; an OpenAI-trained student needs OPENAI_API_KEY), or offline descriptions instead (explicit choice, logged)")
    s.add_argument("--postprocess", action=argparse.BooleanOptionalAction, default=True, help="apply the post-processing decided on validation and stored in the checkpoint (default: on)")
    s.add_argument("--workers", type=int, default=1, help="processes predicting cases in parallel, each with its own model copy (default 1)")
    s.set_defaults(func=run)
