"""Distillation losses of the feature tier (functions first; thin modules below).

* ``L_resp = T² Σ_m w_m · KL(σ(z_m/T) ‖ σ(z_s/T))`` per region (Hinton et al., "Distilling
  the knowledge in a neural network", 2015, with the binary (sigmoid) KL of region-based
  segmentation);
* ``L_feat = 1 − cos(P(F_student), F_fused)`` per location (feature distillation in the
  spirit of FitNets, Romero et al. 2015, with a cosine instead of an L2 hint);
* ``L_sem``: the student's region attention maps against the semantic priors (1 − cosine
  of the flattened maps, per region);
* :class:`WarmupSchedule`: each λ ramps from 0 to its value.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def fp32(device_type: str):
    """Context that switches autocast off, so what runs inside computes in the dtype it is given.

    Losses and gates call it and cast their inputs with ``.float()``: under ``16-mixed`` or
    ``bf16-mixed`` they still compute in fp32 (DESIGN.md, "Numerics").
    """
    return torch.autocast(device_type=device_type, enabled=False)


def binary_kl_with_logits(teacher_logit: torch.Tensor, student_logit: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(Bern(σ(a)) ‖ Bern(σ(b)))`` in nats, from the logits ``a`` (teacher), ``b`` (student).

    In log space and fp32, without probability clamps: with ``p = σ(a)`` and ``softplus(x) = log(1 + eˣ)``,

    ``KL = BCE_with_logits(b, p) − BCE_with_logits(a, p) = (1 − p)(b − a) + softplus(−b) − softplus(−a)``

    (the cross-entropy to the student minus the teacher's entropy, written so that it is exactly
    0 for ``a = b`` and has no cancellation of two large terms). Finite for every finite pair of
    logits in any autocast dtype; ``∂KL/∂b = σ(b) − σ(a)``.

    Shapes: any, broadcastable; returns fp32.
    """
    with fp32(student_logit.device.type):
        a = teacher_logit.float()
        b = student_logit.float()
        p = torch.sigmoid(a)
        return (1 - p) * (b - a) + F.softplus(-b) - F.softplus(-a)


def binary_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Element-wise ``KL(Bern(p) ‖ Bern(q))`` of probabilities in (0, 1) (reference form, fp32).

    Only for probabilities that are already known (e.g. tests); losses use
    :func:`binary_kl_with_logits`, which never forms a probability it has to clamp.
    """
    return binary_kl_with_logits(torch.logit(p.double()), torch.logit(q.double())).to(torch.float32)


def response_kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T² Σ_m w_m · KL(σ(z_m/T) ‖ σ(z_s/T))``, averaged over voxels, summed over regions' weights.

    Computed in fp32 from logits (:func:`binary_kl_with_logits`) whatever the autocast dtype.

    Args:
        student_logits: ``(B, R, *spatial)``.
        teacher_logits: M tensors like ``student_logits`` (teachers are targets: detached).
        weights: ``(M,)``, ``(M, R)`` or ``(B, M, R)`` teacher weights (rows sum to 1 over M).
        temperature: T.

    Returns:
        fp32 scalar loss; exactly 0 when every teacher equals the student.
    """
    t = float(temperature)
    m = len(teacher_logits)
    b, r = student_logits.shape[:2]
    with fp32(student_logits.device.type):
        zs = student_logits.float() / t
        w = weights.detach().float()
        if w.ndim == 1:
            w = w[:, None].expand(m, r)
        if w.ndim == 2:
            w = w[None].expand(b, m, r)
        total = zs.new_zeros(())
        for i, z in enumerate(teacher_logits):
            kl = binary_kl_with_logits(z.detach().float() / t, zs).flatten(2).mean(-1)  # (B, R)
            total = total + (w[:, i] * kl).sum(-1).mean()
        return t * t * total / r


def teacher_weights(
    teacher_logits: Sequence[torch.Tensor], target: torch.Tensor | None = None, alignment: torch.Tensor | None = None, tau: float = 0.1, eps: float = 1e-5
) -> torch.Tensor:
    """Collaborative teacher weights ``(B, M, R)``: softmax over teachers of quality + alignment.

    Quality is each teacher's soft Dice against the ground truth on this batch (per region);
    alignment is each teacher's mean cosine agreement with the others (from the fusion
    block, ``(B, M, M, ...)``). A teacher that is both accurate and consistent with the
    others gets more weight; with neither signal the weights are uniform.
    """
    m = len(teacher_logits)
    b, r = teacher_logits[0].shape[:2]
    dev = teacher_logits[0].device
    with fp32(dev.type):  # soft Dice sums and the softmax in fp32
        score = torch.zeros(b, m, r, device=dev, dtype=torch.float32)
        if target is not None:
            tgt = target.float().flatten(2)
            for i, z in enumerate(teacher_logits):
                p = torch.sigmoid(z.detach().float()).flatten(2)
                score[:, i] += (2 * (p * tgt).sum(-1) + eps) / (p.sum(-1) + tgt.sum(-1) + eps)
        if alignment is not None:
            a = alignment.detach().float().flatten(3).mean(-1)  # (B, M, M)
            off = (a.sum(-1) - a.diagonal(dim1=1, dim2=2)) / max(m - 1, 1)
            score = score + off[:, :, None]
        return torch.softmax(score / tau, dim=1)


def feature_cosine_loss(student_proj: torch.Tensor, fused: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``mean(1 − cos(P(F_s), F_fused))`` over locations; the fused target is detached.

    Shapes: both ``(B, C, *spatial)``; the student map is resized to the target's grid.
    Computed in fp32 (a half-precision squared norm over 64+ channels overflows fp16).
    """
    with fp32(student_proj.device.type):
        s = student_proj.float()
        if s.shape[2:] != fused.shape[2:]:
            s = F.interpolate(s, size=fused.shape[2:], mode="trilinear", align_corners=False)
        cos = F.cosine_similarity(s, fused.detach().float(), dim=1, eps=eps)
        return (1 - cos).mean()


def semantic_prior_loss(attention: torch.Tensor, prior: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``mean_r (1 − cos(vec(A_r), vec(P_r)))``: student attention vs. semantic priors.

    Args:
        attention: ``(B, R, D, H, W)`` maps in [0, 1] (region probabilities / gates).
        prior: ``(B, R, d, h, w)`` priors; the attention is average-pooled to their grid.

    Computed in fp32 whatever the autocast dtype.
    """
    with fp32(attention.device.type):
        att = attention.float()
        if att.shape[2:] != prior.shape[2:]:
            att = F.adaptive_avg_pool3d(att, prior.shape[2:])
        cos = F.cosine_similarity(att.flatten(2), prior.detach().float().flatten(2), dim=-1, eps=eps)
        return (1 - cos).mean()


class WarmupSchedule:
    """``λ(step) = value · ramp((step − start) / warmup)``; ramp linear or cosine, 0 before ``start``.

    Args:
        value: final λ.
        warmup_steps: ramp length (0 → constant from ``start``).
        start_step: first step with a non-zero λ.
        shape: ``"linear"`` or ``"cosine"``.
    """

    def __init__(self, value: float = 1.0, warmup_steps: int = 0, start_step: int = 0, shape: str = "linear"):
        if shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be linear or cosine, got {shape!r}")
        self.value, self.warmup_steps, self.start_step, self.shape = float(value), int(warmup_steps), int(start_step), shape

    def __call__(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.warmup_steps <= 0:
            return self.value
        x = min(1.0, (step - self.start_step) / self.warmup_steps)
        if self.shape == "cosine":
            x = 0.5 * (1 - math.cos(math.pi * x))
        return self.value * x
