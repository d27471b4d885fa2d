"""``trifuse fit|validate|test|predict``: LightningCLI with class_path configs.

Configs use ``class_path``/``init_args`` for the model and the data module and may
interpolate with OmegaConf (``${data.init_args.patch_size}``); the data patch size is
linked to the model's sliding-window ROI so the two cannot disagree.
"""
from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


class TrifuseCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.patch_size", "model.init_args.roi_size", apply_on="parse")


def run(args: list[str]) -> int:
    import lightning as L

    TrifuseCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        auto_configure_optimizers=False,
    )
    return 0
