"""CLIP training on the tiny synthetic cohort (offline descriptions): loss falls, held-out recall beats chance."""
from __future__ import annotations

import pytest
import torch

from trifuse.semantic.clip import (
    ClipConfig,
    HFClip,
    data_fingerprint,
    load_clip,
    read_checkpoint,
    save_clip,
    train_clip,
)
from trifuse.semantic.clip_data import build_records, normal_text



def test_pairs_are_label_free_lesion_and_normal_slices(setup):
    recs = build_records(setup["cache"], setup["descriptions"], setup["ids"])
    kinds = {(r.view, r.kind) for r in recs}
    assert kinds == {(v, k) for v in ("axial", "coronal", "sagittal") for k in ("lesion", "normal")}
    for r in recs:
        if r.kind == "lesion":
            assert r.text.startswith(r.view.capitalize() + " view:") and r.text == r.case_text
        else:
            assert r.text == normal_text(r.view) and r.bags == (0, 0, 0)
    # the described slice (the one the describer saw) is among the lesion slices
    for cid in setup["ids"]:
        desc = setup["descriptions"][cid]
        described = {r.view: r.index for r in recs if r.described and r.case_id == cid}
        assert described == {v: desc.slices[v].index for v in described} and described


def test_minilm_clip_loss_falls_and_heldout_recall_beats_chance(setup):
    payload = read_checkpoint(setup["ckpt"])
    m = payload["metrics"]
    hist = m["loss_history"]
    assert len(hist) == setup["config"].epochs
    assert hist[-1] < 0.75 * hist[0]
    assert set(m["heldout_cases"]).isdisjoint(m["train_cases"]) and len(m["heldout_cases"]) == 2
    r = m["heldout"]
    assert r["n_images"] > 20 and r["n_texts"] >= 6
    assert r["i2t@1"] > r["chance_i2t@1"] + 0.1
    assert r["t2i@1"] > r["chance_t2i@1"]
    assert r["i2t@5"] > r["chance_i2t@5"]
    assert 0.01 <= m["temperature"] <= 1.0
    # only the trainable parts are stored: no MiniLM body in the file
    assert not any(k.startswith("text.body.") for k in payload["model"]["state_dict"])


def test_checkpoint_roundtrip_gives_the_same_embeddings(setup):
    model = load_clip(setup["ckpt"])
    again = load_clip(setup["ckpt"])
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.encode_image(x)[1], again.encode_image(x)[1])
        assert torch.allclose(model.encode_text(["Axial view: no focal abnormality."]),
                              again.encode_text(["Axial view: no focal abnormality."]))
    assert model.config == setup["config"]


def test_hf_backend_trains_on_pairs_from_a_local_tiny_clip(setup, tmp_path):
    folder = _tiny_clip(tmp_path / "tiny_clip")
    cfg = ClipConfig(backend="hf", pretrained=folder, epochs=3, batch_size=32, lr=1e-3, seed=0)
    res = train_clip(setup["cache"], setup["descriptions"], setup["ids"], cfg)
    assert isinstance(res.model, HFClip) and res.model.image_size == 32
    assert res.history[-1] < res.history[0]
    assert "i2t@1" in res.metrics["heldout"]
    again = load_clip(save_clip(tmp_path / "hf.pt", res.model))
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(again.encode_image(x)[0], res.model.eval().encode_image(x)[0], atol=1e-6)
    # the hf patch tokens (4×4 grid) give priors of the documented form too
    from trifuse.io.cache import load_sample
    from trifuse.semantic.priors import compute_prior, reduced_shape

    cid = setup["ids"][0]
    sample = load_sample(setup["cache"], cid)
    p = compute_prior(again, sample, setup["descriptions"][cid])
    assert p.prior.shape == (3,) + reduced_shape(sample["mri"].shape[1:], 4) and p.prior.dtype == torch.float16
    assert 0.0 <= float(p.prior.min()) and float(p.prior.max()) <= 1.0 and p.text.shape == (16,)


def _tiny_clip(folder):
    """A random 2-layer CLIP (32-px images, 8-px patches) with a character-level tokenizer, saved locally."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in (chr(c) for c in range(33, 127)):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return str(folder)


def test_one_cycle_takes_any_number_of_steps():
    """torch's OneCycleLR divides 0 by 0 when its warm-up ends at step 0 (10 steps at pct_start 0.1)."""
    from trifuse.semantic.clip import one_cycle

    for steps in range(1, 31):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = one_cycle(opt, 1e-3, steps)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) <= 1e-3 * (1 + 1e-6) and lrs[-1] < lrs[0] or steps == 1, (steps, lrs)


def test_clip_stage_one_epoch_of_ten_batches_on_three_cases(tmp_path, monkeypatch):
    """`trifuse clip --epochs 1` on a 3-case cohort: 81 training pairs in batches of 8 are the
    10 steps at which the one-cycle schedule divided by zero ("float division by zero")."""
    import json

    from lightning_app.cli import main
    from trifuse.synth import synthesize_cohort

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    data = tmp_path / "data" / "syn"
    synthesize_cohort(data, 3, seed=1, layout=2021, size="tiny")
    assert main(["describe", "--data", str(data), "--backend", "offline", "--no-progress"]) == 0
    out = tmp_path / "clip"
    assert main(["clip", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                 "--image-size", "32", "--width", "8", "--embed-dim", "32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train_pairs"] // 8 == 10 and len(metrics["loss_history"]) == 1  # the degenerate case was run
    assert read_checkpoint(out / "clip.pt")["metrics"]["n_train_pairs"] == metrics["n_train_pairs"]
