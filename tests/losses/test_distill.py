import math

import torch

from trifuse.losses.distill import (
    WarmupSchedule,
    binary_kl,
    binary_kl_with_logits,
    feature_cosine_loss,
    response_kd_loss,
    semantic_prior_loss,
    teacher_weights,
)


def test_response_loss_zero_when_student_equals_teacher():
    z = torch.randn(2, 3, 4, 4, 4)
    w = torch.full((3,), 1 / 3)
    assert response_kd_loss(z, [z, z, z], w, temperature=2.0).abs() < 1e-6
    assert response_kd_loss(z, [z + 1, z, z], w, temperature=2.0) > 0


def test_response_loss_hand_value():
    # one voxel, one region: p = σ(2/T), q = σ(0) = 0.5, T = 2
    zs = torch.zeros(1, 1, 1, 1, 1)
    zt = torch.full((1, 1, 1, 1, 1), 2.0)
    p = 1 / (1 + math.exp(-1.0))
    kl = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    val = response_kd_loss(zs, [zt], torch.ones(1), temperature=2.0)
    assert abs(float(val) - 4 * kl) < 1e-5
    assert abs(float(binary_kl(torch.tensor(p), torch.tensor(0.5))) - kl) < 1e-6


def test_binary_kl_with_logits_matches_float64_and_grad():
    a = torch.tensor([-30.0, -15.0, -2.0, 0.0, 2.0, 15.0, 30.0])[:, None]
    b = torch.tensor([-30.0, -8.0, 0.0, 8.0, 30.0])[None, :]
    p, q = torch.sigmoid(a.double()), torch.sigmoid(b.double())
    ref = p * (torch.log(p) - torch.log(q)) + (1 - p) * (torch.log1p(-p) - torch.log1p(-q))
    bb = b.expand(7, 5).clone().requires_grad_()
    kl = binary_kl_with_logits(a, bb)
    torch.testing.assert_close(kl.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.all(binary_kl_with_logits(a, a) == 0)
    kl.sum().backward()  # ∂KL/∂b = σ(b) − σ(a)
    torch.testing.assert_close(bb.grad.double(), (q - p).expand(7, 5), atol=1e-6, rtol=0)


def test_teacher_weights_prefer_accurate_teacher():
    target = torch.zeros(1, 3, 4, 4, 4)
    target[..., :2] = 1
    good = target * 20 - 10
    bad = -good
    w = teacher_weights([good, bad], target)
    assert w.shape == (1, 2, 3) and torch.allclose(w.sum(1), torch.ones(1, 3))
    assert torch.all(w[:, 0] > 0.9)
    uniform = teacher_weights([good, bad])
    torch.testing.assert_close(uniform, torch.full_like(uniform, 0.5))


def test_feature_and_semantic_losses():
    f = torch.randn(2, 8, 4, 4, 4)
    assert feature_cosine_loss(f, f) < 1e-6
    assert abs(float(feature_cosine_loss(f, -f)) - 2.0) < 1e-5
    prior = torch.rand(2, 3, 2, 2, 2)
    att = prior.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)
    assert semantic_prior_loss(att, prior) < 1e-5


def test_warmup_schedule():
    s = WarmupSchedule(0.5, warmup_steps=10, start_step=5)
    assert s(0) == 0 and s(5) == 0 and abs(s(10) - 0.25) < 1e-9 and s(100) == 0.5
    c = WarmupSchedule(1.0, warmup_steps=4, shape="cosine")
    assert abs(c(2) - 0.5) < 1e-9 and c(4) == 1.0
