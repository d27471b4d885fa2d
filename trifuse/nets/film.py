"""Feature-wise linear modulation (Perez et al., "FiLM", AAAI 2018)."""
from __future__ import annotations

import torch
from torch import nn


class FiLM(nn.Module):
    """``y = γ(c) ⊙ x + β(c)`` with ``γ = 1 + Δγ``; starts as the identity.

    Args:
        cond_dim: conditioning vector size (text embedding + pooled priors).
        channels: channels of the modulated feature map.
        hidden: MLP width.
        identity_init: zero the last layer so ``γ = 1, β = 0`` at initialisation.

    Shapes:
        x ``(B, C, *spatial)``, cond ``(B, cond_dim)`` → ``(B, C, *spatial)`` in x's dtype.

    Numerics: γ and β come from an fp32 MLP and the modulation is computed in fp32 (in bf16
    ``1 + Δγ`` would round to 1 for |Δγ| < 4e-3, i.e. for a freshly initialised FiLM), then
    cast back to x's dtype.
    """

    def __init__(self, cond_dim: int, channels: int, hidden: int = 128, identity_init: bool = True):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels))
        if identity_init:
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            dg, beta = self.mlp(cond.float()).chunk(2, dim=-1)
            shape = (x.shape[0], self.channels) + (1,) * (x.ndim - 2)
            return ((1 + dg).view(shape) * x.float() + beta.view(shape)).to(x.dtype)
