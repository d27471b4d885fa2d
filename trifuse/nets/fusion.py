"""Cross-modal fusion of teacher features: cosine alignment + a transformer block.

For teacher bottleneck features ``F_m`` (m ∈ {mri, us, ct}):

1. project each to a common width ``W`` (1×1×1 conv): ``P_m = proj_m(F_m)``;
2. alignment ``A_ij = cos(P_i, P_j)`` per location (channel-wise cosine);
3. attention across the modality tokens of each location, with ``α·A_ij`` added to the
   attention logits (aligned modalities attend to each other more);
4. windowed self-attention over space (non-overlapping ``window³`` blocks, Swin-style
   without shifting) on the modality-pooled tokens;
5. ``F_fused`` ``(B, W, d, h, w)``.

The block is pure torch (``nn.MultiheadAttention``); MONAI's SwinUNETR blocks assume
their own patch-embedding pipeline, so the few lines here are simpler than adapting them.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def cosine_alignment(feats: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-location cosine similarity between modalities.

    Args:
        feats: ``(B, M, C, *spatial)`` projected features.

    Returns:
        ``(B, M, M, *spatial)`` fp32 with ``A[:, i, j] = cos(feats[:, i], feats[:, j])`` over
        channels; computed in fp32 whatever the autocast dtype (a half-precision squared norm
        over 64 channels overflows fp16 for features of magnitude ~30).
    """
    with torch.autocast(device_type=feats.device.type, enabled=False):
        unit = F.normalize(feats.float(), dim=2, eps=eps)
        return torch.einsum("bic...,bjc...->bij...", unit, unit)


def _windows(x: torch.Tensor, w: int) -> tuple[torch.Tensor, tuple]:
    """``(B, C, D, H, W)`` → ``(B·nW, w³, C)`` windows (zero-padded to multiples of ``w``)."""
    b, c, d, h, ww = x.shape
    pad = [(-s) % w for s in (d, h, ww)]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
    D, H, W = x.shape[2:]
    x = x.view(b, c, D // w, w, H // w, w, W // w, w).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(-1, w**3, c), (b, c, d, h, ww, D, H, W)


def _unwindows(t: torch.Tensor, w: int, geom: tuple) -> torch.Tensor:
    b, c, d, h, ww, D, H, W = geom
    x = t.view(b, D // w, H // w, W // w, w, w, w, c).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, D, H, W)
    return x[:, :, :d, :h, :ww]


class CrossModalFusion(nn.Module):
    """Fuse M teachers' features into one map, guided by their cosine alignment.

    Args:
        in_channels: channels of each teacher's feature map (one entry per modality).
        width: common projection width ``W``.
        num_heads: attention heads (``width`` must be divisible by it).
        window: spatial window edge (voxels) for the windowed self-attention.
        dropout: attention dropout.

    Shapes:
        forward(feats: list of M ``(B, C_m, d, h, w)``) → ``(fused (B, W, d, h, w),
        alignment (B, M, M, d, h, w), projected (B, M, W, d, h, w))``.
    """

    def __init__(self, in_channels: Sequence[int], width: int = 64, num_heads: int = 4, window: int = 4, dropout: float = 0.0):
        super().__init__()
        self.n_modalities = len(in_channels)
        self.width = width
        self.window = window
        self.proj = nn.ModuleList(nn.Conv3d(c, width, kernel_size=1) for c in in_channels)
        self.modality_embed = nn.Parameter(torch.zeros(self.n_modalities, width))
        self.align_scale = nn.Parameter(torch.tensor(1.0))  # α: how much alignment biases attention
        self.norm1 = nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.spatial = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.num_heads = num_heads

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(feats) != self.n_modalities:
            raise ValueError(f"expected {self.n_modalities} feature maps, got {len(feats)}")
        proj = torch.stack([p(f) for p, f in zip(self.proj, feats)], dim=1)  # (B, M, W, d, h, w)
        align = cosine_alignment(proj)  # (B, M, M, d, h, w)
        b, m, w, d, h, ww = proj.shape
        n = d * h * ww
        # modality tokens per location: (B·n, M, W)
        tok = proj.permute(0, 3, 4, 5, 1, 2).reshape(b * n, m, w) + self.modality_embed
        bias = (self.align_scale * align).permute(0, 3, 4, 5, 1, 2).reshape(b * n, m, m)
        bias = bias.repeat_interleave(self.num_heads, dim=0)  # (B·n·heads, M, M) float mask = additive bias
        q = self.norm1(tok)
        tok = tok + self.cross(q, q, q, attn_mask=bias, need_weights=False)[0]
        pooled = tok.mean(dim=1).view(b, d, h, ww, w).permute(0, 4, 1, 2, 3)  # (B, W, d, h, w)
        # windowed self-attention over space
        win, geom = _windows(pooled, self.window)
        q = self.norm2(win)
        win = win + self.spatial(q, q, q, need_weights=False)[0]
        win = win + self.mlp(self.norm3(win))
        fused = _unwindows(win, self.window, geom)
        return fused, align, proj
