"""``trifuse fit|validate|test|predict``: LightningCLI with class_path configs.

Configs use ``class_path``/``init_args`` for the model and the data module and may
interpolate with OmegaConf (``${data.init_args.patch_size}``). They compose, later files
winning::

    trifuse fit -c configs/trainer/cpu.yaml -c configs/data/synthetic.yaml -c configs/teacher_mri.yaml

Links between the parts, so they cannot disagree:

* the data patch size is the model's sliding-window ROI (``link_arguments`` on parse);
* a model with ``inputs``/``modality`` (the teachers) gets its network's ``in_channels``
  from them (4 for MRI, 1 for US or CT, summed for several inputs); an explicit value that
  disagrees is replaced, with a note on stderr;
* ``run_dir`` (optional, top level), when set, is where the run writes everything:
  ``trainer.default_root_dir``, every logger's ``save_dir`` and every ``ModelCheckpoint``'s
  ``dirpath`` (``<run_dir>/checkpoints``) are set from it, so an overlay that changes only
  ``run_dir`` (an ablation) moves the whole run.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.cli import LightningCLI


def _get(ns, dotted: str):
    cur = ns
    for part in dotted.split("."):
        if cur is None:
            return None
        cur = cur.get(part) if hasattr(cur, "get") else getattr(cur, part, None)
    return cur


class TrifuseCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.init_args.patch_size", "model.init_args.roi_size", apply_on="parse")
        parser.add_argument(
            "--run_dir",
            type=Optional[str],
            default=None,
            help="Folder of the run: sets trainer.default_root_dir, the loggers' save_dir and the checkpoints' dirpath",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        self._link_in_channels(cfg)
        self._apply_run_dir(cfg)

    @staticmethod
    def _apply_run_dir(cfg) -> None:
        run_dir = _get(cfg, "run_dir")
        if not run_dir:
            return
        trainer = cfg["trainer"]
        trainer["default_root_dir"] = run_dir
        for key, arg, value in (("logger", "save_dir", run_dir), ("callbacks", "dirpath", f"{run_dir}/checkpoints")):
            items = trainer.get(key)
            if not isinstance(items, list):
                continue
            for item in items:
                init = _get(item, "init_args")
                if init is None or arg not in init:
                    continue
                if key == "callbacks" and not str(_get(item, "class_path")).endswith("ModelCheckpoint"):
                    continue
                init[arg] = value
                # W&B: a run named after its folder (e.g. the ablation) unless a name is set
                if key == "logger" and "name" in init and not init["name"] and "WandbLogger" in str(_get(item, "class_path")):
                    init["name"] = Path(run_dir).name

    @staticmethod
    def _link_in_channels(cfg) -> None:
        model_args = _get(cfg, "model.init_args")
        net = _get(cfg, "model.init_args.net")
        if model_args is None or net is None or "modality" not in model_args:
            return
        net_args = _get(net, "init_args")
        if net_args is None or "in_channels" not in net_args:
            return
        from trifuse.lightning.teacher import input_channels, resolve_inputs

        want = input_channels(resolve_inputs(model_args["modality"], model_args.get("inputs")))
        have = net_args["in_channels"]
        if have != want:
            if have is not None:
                print(
                    f"note: model.init_args.net.init_args.in_channels={have} replaced by {want} "
                    f"(from the model's inputs)",
                    file=sys.stderr,
                )
            net_args["in_channels"] = want


def run(args: list[str]) -> int:
    import lightning as L

    TrifuseCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        # a resumed run logs into a new logger version; never refuse to write its config
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
    return 0
