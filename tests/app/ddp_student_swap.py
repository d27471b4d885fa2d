"""Two-rank (gloo) student run with a teacher checkpoint landing mid-run; used by test_ddp.py.

Usage: python ddp_student_swap.py DATA CACHE TEACHER_DIR NEW_CKPT OUT_DIR
Each rank writes OUT_DIR/rank<r>.json: swap steps, steps and patches per epoch.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch

from trifuse import keys
from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.distill import AsyncTeacherDistillation
from trifuse.lightning.student import StudentModule


class LandCheckpoint(L.Callback):
    """On rank 0 only, a newer teacher checkpoint lands at ``at_step`` — late (after a pause), so a
    rank that decided on its own would have looked before it existed."""

    def __init__(self, src: str, dst: str, at_step: int, delay_s: float = 1.0):
        self.src, self.dst, self.at_step, self.delay_s = src, dst, at_step, delay_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0 and trainer.global_step == self.at_step:
            time.sleep(self.delay_s)
            tmp = Path(self.dst).with_name(".incoming.tmp")
            shutil.copyfile(self.src, tmp)
            tmp.replace(self.dst)


class Count(L.Callback):
    def __init__(self):
        self.steps: dict[int, int] = {}
        self.patches: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        e = trainer.current_epoch
        self.steps[e] = self.steps.get(e, 0) + 1
        self.patches += [f"{c}:{m['patch_box']}" for c, m in zip(batch[keys.CASE_ID], batch[keys.META])]


def main(data: str, cache: str, teacher_dir: str, new_ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = BratsDataModule(data, cache, patch_size=(16, 16, 16), batch_size=1, num_workers=0, steps_per_epoch=3, n_folds=3, limit_val_cases=1, augment=False)
    model = StudentModule(init_filters=8, teacher_modalities=("mri",), teacher_channels=128, fusion_width=16, fusion_heads=2, fusion_window=2,
                          use_semantic=False, warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False)
    cb = AsyncTeacherDistillation({"mri": teacher_dir}, poll_every_n_steps=2, watch=True)
    count = Count()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, callbacks=[LandCheckpoint(new_ckpt, str(Path(teacher_dir) / "best.ckpt"), 4), cb, count],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=out)
    trainer.fit(model, dm)
    rank = trainer.global_rank
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.world_size, "swap_log": cb.swap_log, "steps": count.steps, "patches": count.patches,
        "global_step": trainer.global_step, "lookahead_share": cb.lookahead_share, "dataset_len": len(trainer.train_dataloader.dataset),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:6])
