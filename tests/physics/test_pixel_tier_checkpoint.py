"""Prediction simulates the US and CT the teacher was trained on (the checkpoint's pixel tier)."""
from __future__ import annotations

import lightning as L
import numpy as np
import torch

from trifuse import keys
from trifuse.inference import Predictor
from trifuse.io import cache as cache_mod
from trifuse.io.manifest import read_manifest
from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.teacher import TeacherModule
from trifuse.nets import SegResNetBackbone
from trifuse.physics.acoustic import ImpedanceMapper
from trifuse.physics.ct import CTMixtureModel
from trifuse.physics.paired import save_us_mapper
from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT


def _fitted_mapper() -> ImpedanceMapper:
    """A mapper whose learnable echogenicity is far from the table's (as a paired fit may end)."""
    m = ImpedanceMapper()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.linspace(-1.5, 1.5, p.numel()).reshape(p.shape))
    return m


def _net(channels):
    return SegResNetBackbone(in_channels=channels, out_channels=3, init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1))


def _reload(ckpt, channels):
    """The module as ``load_model`` returns it (a checkpoint made in Python has no CLI config, so the net is given)."""
    model = TeacherModule.load_from_checkpoint(ckpt, net=_net(channels), map_location="cpu").eval()
    model.trifuse_meta = dict(torch.load(ckpt, map_location="cpu", weights_only=True)["trifuse"])  # as load_model does
    return model


def _fit_teacher(tmp_path, cohort, modality, transform, channels):
    data, cache = cohort
    dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0, samples_per_epoch=2,
                         n_folds=3, limit_val_cases=1, sample_transforms=[transform])
    model = TeacherModule(modality=modality, net=_net(channels), roi_size=(16, 16, 16), overlap=0.25)
    L.seed_everything(0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, dm)
    ckpt = tmp_path / f"{modality}.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, dm


def _whole_case(cache):
    cid = read_manifest(cache)["cases"][0]["case_id"]
    s = cache_mod.load_sample(cache, cid)
    return {k: v for k, v in s.items() if k != keys.LABEL}


def _run(transform, sample):
    s = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sample.items()}
    s[keys.META] = {**sample[keys.META], "applied": []}
    return transform(s)


def test_predict_simulates_us_with_the_fitted_mapper_of_training(synthetic_cohort, tmp_path):
    path = save_us_mapper(_fitted_mapper(), tmp_path / "us_mapper.json", meta={"fit": "test"})
    train_tf = SimulateUltrasound(mapper=path, seed=0)
    ckpt, _ = _fit_teacher(tmp_path, synthetic_cohort, "us", train_tf, 1)
    path.unlink()  # the checkpoint must be self-contained: the mapper file is gone at prediction time

    ck = torch.load(ckpt, map_location="cpu", weights_only=True)
    rec = ck["trifuse"]["pixel_tier"]["SimulateUltrasound"]
    assert rec["mapper"] is not None and rec["mapper_source"].endswith("us_mapper.json")

    predictor = Predictor(_reload(ckpt, 1), tta=False, postprocess=False)
    (pred_tf,) = predictor.transforms
    sample = _whole_case(synthetic_cohort[1])
    reference = SimulateUltrasound(mapper=_fitted_mapper(), seed=0)  # what training's transform computes on a whole case
    us_pred = _run(pred_tf, sample)[keys.US]
    us_ref = _run(reference, sample)[keys.US]
    us_table = _run(SimulateUltrasound(seed=0), sample)[keys.US]
    assert us_pred.shape == us_ref.shape and float(us_ref.std()) > 0.01
    torch.testing.assert_close(us_pred, us_ref, rtol=0, atol=1e-6)
    # the mapper matters: the default table's US is different, so the check above can fail
    assert float((us_table - us_ref).abs().max()) > 0.05


def test_predict_synthesises_ct_with_the_mixture_of_training(synthetic_cohort, tmp_path):
    base = CTMixtureModel.from_tissue_model()
    d = base.to_dict()
    d["hu_mean"] = [v + 25.0 for v in d["hu_mean"]]  # a fitted mixture, brighter than the table
    fitted = CTMixtureModel.from_dict(d)
    ckpt, _ = _fit_teacher(tmp_path, synthetic_cohort, "ct", SynthesizeCT(fitted), keys.CT_CHANNELS)

    predictor = Predictor(_reload(ckpt, keys.CT_CHANNELS), tta=False, postprocess=False)
    (pred_tf,) = predictor.transforms
    sample = _whole_case(synthetic_cohort[1])
    ct_pred = _run(pred_tf, sample)[keys.CT]
    ct_ref = _run(SynthesizeCT(fitted), sample)[keys.CT]
    ct_table = _run(SynthesizeCT(None), sample)[keys.CT]
    torch.testing.assert_close(ct_pred, ct_ref, rtol=0, atol=1e-6)
    brain = sample[keys.BRAIN].bool().expand_as(ct_ref)
    assert float((ct_table - ct_ref)[brain].abs().mean()) > 0.1  # 25 HU in the 80 HU brain window
    assert np.isfinite(ct_pred.numpy()).all()
