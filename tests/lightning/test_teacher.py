"""TeacherModule: inputs and channels, features, a short real fit, checkpoint reload, schedules."""
from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from trifuse import keys
from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.images import render_triplanar
from trifuse.lightning.module import SegmentationModule
from trifuse.lightning.teacher import OneCycleCosine, TeacherModule, input_channels, resolve_inputs
from trifuse.nets import SegResNetBackbone


def small_net(in_channels=4):
    return SegResNetBackbone(in_channels=in_channels, out_channels=3, init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1))


def test_inputs_and_channels():
    assert resolve_inputs("us") == ("us",) and resolve_inputs("mri", ["mri", "ct"]) == ("mri", "ct")
    assert input_channels(["mri"]) == 4 and input_channels(["mri", "us", "ct"]) == 7
    with pytest.raises(ValueError, match="modality must be one of"):
        resolve_inputs("pet")
    with pytest.raises(ValueError, match="unknown input key"):
        resolve_inputs("mri", ["mri", "pet"])
    with pytest.raises(ValueError, match="in_channels=4 but inputs \\['us'\\] give 1 channel"):
        TeacherModule(modality="us", net=small_net(4))
    assert TeacherModule(modality="ct", net=small_net(2)).in_channels == 2


def test_missing_input_names_the_pixel_tier_transform():
    t = TeacherModule(modality="us", net=small_net(1))
    with pytest.raises(KeyError, match="SimulateUltrasound"):
        t.net_input({keys.MRI: torch.zeros(1, 4, 8, 8, 8)})


def test_forward_and_features_shapes():
    t = TeacherModule(net=small_net()).eval()
    x = torch.randn(2, 4, 16, 16, 16)
    assert t(x).shape == (2, 3, 16, 16, 16)
    feats = t.features(x)
    assert list(feats) == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
    assert feats["bottleneck"].shape == (2, 32, 4, 4, 4) and feats["dec0"].shape == (2, 8, 16, 16, 16)
    # the plain MONAI network has no taps: a clear error
    from monai.networks.nets import SegResNet

    plain = TeacherModule(net=SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8))
    with pytest.raises(TypeError, match="no feature taps"):
        plain.features(x)


def test_hparams_hold_no_live_objects():
    t = TeacherModule(net=small_net(), roi_size=(16, 16, 16))
    assert set(t.hparams) >= {"modality", "inputs", "roi_size", "overlap"}
    assert not {"net", "optimizer", "scheduler"} & set(t.hparams)  # live objects left out
    assert all(v is None or isinstance(v, (str, int, float, bool, tuple, list)) for v in t.hparams.values())


def test_one_cycle_holds_final_rate_past_the_end():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = OneCycleCosine(opt, total_steps=10, pct_start=0.3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 25)  # starts at max_lr / div_factor
    lrs = []
    for _ in range(12):  # torch's OneCycleLR raises after total_steps
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[1] == pytest.approx(1e-2)  # peak at the end of the warm-up, step 0.3 * 10 - 1
    assert lrs[-1] == lrs[-2] == lrs[-3] == pytest.approx(1e-2 / 25 / 1e4)
    # a one-step warm-up (pct_start * total_steps == 1) does not divide by zero
    opt = torch.optim.AdamW([p], lr=1e-2)
    sched = OneCycleCosine(opt, total_steps=4, pct_start=0.25)
    opt.step()
    sched.step()


@pytest.fixture(scope="module")
def fitted(synthetic_cohort, tmp_path_factory):
    """Two training steps and one validation of a small MRI teacher on the tiny cohort."""
    data, cache = synthetic_cohort
    dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=4, n_folds=3, limit_val_cases=2)
    L.seed_everything(0)
    model = TeacherModule(net=small_net(), roi_size=(16, 16, 16), overlap=0.25)
    root = tmp_path_factory.mktemp("teacher")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
    )
    trainer.fit(model, dm)
    ckpt = root / "t.ckpt"
    trainer.save_checkpoint(ckpt)
    return model, dm, trainer, ckpt


def test_fit_logs_per_region_metrics(fitted):
    model, dm, trainer, _ = fitted
    for name in ["val/dice_WT", "val/dice_TC", "val/dice_ET", "val/dice_mean", "val/hd95_WT", "val/hd95_ET", "val/hd95_mean", "val/loss"]:
        assert name in trainer.callback_metrics, name
    # the mean over regions is the mean of the per-region means (not some other reduction)
    regions = [float(trainer.callback_metrics[f"val/dice_{r}"]) for r in ("WT", "TC", "ET")]
    assert float(trainer.callback_metrics["val/dice_mean"]) == pytest.approx(sum(regions) / 3, abs=1e-6)
    # per-case rows: one per validation case and region
    assert sorted({r["case_id"] for r in model.last_val_rows}) == sorted(dm.val_ids)
    assert len(model.last_val_rows) == 3 * len(dm.val_ids)
    # the mean of the rows is the logged mean (the metric averages over cases)
    assert np.mean([r["dice"] for r in model.last_val_rows]) == pytest.approx(float(trainer.callback_metrics["val/dice_mean"]), abs=1e-6)
    # the one-cycle schedule got its length from the trainer: 2 optimizer steps
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 2
    assert trainer.lr_scheduler_configs[0].interval == "step"
    rgb = render_triplanar(model.val_example)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 0


def test_checkpoint_reloads_with_identical_outputs(fitted):
    model, dm, _, ckpt = fitted
    ck = torch.load(ckpt, weights_only=True)  # loadable without unpickling code
    assert ck["trifuse"]["modality"] == "mri" and ck["trifuse"]["inputs"] == ["mri"]
    again = TeacherModule.load_from_checkpoint(ckpt, net=small_net())
    model.eval()
    again.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        a = model.infer(model.net_input(batch))
        b = again.infer(again.net_input(batch))
    assert torch.equal(a, b)
    assert again.roi_size == (16, 16, 16) and again.overlap == 0.25


def test_segmentation_module_front_still_works():
    m = SegmentationModule(net=small_net(), lr=1e-3, roi_size=(16, 16, 16))
    assert m.inputs == (keys.MRI,) and m.hparams.lr == 1e-3
    opt = m.configure_optimizers()  # no trainer: plain AdamW as before
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 1e-4


def test_checkpoint_records_spacing_and_postprocessing_decision(fitted):
    model, dm, trainer, ckpt = fitted
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)
    meta = raw["trifuse"]
    want_spacing = dm.target_spacing
    assert want_spacing is not None and meta["spacing"] == pytest.approx(want_spacing)
    decision = meta["postprocessing"]
    assert set(decision["min_component_mm3"]) == {"WT", "TC", "ET"} and "et_min_mm3" in decision
    assert decision["n_cases"] == len(dm.val_ids)
    # the decision and spacing round-trip into a reloaded module and into the Predictor
    from trifuse.inference import Predictor

    again = TeacherModule.load_from_checkpoint(ckpt, net=small_net(), map_location="cpu")  # built in Python: pass the net
    again.trifuse_meta = raw["trifuse"]  # what trifuse.inference.load_model attaches
    assert again.postprocessing_decision == decision and again.train_spacing == pytest.approx(want_spacing)
    pred = Predictor(again)
    assert pred.decision == decision and pred.target_spacing == pytest.approx(want_spacing)
