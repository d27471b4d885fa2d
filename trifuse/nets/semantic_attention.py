"""Semantic attention gates for ET and TC (the method's ``Y_ET = Y_ET_base ⊙ σ(conv([F_dec, F_prior]))``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SemanticAttention(nn.Module):
    """Gate a region's probability by a map computed from decoder features and priors.

    The gate multiplies the *probability*: ``p' = σ(z) · σ(g)``, returned as the logit of
    ``p'`` so losses keep working on logits. The gate's bias starts high (σ ≈ 0.98), so an
    untrained gate barely changes the base prediction.

    Args:
        feat_channels: channels of the decoder feature map ``F_dec``.
        prior_channels: channels of the prior map (3: WT, TC, ET).
        hidden: width of the gate's hidden conv.
        init_bias: initial gate logit.

    Shapes:
        logit ``(B, 1, D, H, W)``, feats ``(B, C, D, H, W)``, prior ``(B, P, d, h, w)`` (resized
        to D, H, W) → ``(gated logit (B, 1, D, H, W), gate (B, 1, D, H, W) in (0, 1))``.
    """

    def __init__(self, feat_channels: int, prior_channels: int = 3, hidden: int = 16, init_bias: float = 4.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(feat_channels + prior_channels, hidden, 3, padding=1),
            nn.InstanceNorm3d(hidden, affine=True),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(hidden, 1, 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, init_bias)

    def forward(self, logit: torch.Tensor, feats: torch.Tensor, prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prior = F.interpolate(prior.to(feats.dtype), size=feats.shape[2:], mode="trilinear", align_corners=False)
        gate = torch.sigmoid(self.net(torch.cat([feats, prior], dim=1)))
        p = torch.sigmoid(logit) * gate
        eps = 1e-6 if p.dtype == torch.float32 else 1e-3
        return torch.logit(p.clamp(eps, 1 - eps)), gate
