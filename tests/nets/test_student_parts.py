import torch

from trifuse.nets.film import FiLM
from trifuse.nets.fusion import CrossModalFusion, cosine_alignment
from trifuse.nets.semantic_attention import SemanticAttention
from trifuse.nets.student import StudentNet


def test_fusion_alignment_is_cosine_of_projections_and_grads_reach_inputs():
    torch.manual_seed(0)
    fu = CrossModalFusion([8, 6, 5], width=16, num_heads=2, window=2)
    feats = [torch.randn(2, c, 3, 4, 5, requires_grad=True) for c in (8, 6, 5)]
    fused, align, proj = fu(feats)
    assert fused.shape == (2, 16, 3, 4, 5) and align.shape == (2, 3, 3, 3, 4, 5)
    # A_ij equals the channel cosine of the projected features, at every location
    for i in range(3):
        for j in range(3):
            ref = torch.nn.functional.cosine_similarity(proj[:, i], proj[:, j], dim=1)
            torch.testing.assert_close(align[:, i, j], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(align[:, 0, 0], torch.ones_like(align[:, 0, 0]), atol=1e-5, rtol=0)
    fused.square().mean().backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    assert fu.align_scale.grad is not None  # alignment really biases the attention


def test_cosine_alignment_hand_case():
    a = torch.tensor([1.0, 0.0])[None, None, :, None]
    b = torch.tensor([1.0, 1.0])[None, None, :, None]
    A = cosine_alignment(torch.cat([a, b], dim=1))
    torch.testing.assert_close(A[0, 0, 1, 0], torch.tensor(2**-0.5))


def test_film_starts_as_identity_and_learns():
    film = FiLM(cond_dim=5, channels=3)
    x = torch.randn(2, 3, 4, 4, 4)
    c = torch.randn(2, 5)
    torch.testing.assert_close(film(x, c), x)
    film.mlp[-1].bias.data[:3] = 1.0  # Δγ = 1 → γ = 2
    torch.testing.assert_close(film(x, c), 2 * x)


def test_semantic_attention_starts_near_identity():
    gate = SemanticAttention(feat_channels=4)
    logit = torch.randn(1, 1, 8, 8, 8)
    out, g = gate(logit, torch.randn(1, 4, 8, 8, 8), torch.rand(1, 3, 2, 2, 2))
    assert torch.all(g > 0.97)
    assert torch.all(out <= logit + 1e-4)  # gating only lowers the probability


def test_student_identity_film_matches_plain_backbone_and_grads():
    torch.manual_seed(0)
    s = StudentNet(init_filters=8, use_semantic_attention=False)
    x = torch.randn(1, 4, 16, 16, 16)
    prior, text = torch.rand(1, 3, 4, 4, 4), torch.randn(1, 128)
    # FiLM starts as the identity: the student equals its backbone
    torch.testing.assert_close(s(x, prior, text), s.backbone(x))
    s2 = StudentNet(init_filters=8)
    logits, feats, gates = s2(x, prior, text, return_features=True)
    assert logits.shape == (1, 3, 16, 16, 16) and set(gates) == {"gate_TC", "gate_ET"}
    logits.mean().backward()
    assert s2.film["bottleneck"].mlp[-1].weight.grad is not None
    assert s2.gates["ET"].net[-1].bias.grad is not None
    # works without priors/text (semantic tier off)
    assert StudentNet(init_filters=8)(x).shape == (1, 3, 16, 16, 16)
