import pytest
import torch
import torch.nn.functional as F

from trifuse.nets.film import FiLM
from trifuse.nets.fusion import CrossModalFusion, cosine_alignment
from trifuse.nets.semantic_attention import SemanticAttention, gated_logit
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
        assert f.grad.abs().sum() > 0
    assert fu.align_scale.grad.abs() > 0  # alignment really biases the attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fusion_alignment_in_fp32_under_autocast(dtype):
    torch.manual_seed(0)
    fu = CrossModalFusion([64, 64], width=64, num_heads=2, window=2)
    feats = [torch.randn(1, 64, 2, 2, 2) * 40 for _ in range(2)]  # Σ x² over 64 channels > fp16 max
    ref = fu(feats)
    with torch.autocast("cpu", dtype=dtype):
        fused, align, _ = fu(feats)
    assert align.dtype == torch.float32 and torch.isfinite(fused).all()
    torch.testing.assert_close(align, ref[1], atol=2e-2, rtol=0)


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
    # a small modulation survives bf16 autocast (1 + 1e-3 rounds to 1 in bf16)
    film.mlp[-1].bias.data[:3] = 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = film(x, c)
    assert y.dtype == x.dtype
    torch.testing.assert_close(y, 1.001 * x, atol=1e-6, rtol=1e-5)


def test_semantic_attention_starts_near_identity():
    gate = SemanticAttention(feat_channels=4)
    logit = torch.randn(1, 1, 8, 8, 8)
    out, g = gate(logit, torch.randn(1, 4, 8, 8, 8), torch.rand(1, 3, 2, 2, 2))
    assert torch.all(g > 0.97)
    assert torch.all(out <= logit + 1e-4)  # gating only lowers the probability


def test_gated_logit_is_exact_in_log_space():
    z = torch.tensor([-40.0, -30.0, -12.0, -1.0, 0.0, 3.0, 12.0, 30.0, 40.0])[:, None]
    g = torch.tensor([-30.0, -4.0, 0.0, 4.0, 30.0])[None, :]
    zz, gg = z.double(), g.double()
    p = torch.sigmoid(zz) * torch.sigmoid(gg)
    # float64 reference: log p − log(1 − p), with 1 − p written without cancellation
    ref = torch.log(p) - torch.log(torch.sigmoid(-zz) + torch.sigmoid(zz) * torch.sigmoid(-gg))
    out = gated_logit(z, g)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-5)
    assert torch.isfinite(gated_logit(torch.tensor(1e4), torch.tensor(1e4)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_confident_mistake_keeps_its_gradient(dtype):
    """The gated TC/ET logit of z = −12 with target 1: |∂BCE/∂z| ≥ 0.5 in every precision."""
    torch.manual_seed(0)
    gate = SemanticAttention(feat_channels=4)
    z = torch.full((1, 1, 4, 4, 4), -12.0, dtype=dtype, requires_grad=True)
    feats = torch.randn(1, 4, 4, 4, 4).to(dtype)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    with ctx:
        out, _ = gate(z, feats, torch.rand(1, 3, 2, 2, 2))
        loss = F.binary_cross_entropy_with_logits(out, torch.ones_like(out), reduction="sum")
    loss.backward()
    assert torch.isfinite(out).all() and float(out.max()) < -11.0  # not clipped at ±6.9
    assert torch.all(z.grad.float().abs() >= 0.5), z.grad.flatten()[:4]


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
    # the zero-initialised last layers are the ones that learn first
    assert s2.film["bottleneck"].mlp[-1].weight.grad.abs().sum() > 0
    assert s2.gates["ET"].net[-1].bias.grad.abs() > 0
    assert logits.dtype == torch.float32
    # works without priors/text (semantic tier off)
    assert StudentNet(init_filters=8)(x).shape == (1, 3, 16, 16, 16)


def test_gate_has_no_dead_parameter_and_loads_old_checkpoints():
    """The gate's first conv feeds an instance norm: a bias there has no effect, so it has none,
    and a state dict that still holds one loads with identical outputs."""
    torch.manual_seed(0)
    gate = SemanticAttention(8, 3)
    assert gate.net[0].bias is None
    old = {k: v.clone() for k, v in gate.state_dict().items()}
    old["net.0.bias"] = torch.randn(16) * 3  # what a checkpoint of the earlier layer held
    with torch.no_grad():
        gate.net[-1].weight.normal_()  # a trained gate: the output depends on the hidden layer
        old["net.3.weight"] = gate.net[-1].weight.clone()
    reloaded = SemanticAttention(8, 3)
    reloaded.load_state_dict(old)  # strict
    with_bias = torch.nn.Conv3d(11, 16, 3, padding=1)
    with torch.no_grad():
        with_bias.weight.copy_(old["net.0.weight"])
        with_bias.bias.copy_(old["net.0.bias"])
    logit, feats, prior = torch.randn(2, 1, 6, 6, 6), torch.randn(2, 8, 6, 6, 6), torch.rand(2, 3, 3, 3, 3)
    out, g = reloaded(logit, feats, prior)
    x = torch.cat([feats, torch.nn.functional.interpolate(prior, size=(6, 6, 6), mode="trilinear", align_corners=False)], 1)
    ref_g = torch.sigmoid(reloaded.net[1:](with_bias(x)))  # the earlier layer, bias included
    torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-5)
    assert float(g.std()) > 1e-3  # the comparison is not between constants
