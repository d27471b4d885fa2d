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


def binary_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Element-wise ``KL(Bern(p) ‖ Bern(q))`` in nats."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)
    return p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())


def response_kd_loss(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], weights: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """``T² Σ_m w_m · KL(σ(z_m/T) ‖ σ(z_s/T))``, averaged over voxels, summed over regions' weights.

    Args:
        student_logits: ``(B, R, *spatial)``.
        teacher_logits: M tensors like ``student_logits`` (teachers are targets: detached).
        weights: ``(M,)``, ``(M, R)`` or ``(B, M, R)`` teacher weights (rows sum to 1 over M).
        temperature: T.

    Returns:
        scalar loss; exactly 0 when every teacher equals the student.
    """
    t = temperature
    q = torch.sigmoid(student_logits / t)
    m = len(teacher_logits)
    w = weights
    if w.ndim == 1:
        w = w[:, None].expand(m, student_logits.shape[1])
    if w.ndim == 2:
        w = w[None].expand(student_logits.shape[0], m, student_logits.shape[1])
    total = student_logits.new_zeros(())
    for i, z in enumerate(teacher_logits):
        p = torch.sigmoid(z.detach().to(student_logits.dtype) / t)
        kl = binary_kl(p, q).flatten(2).mean(-1)  # (B, R)
        total = total + (w[:, i] * kl).sum(-1).mean()
    return t * t * total / student_logits.shape[1]


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
    score = teacher_logits[0].new_zeros(b, m, r)
    if target is not None:
        tgt = target.float().flatten(2)
        for i, z in enumerate(teacher_logits):
            p = torch.sigmoid(z.detach().float()).flatten(2)
            dice = (2 * (p * tgt).sum(-1) + eps) / (p.sum(-1) + tgt.sum(-1) + eps)
            score[:, i] += dice.to(score.dtype)
    if alignment is not None:
        a = alignment.detach().flatten(3).mean(-1)  # (B, M, M)
        off = (a.sum(-1) - a.diagonal(dim1=1, dim2=2)) / max(m - 1, 1)
        score = score + off[:, :, None].to(score.dtype)
    return torch.softmax(score / tau, dim=1)


def feature_cosine_loss(student_proj: torch.Tensor, fused: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``mean(1 − cos(P(F_s), F_fused))`` over locations; the fused target is detached.

    Shapes: both ``(B, C, *spatial)``; the student map is resized to the target's grid.
    """
    if student_proj.shape[2:] != fused.shape[2:]:
        student_proj = F.interpolate(student_proj, size=fused.shape[2:], mode="trilinear", align_corners=False)
    cos = F.cosine_similarity(student_proj, fused.detach().to(student_proj.dtype), dim=1, eps=eps)
    return (1 - cos).mean()


def semantic_prior_loss(attention: torch.Tensor, prior: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``mean_r (1 − cos(vec(A_r), vec(P_r)))``: student attention vs. semantic priors.

    Args:
        attention: ``(B, R, D, H, W)`` maps in [0, 1] (region probabilities / gates).
        prior: ``(B, R, d, h, w)`` priors; the attention is average-pooled to their grid.
    """
    if attention.shape[2:] != prior.shape[2:]:
        attention = F.adaptive_avg_pool3d(attention, prior.shape[2:])
    cos = F.cosine_similarity(attention.flatten(2), prior.detach().to(attention.dtype).flatten(2), dim=-1, eps=eps)
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
