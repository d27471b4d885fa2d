"""A semantic student (priors, FiLM, gates on) trained on OpenAI-described priors: self-contained
checkpoint, prediction with the training describer, refusal without it, explicit offline override."""
from __future__ import annotations

import shutil

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch

from trifuse import keys


@pytest.fixture(scope="module")
def openai_student(tmp_path_factory, synthetic_cohort):
    """Describe the cohort through the local OpenAI-compatible server, train CLIP, priors and a student."""
    from tests.semantic.conftest import FAKE_KEY, FakeOpenAIServer
    from trifuse.io.cache import load_sample
    from trifuse.io.manifest import read_manifest
    from trifuse.lightning.data import BratsDataModule
    from trifuse.lightning.student import StudentModule
    from trifuse.semantic.clip import ClipConfig, save_clip, train_clip
    from trifuse.semantic.describe import describe_cases, load_descriptions, read_describe_manifest
    from trifuse.semantic.openai_describer import OpenAIDescriber
    from trifuse.semantic.prior_transforms import LoadPriors
    from trifuse.semantic.priors import PriorConfig, compute_priors

    data, cache = synthetic_cohort
    root = tmp_path_factory.mktemp("openai_student")
    ids = [c["case_id"] for c in read_manifest(cache)["cases"]]
    server = FakeOpenAIServer()
    mp = pytest.MonkeyPatch()
    mp.setenv("OPENAI_API_KEY", FAKE_KEY)
    try:
        d = OpenAIDescriber(model="gpt-4o", base_url=server.url, backoff_base=0.01, timeout=5.0)
        s = describe_cases((load_sample(cache, c) for c in ids), d, root / "desc")
        assert s.ok and s.requests == 3 * len(ids)
        descs = load_descriptions(root / "desc")
        res = train_clip(cache, descs, ids, ClipConfig(image_size=32, width=8, epochs=2, batch_size=32, seed=0))
        clip = save_clip(root / "clip" / "clip.pt", res.model)
        config = PriorConfig(factor=4, slice_step=3)  # not the default: predict must use it
        compute_priors(cache, descs, clip, root / "priors", ids, config,
                       describer_identity=read_describe_manifest(root / "desc")["describer"])
        torch.manual_seed(0)
        dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=2, num_workers=0,
                             samples_per_epoch=4, n_folds=3, limit_val_cases=1,
                             sample_transforms=[LoadPriors(root / "priors")])
        model = StudentModule(init_filters=8, use_response=False, use_feature=False, use_semantic=True, use_film=True,
                              use_semantic_attention=True, warmup_steps=0, roi_size=(16, 16, 16), compute_hd95=False,
                              clip_ckpt=str(clip))
        trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=root, num_sanity_val_steps=0,
                            enable_checkpointing=False)
        trainer.fit(model, dm)
        ckpt = root / "student.ckpt"
        trainer.save_checkpoint(ckpt)
    finally:
        mp.undo()
    yield {"root": root, "data": data, "cache": cache, "ids": ids, "ckpt": ckpt, "clip": clip, "config": config,
           "server": server, "descs": descs}
    server.close()


def _case_dir(data, dest, case_id):
    case = dest / case_id
    case.mkdir(parents=True)
    for f in (data / case_id).iterdir():
        if not f.name.endswith("_seg.nii.gz"):
            shutil.copy(f, case / f.name)
    return case


def test_checkpoint_embeds_clip_prior_config_and_describer(openai_student):
    ck = torch.load(openai_student["ckpt"], map_location="cpu", weights_only=True)  # what predict's reader uses
    sem = ck["trifuse"]["semantic"]
    assert sem["describer"]["backend"] == "openai" and sem["describer"]["model"] == "gpt-4o"
    assert sem["describer"]["prompt_hash"] and sem["clip"]["embedded"] is True
    assert sem["prior_config"]["slice_step"] == 3 and sem["prior_config"]["factor"] == 4
    from trifuse.semantic.clip import file_sha256

    assert sem["clip_sha256"] == file_sha256(openai_student["clip"])


def test_semantic_predict_path_uses_embedded_clip_and_config(openai_student, tmp_path, monkeypatch):
    """priors on, FiLM on, gates on: the prediction-time prior is the training-time construction."""
    from trifuse.io.cache import load_sample
    from trifuse.lightning.student import StudentModule
    from trifuse.semantic.clip import load_clip
    from trifuse.semantic.priors import compute_prior

    o = openai_student
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-TRIFUSE-0123456789-SECRET-abcdef")
    model = StudentModule.load_from_checkpoint(o["ckpt"], map_location="cpu").eval()
    assert model.student.use_film and model.student.use_semantic_attention
    cid = o["ids"][0]
    sample = load_sample(o["cache"], cid)
    sample.pop(keys.PRIOR, None)
    n0 = o["server"].n_requests
    prior, text = model.semantic_for_sample(sample)  # described through the server, as in training
    assert o["server"].n_requests == n0 + 3
    ref = compute_prior(load_clip(o["clip"]), sample, o["descs"][cid], o["config"])
    torch.testing.assert_close(prior[0], ref.prior.float())
    torch.testing.assert_close(text[0], ref.text)
    x = torch.as_tensor(sample[keys.MRI]).float()[None]
    with torch.no_grad():
        with_prior = model.infer(x, prior, text)
        flat = model.infer(x, torch.zeros_like(prior), text)
    assert with_prior.shape == (1, 3, *x.shape[2:])
    assert (with_prior - flat).abs().max() > 1e-4  # the priors reach the output (FiLM and the gates)


def test_predict_refuses_another_describer_and_runs_from_anywhere(openai_student, tmp_path, monkeypatch, capsys):
    from lightning_app.cli import main

    o = openai_student
    cid = o["ids"][1]
    case = _case_dir(o["data"], tmp_path / "in", cid)
    moved = tmp_path / "clip_moved_away.pt"
    shutil.move(str(o["clip"]), moved)  # the checkpoint must be enough
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    try:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        args = ["predict", "--ckpt", str(o["ckpt"]), "--input", str(case), "--no-tta"]
        assert main(args + ["--output", str(tmp_path / "p0")]) == 1
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "openai/gpt-4o" in err and "OPENAI_API_KEY" in err and "--describer offline" in err
        assert not (tmp_path / "p0").exists() or not any((tmp_path / "p0").iterdir())

        assert main(args + ["--output", str(tmp_path / "p1"), "--describer", "offline"]) == 0
        off = np.asarray(nib.load(str(tmp_path / "p1" / f"{cid}.nii.gz")).dataobj)

        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-TRIFUSE-0123456789-SECRET-abcdef")
        n0 = o["server"].n_requests
        assert main(args + ["--output", str(tmp_path / "p2")]) == 0
        assert o["server"].n_requests == n0 + 3  # described as in training
        pred = nib.load(str(tmp_path / "p2" / f"{cid}.nii.gz"))
        ref = nib.load(str(o["data"] / cid / f"{cid}_t1.nii.gz"))
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4} and off.shape == pred.shape
    finally:
        shutil.move(str(moved), o["clip"])
