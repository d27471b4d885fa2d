"""The student's semantic bundle: minilm embedded, hf a verified reference; priors of another CLIP refused."""
import shutil

import pytest
import torch

from tests.semantic.test_clip_core import make_tiny_clip
from trifuse.semantic.clip import ClipConfig, HFClip, file_sha256, save_clip
from trifuse.semantic.provenance import DescriberMismatchError, build_bundle, bundle_clip, bundle_prior_config


def test_hf_bundle_is_a_sha256_checked_reference(tmp_path):
    folder = make_tiny_clip(tmp_path / "tiny_clip")
    model = HFClip(folder).eval()
    model.config = ClipConfig(backend="hf", pretrained=folder)
    model.describer = {"backend": "offline", "model": "trifuse-offline", "prompt_version": "offline-v1",
                       "prompt_hash": "abc"}
    ckpt = save_clip(tmp_path / "clip.pt", model)
    b = build_bundle(ckpt)
    assert b["clip"] == {"embedded": False, "path": str(ckpt.resolve()), "sha256": file_sha256(ckpt)}
    assert b["describer"]["prompt_hash"] == "abc" and bundle_prior_config(b).slice_step == 2
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle_clip(b).encode_image(x)[1], model.encode_image(x)[1])
    other = HFClip(make_tiny_clip(tmp_path / "other")).eval()  # same seed: same weights, so perturb one
    with torch.no_grad():
        other.model.logit_scale.add_(1.0)
    other.config = model.config
    save_clip(ckpt, other)  # CLIP retrained in place: predictions would change silently
    with pytest.raises(DescriberMismatchError, match="changed since the student was trained"):
        bundle_clip(b)
    shutil.move(ckpt, tmp_path / "away.pt")
    with pytest.raises(FileNotFoundError, match="references the hf CLIP"):
        bundle_clip(b)


def test_priors_made_with_another_clip_are_refused(tmp_path, setup):
    import json

    (tmp_path / "priors").mkdir()
    (tmp_path / "priors" / "priors_summary.json").write_text(json.dumps({"clip_sha256": "0" * 64, "config": {}}))
    with pytest.raises(DescriberMismatchError, match="made with another CLIP model"):
        build_bundle(setup["ckpt"], tmp_path / "priors")
    b = build_bundle(setup["ckpt"])  # the session CLIP (minilm): embedded, no file needed afterwards
    assert b["clip"]["embedded"] and b["describer"]["backend"] == "offline"
    assert sum(v.numel() for v in b["clip"]["payload"]["model"]["state_dict"].values()) < 2_000_000
