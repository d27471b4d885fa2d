"""Semantic attention gates for ET and TC (the method's ``Y_ET = Y_ET_base ⊙ σ(conv([F_dec, F_prior]))``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gated_logit(logit: torch.Tensor, gate_logit: torch.Tensor) -> torch.Tensor:
    """The logit of ``σ(z) · σ(g)``, in log space and fp32, without probability clamps.

    ``log p' = logσ(z) + logσ(g)`` and ``log(1 − p') = log(σ(−z) + σ(z)·σ(−g))
    = logaddexp(logσ(−z), logσ(z) + logσ(−g))``, so ``logit(p') = log p' − log(1 − p')`` is
    finite for every finite ``z, g`` and keeps its gradient where the probability saturates
    (a confident mistake ``z = −12`` with target 1 gets ``∂BCE/∂z ≈ −1``). Autocast is off
    inside: the result is fp32 whatever the autocast dtype.

    Shapes: ``logit`` and ``gate_logit`` broadcastable; returns their broadcast shape in fp32.
    """
    with torch.autocast(device_type=logit.device.type, enabled=False):
        z, g = logit.float(), gate_logit.float()
        log_p = F.logsigmoid(z) + F.logsigmoid(g)
        log_not_p = torch.logaddexp(F.logsigmoid(-z), F.logsigmoid(z) + F.logsigmoid(-g))
        return log_p - log_not_p


class SemanticAttention(nn.Module):
    """Gate a region's probability by a map computed from decoder features and priors.

    The gate multiplies the *probability*: ``p' = σ(z) · σ(g)``, returned as the logit of
    ``p'`` (in log space, :func:`gated_logit`) so losses keep working on logits. The gate's
    bias starts high (σ ≈ 0.98), so an untrained gate barely changes the base prediction.

    Args:
        feat_channels: channels of the decoder feature map ``F_dec``.
        prior_channels: channels of the prior map (3: WT, TC, ET).
        hidden: width of the gate's hidden conv.
        init_bias: initial gate logit.

    Shapes:
        logit ``(B, 1, D, H, W)``, feats ``(B, C, D, H, W)``, prior ``(B, P, d, h, w)`` (resized
        to D, H, W) → ``(gated logit (B, 1, D, H, W), gate (B, 1, D, H, W) in (0, 1))``, both fp32.
    """

    def __init__(self, feat_channels: int, prior_channels: int = 3, hidden: int = 16, init_bias: float = 4.0):
        super().__init__()
        self.net = nn.Sequential(
            # no bias: the instance norm subtracts each channel's mean, so a bias here would be a
            # parameter without effect (its gradient is exactly 0) — the norm's affine shift is the bias
            nn.Conv3d(feat_channels + prior_channels, hidden, 3, padding=1, bias=False),
            nn.InstanceNorm3d(hidden, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(hidden, 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, init_bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the first conv lost its bias: dropping it is exact (see __init__)
        state_dict.pop(prefix + "net.0.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, logit: torch.Tensor, feats: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prior = F.interpolate(prior.to(feats.dtype), size=feats.shape[2:], mode="trilinear", align_corners=False)
        g = self.net(torch.cat([feats, prior], dim=1)).float()  # the convs may run in half precision
        return gated_logit(logit, g), torch.sigmoid(g)
