"""W&B logging that works offline by default and never records keys."""
from __future__ import annotations

import os
from typing import Optional, Sequence

from lightning.pytorch.loggers import WandbLogger


def wandb_offline_default() -> bool:
    """Offline unless a key is configured; ``WANDB_MODE`` always wins."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    return not os.environ.get("WANDB_API_KEY")


class TrifuseWandbLogger(WandbLogger):
    """``WandbLogger`` grouped by experiment and tagged by stage; offline without a key.

    Args:
        project: W&B project.
        group: experiment (runs of one experiment are compared together).
        stage: e.g. ``teacher-mri``, ``student``; added to the tags and the job type.
        tags: further tags.
        save_dir: local folder of the run files (``wandb/`` below it).
        offline: ``None`` decides from the environment (:func:`wandb_offline_default`).
    """

    def __init__(
        self,
        project: str = "trifuse",
        group: Optional[str] = None,
        stage: str = "train",
        tags: Sequence[str] = (),
        save_dir: str = "runs",
        name: Optional[str] = None,
        offline: Optional[bool] = None,
        log_model: bool = False,
    ):
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(
            project=project,
            group=group,
            job_type=stage,
            tags=sorted({stage, *tags}),
            save_dir=save_dir,
            name=name,
            offline=wandb_offline_default() if offline is None else offline,
            log_model=log_model,
        )
