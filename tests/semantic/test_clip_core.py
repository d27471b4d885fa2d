"""CLIP pieces with closed forms: InfoNCE, MIL, retrieval, towers, slice geometry, hf backend I/O."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trifuse.semantic.clip import (
    LOGIT_SCALE_INIT,
    HFClip,
    ImageTower2D,
    _hit_chance,
    clip_loss,
    fuse_queries,
    load_clip,
    mil_patch_loss,
    patch_contrast,
    retrieval_metrics,
    save_clip,
)
from trifuse.semantic.clip_data import (
    NORMAL_PROMPT,
    REGION_PROMPTS,
    SquareFit,
    batch_texts,
    normal_text,
    prepare_slices,
    region_prompts_for,
    select_slices,
    split_cases,
)
from trifuse.semantic.schema import ViewDescription


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------
def test_clip_loss_two_orthogonal_pairs_closed_form():
    img = _unit([1, 0], [0, 1])
    s = torch.tensor(math.log(2.0))  # exp(s) = 2: logits [[2, 0], [0, 2]]
    expected = math.log(1 + math.exp(-2.0))  # -log(e^2 / (e^2 + e^0)), same both ways
    assert float(clip_loss(img, img.clone(), s)) == pytest.approx(expected, rel=1e-6)


def test_clip_loss_equals_symmetric_cross_entropy_and_clamps_at_100():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    s = torch.tensor(LOGIT_SCALE_INIT)
    logits = s.exp() * img @ txt.t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5)))
    assert float(clip_loss(img, txt, s)) == pytest.approx(float(ref), rel=1e-6)
    assert LOGIT_SCALE_INIT == pytest.approx(math.log(1 / 0.07))
    # exp(s) is clamped at 100 (CLIP): s = log 1000 acts like log 100
    assert float(clip_loss(img, txt, torch.tensor(math.log(1000.0)))) == pytest.approx(
        float(clip_loss(img, txt, torch.tensor(math.log(100.0)))), rel=1e-6)


def test_clip_loss_multi_positive_rows_and_columns():
    # images 0 and 1 share text 0 ("no abnormality"), image 2 has text 1
    img = _unit([1, 0], [1, 0.1], [0, 1])
    txt = _unit([1, 0], [0, 1])
    pos = torch.tensor([[True, False], [True, False], [False, True]])
    s = torch.tensor(0.0)
    logits = img @ txt.t()
    i2t = -(F.log_softmax(logits, 1)[pos]).mean()  # one positive per row
    col = F.log_softmax(logits, 0)
    t2i = -0.5 * ((col[0, 0] + col[1, 0]) / 2 + col[2, 1])
    assert float(clip_loss(img, txt, s, pos)) == pytest.approx(float(0.5 * (i2t + t2i)), rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        clip_loss(img, txt, s, torch.zeros(3, 2, dtype=torch.bool))


def test_batch_texts_dedupes_and_marks_every_allowed_text():
    bt = batch_texts(["a", "b", "a"], [("a", "p"), ("b",), ("a", "b")])
    assert bt.texts == ["a", "b"]
    assert bt.positives.tolist() == [[True, False], [False, True], [True, True]]


def test_mil_patch_loss_closed_form():
    # one image, WT positive bag, TC negative bag; 4 patches, 3 inside the brain
    c = torch.tensor([[[[2.0, -1.0], [0.0, 9.0]]], [[[1.0, -2.0], [3.0, 9.0]]]]).permute(1, 0, 2, 3)  # (1, 2, 2, 2)
    brain = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    bags = torch.tensor([[1.0, 0.0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    k = math.ceil(0.5 * 3)  # top-2 of the 3 brain patches
    pos = sp(-(2.0 + 0.0) / k)  # WT: strongest two brain patches 2, 0 (the 9 is outside the brain)
    neg = (sp(1.0) + sp(-2.0) + sp(3.0)) / 3  # TC: every brain patch pushed below 0
    assert float(mil_patch_loss(c, brain, bags, topk_fraction=0.5)) == pytest.approx((pos + neg) / 2, rel=1e-6)


def test_patch_contrast_and_fused_queries():
    patches = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]).t().reshape(1, 2, 1, 2), dim=1)  # e = e1, e2
    q_r = _unit([1, 0])
    q_0 = _unit([0, 1])[0]
    c = patch_contrast(patches, q_r, q_0, 10.0)
    assert c.shape == (1, 1, 1, 2)
    assert c.flatten().tolist() == pytest.approx([10.0, -10.0])
    fused = fuse_queries(_unit([1, 0]), _unit([0, 1]), 1.0)
    assert fused[0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])
    assert torch.equal(fuse_queries(_unit([1, 0]), None, 1.0), _unit([1, 0]))


# --------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------
def test_retrieval_metrics_hand_computed():
    txt = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    # image 0 → text 0 (nearest: 0), image 1 → text 1 (nearest: 2, then 1), image 2 → text 1 (nearest: 1)
    img = _unit([1, 0.1, 0], [0, 0.5, 1], [0, 1, 0.2])
    r = retrieval_metrics(img, txt, torch.tensor([0, 1, 1]), ks=(1, 2))
    assert r["i2t@1"] == pytest.approx(2 / 3)
    assert r["i2t@2"] == pytest.approx(1.0)
    # text 0 → nearest image 0 (hit); text 1 → nearest image 2 (hit); text 2 has no image (not a query)
    assert r["t2i@1"] == pytest.approx(1.0)
    assert r["chance_i2t@1"] == pytest.approx(1 / 3)
    # text 0: 1 of 3 images → 1/3; text 1: 2 of 3 → 2/3 at k=1
    assert r["chance_t2i@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert _hit_chance(10, 2, 5) == pytest.approx(1 - math.comb(8, 5) / math.comb(10, 5))


# --------------------------------------------------------------------------------------
# towers and slices
# --------------------------------------------------------------------------------------
def test_image_tower_pooled_is_brain_masked_mean_of_patches():
    torch.manual_seed(0)
    tower = ImageTower2D(2, in_channels=4, out_channels=8, width=4, global_branch=False).eval()
    x = torch.randn(2, 4, 32, 32)
    brain = torch.zeros(2, 1, 32, 32)
    brain[:, :, 8:24, 4:20] = 1
    pooled, patches = tower(x, brain)
    assert patches.shape == (2, 8, 8, 8) and pooled.shape == (2, 8)
    w = F.avg_pool2d(brain, 4)
    expected = (patches * w).sum((2, 3)) / w.sum((2, 3))
    assert torch.allclose(pooled, expected, atol=1e-5)


def test_image_tower_patches_are_local():
    """A patch embedding depends only on its receptive field (13 + 8·2 = 29 px): no
    per-image statistics leak a lesion elsewhere in the slice into every patch."""
    torch.manual_seed(0)
    tower = ImageTower2D(2, in_channels=4, out_channels=8, width=4).eval()
    x = torch.randn(1, 4, 64, 64)
    y = x.clone()
    y[..., 40:, 40:] += 6.0  # a bright "lesion" in the far corner
    with torch.no_grad():
        (px, ex), (py, ey) = tower(x), tower(y)
    assert torch.allclose(ex[..., :4, :4], ey[..., :4, :4])  # patches ≥ 29 px away: unchanged
    assert not torch.allclose(ex[..., 12:, 12:], ey[..., 12:, 12:])
    assert not torch.allclose(px, py)  # the slice embedding does see it


def test_square_fit_pads_centred_and_inverts():
    x = torch.arange(2 * 6 * 4, dtype=torch.float32).reshape(1, 2, 6, 4)
    fit = SquareFit(6, 4, 6)
    sq = fit.to_square(x)
    assert sq.shape == (1, 2, 6, 6)
    assert torch.equal(sq[..., :, 1:5], x) and sq[..., :, 0].abs().sum() == 0
    assert torch.allclose(fit.from_square(sq), x)
    img, m, fit2 = prepare_slices(np.ones((4, 10, 20), np.float32) * 9, np.ones((10, 20), bool), 8)
    assert img.shape == (1, 4, 8, 8) and m.shape == (1, 1, 8, 8)
    assert float(img.max()) == pytest.approx(5.0)  # clipped to ±5
    assert fit2.offsets == (5, 0) and fit2.from_square(torch.zeros(1, 3, 2, 2)).shape == (1, 3, 10, 20)


def test_select_slices_lesion_and_far_normal():
    brain = np.ones((20, 10, 10), bool)
    mask = np.zeros_like(brain)
    mask[8:12, 2:8, 2:8] = True  # 36 px per slice on 8..11
    mask[12, 4:6, 4:6] = True  # 4 px: under 25 % of the largest cross-section
    lesion, normal = select_slices(mask, brain, 0, spacing_mm=2.0, max_lesion=8, max_normal=20, margin_mm=4.0)
    assert lesion == [8, 9, 10, 11]
    # abnormal slices 8..12, margin 2 slices → normal = 0..5 and 15..19
    assert normal == [0, 1, 2, 3, 4, 5, 15, 16, 17, 18, 19]
    lesion2, normal2 = select_slices(mask, brain, 0, 2.0, max_lesion=2, max_normal=3, margin_mm=4.0)
    assert lesion2 == [8, 11] and len(normal2) == 3


def test_texts_and_prompts_follow_the_description():
    base = dict(view="axial", hemisphere="left", lobes=["frontal"], size_mm=40.0, necrosis=False, oedema="mild",
                mass_effect=False, impression="x")
    assert region_prompts_for(ViewDescription(enhancement="none", **base)) == (REGION_PROMPTS["WT"],)
    assert region_prompts_for(ViewDescription(enhancement="ring", **base)) == tuple(REGION_PROMPTS.values())
    nec = dict(base, necrosis=True)
    assert region_prompts_for(ViewDescription(enhancement="none", **nec)) == (REGION_PROMPTS["WT"], REGION_PROMPTS["TC"])
    assert normal_text("coronal") == "Coronal view: no focal abnormality."
    none = dict(base, hemisphere="none", size_mm=0.0, lobes=[])
    assert region_prompts_for(ViewDescription(enhancement="none", **none)) == (NORMAL_PROMPT,)


def test_split_cases_is_by_case_and_seeded():
    ids = [f"c{i}" for i in range(8)]
    tr, va = split_cases(ids, 0.25, seed=1)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(tr + va) == ids
    assert split_cases(ids, 0.25, seed=1) == (tr, va)
    assert split_cases(["only"], 0.5) == (["only"], [])


# --------------------------------------------------------------------------------------
# hf backend: a tiny random CLIP saved to a local folder (no download)
# --------------------------------------------------------------------------------------
def make_tiny_clip(folder) -> str:
    """A random 2-layer CLIP (32-px images, 8-px patches) with a character-level BPE tokenizer."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in (chr(c) for c in range(33, 127)):  # printable ASCII is its own byte-level symbol
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[])
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
    tok.save_pretrained(folder)
    return str(folder)


def test_hf_backend_tiny_local_clip_encodes_and_roundtrips(tmp_path):
    folder = make_tiny_clip(tmp_path / "tiny_clip")
    model = HFClip(folder).eval()
    assert os.environ.get("HF_HUB_OFFLINE") in ("1", "0")  # loading sets it unless the user did
    assert model.image_size == 32 and model.grid == 4
    x = torch.randn(3, 4, 32, 32)
    pooled, patches = model.encode_image(x)
    assert pooled.shape == (3, 16) and patches.shape == (3, 16, 4, 4)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3), atol=1e-5)
    texts = ["Axial view: a 40 mm left frontal lesion.", "Axial view: no focal abnormality."]
    t = model.encode_text(texts)
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])
    from trifuse.semantic.clip import ClipConfig

    model.config = ClipConfig(backend="hf", pretrained=folder)
    ckpt = save_clip(tmp_path / "clip.pt", model)
    again = load_clip(ckpt)
    assert isinstance(again, HFClip)
    with torch.no_grad():
        assert torch.allclose(again.encode_image(x)[1], patches, atol=1e-6)
        assert torch.allclose(again.encode_text(texts), t, atol=1e-6)


def test_hf_backend_missing_model_fails_clearly(tmp_path):
    with pytest.raises(OSError, match="without the network"):
        HFClip(tmp_path / "nothing_here")
