"""Callbacks: a printed per-region summary, and validation media (overlay image, per-case table).

Both read what the module computed in ``on_validation_epoch_end`` (``last_val_summary``,
``last_val_rows``, ``val_example``), so they hook ``on_validation_end``: Lightning calls
callbacks' ``on_validation_epoch_end`` *before* the module's, which would show the
previous epoch.
"""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from trifuse import keys


def format_region_table(summary: dict[str, float], title: str = "") -> str:
    """Markdown-style table of Dice (and HD95 when present) per region and their mean."""
    has_hd = any(k.startswith("hd95_") for k in summary)
    head = "| region | Dice |" + (" HD95 (mm) |" if has_hd else "")
    sep = "|---|---|" + ("---|" if has_hd else "")
    rows = []
    for r in list(keys.REGIONS) + ["mean"]:
        if f"dice_{r}" not in summary:
            continue
        row = f"| {r} | {summary[f'dice_{r}']:.4f} |"
        if has_hd:
            row += f" {summary.get(f'hd95_{r}', float('nan')):.2f} |"
        rows.append(row)
    return "\n".join(([title] if title else []) + [head, sep] + rows)


class RegionSummary(L.Callback):
    """Prints the per-region validation table after each validation and at the end of fit."""

    def __init__(self, every_validation: bool = False):
        self.every_validation = every_validation

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.every_validation and not trainer.sanity_checking and getattr(pl_module, "last_val_summary", None):
            print("\n" + format_region_table(pl_module.last_val_summary, f"validation, epoch {trainer.current_epoch}"), flush=True)

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        summary = getattr(pl_module, "last_val_summary", None)
        if summary:
            ckpt = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
            print("\n" + format_region_table(summary, f"TriFuse summary: validation after epoch {trainer.current_epoch}"), flush=True)
            if ckpt:
                print(f"best checkpoint: {ckpt}", flush=True)


def media_dir(trainer) -> Path:
    """``<default_root_dir>/media``: where overlays and per-case tables are saved as files."""
    return Path(trainer.default_root_dir) / "media"


class ValidationMedia(L.Callback):
    """Logs a tri-planar overlay of a validation prediction and the per-case table.

    To every logger that has ``log_image`` / ``log_table`` (``WandbLogger``; W&B offline
    without a key) and, always, as files under ``<default_root_dir>/media/``:
    ``val_overlay_epoch<E>.png`` and ``val_per_case.csv`` (columns
    ``epoch,step,case_id,region,dice,hd95``, appended per validation). CSV-only runs thus
    keep the same information.

    Args:
        every_n_validations: log media every n-th validation run (tables are cheap; images
            are rendered by matplotlib on rank 0).
        save_files: also write the PNG and CSV files.
    """

    def __init__(self, every_n_validations: int = 1, save_files: bool = True):
        self.every_n = max(1, int(every_n_validations))
        self.save_files = save_files
        self._count = 0

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or getattr(trainer, "fast_dev_run", False):
            return
        self._count += 1
        if (self._count - 1) % self.every_n:
            return
        step, epoch = trainer.global_step, trainer.current_epoch
        rows = list(getattr(pl_module, "last_val_rows", []) or [])
        example = getattr(pl_module, "val_example", None)
        image = None
        if example is not None:
            from trifuse.lightning.images import render_triplanar

            image = render_triplanar(example, title=f"{example['case_id']} ({example['modality']}), epoch {epoch}")
        for logger in trainer.loggers:
            if image is not None and hasattr(logger, "log_image"):
                logger.log_image(key="val/overlay", images=[image], step=step, caption=[example["case_id"]])
            if rows and hasattr(logger, "log_table"):
                cols = ["case_id", "region", "dice", "hd95"]
                logger.log_table(key="val/per_case", columns=["epoch"] + cols, data=[[epoch] + [r[c] for c in cols] for r in rows], step=step)
        if self.save_files:
            out = media_dir(trainer)
            out.mkdir(parents=True, exist_ok=True)
            if image is not None:
                _save_png(out / f"val_overlay_epoch{epoch:03d}.png", image)
            if rows:
                path = out / "val_per_case.csv"
                new = not path.exists()
                with open(path, "a", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=["epoch", "step", "case_id", "region", "dice", "hd95"], lineterminator="\n")
                    if new:
                        w.writeheader()
                    for r in rows:
                        w.writerow({"epoch": epoch, "step": step, **{k: r[k] for k in ("case_id", "region", "dice", "hd95")}})


def _save_png(path: Path, rgb) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg

    from trifuse.io.nifti import atomic_target, sweep_dead_temps

    sweep_dead_temps(path.parent)  # PNGs a killed run left half-written
    with atomic_target(path) as tmp:  # writer-tagged ``.<name>.~pid@host~.<random>.tmp.png``
        mpimg.imsave(tmp, rgb)
