"""Callbacks: a printed per-region summary at the end of validation and fit."""
from __future__ import annotations

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
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
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
