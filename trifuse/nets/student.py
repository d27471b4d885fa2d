"""The MRI-only student: SegResNet encoder–decoder + FiLM + semantic attention gates.

* Backbone: MONAI SegResNet (``backbone="segresnet"``, the default) or SegResNetDS with
  deep supervision (``"segresnet_ds"``: :class:`~trifuse.nets.backbone.SegResNetDSBackbone`;
  in training mode the logits are a list of ``dsdepth`` levels, full resolution first, as
  the teachers' backbone returns them; in eval mode one tensor).
* FiLM (γ, β from the text embedding and pooled priors) modulates the bottleneck and
  every decoder stage. It is injected with forward hooks on MONAI's own layers, so the
  backbone stays a stock (feature-tapped) SegResNet and its weights load unchanged.
* Semantic attention gates the TC and ET outputs:
  ``Y_R = Y_R_base ⊙ σ(conv([F_dec0, F_prior]))`` for R ∈ {TC, ET}; WT is not gated.
  With deep supervision only the full-resolution level is gated (the gates read ``dec0``);
  the lower levels are returned ungated.
* Each tier can be switched off (``use_film``, ``use_semantic_attention``) for ablations;
  with priors/text absent the conditioning is zeros (FiLM starts as the identity).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from trifuse import keys
from trifuse.nets.backbone import SegResNetBackbone, SegResNetDSBackbone, guard_cpu_bf16_convs
from trifuse.nets.film import FiLM
from trifuse.nets.semantic_attention import SemanticAttention


def pooled_prior(prior: torch.Tensor) -> torch.Tensor:
    """``(B, P, d, h, w)`` → ``(B, 2P)``: spatial mean and max of each prior channel."""
    flat = prior.float().flatten(2)
    return torch.cat([flat.mean(-1), flat.amax(-1)], dim=1)


#: student backbones by name
BACKBONES = ("segresnet", "segresnet_ds")


def full_resolution(logits):
    """The full-resolution logits of a network output: the first of a deep-supervision list, else itself."""
    return logits[0] if isinstance(logits, (list, tuple)) else logits


class StudentNet(nn.Module):
    """MRI in (4 channels), region logits out (WT, TC, ET), guided by semantic priors.

    Args:
        in_channels: MRI contrasts (4).
        out_channels: regions (3).
        init_filters, blocks_down: SegResNet configuration (see :class:`SegResNetBackbone`).
        backbone: ``"segresnet"`` (:class:`SegResNetBackbone`, MONAI SegResNet) or
            ``"segresnet_ds"`` (:class:`SegResNetDSBackbone`, MONAI SegResNetDS with deep
            supervision; instance norm, transposed-convolution upsampling).
        dsdepth: deep-supervision outputs of ``"segresnet_ds"`` (1 = none; ignored otherwise).
        text_dim: size of the pooled description embedding (CLIP embed_dim: 128).
        prior_channels: prior maps (3: WT, TC, ET).
        use_film: FiLM at the bottleneck and decoder stages.
        use_semantic_attention: gates on TC and ET.

    Shapes:
        forward(x ``(B, 4, D, H, W)``, prior ``(B, 3, d, h, w)`` or None, text ``(B, E)`` or None)
        → logits ``(B, 3, D, H, W)``; with ``return_features`` also the feature dict and
        ``{"gate_TC", "gate_ET"}`` attention maps. With ``"segresnet_ds"`` in training mode the
        logits are a list ``[(B, 3, D, H, W), (B, 3, D/2, H/2, W/2), …]`` of ``dsdepth`` levels
        (only the first gated).
    """

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        text_dim: int = 128,
        prior_channels: int = 3,
        use_film: bool = True,
        use_semantic_attention: bool = True,
        backbone: str = "segresnet",
        dsdepth: int = 3,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown student backbone {backbone!r}; choose from {list(BACKBONES)}")
        self.backbone_name = backbone
        common = dict(in_channels=in_channels, out_channels=out_channels, init_filters=init_filters, blocks_down=blocks_down)
        if backbone == "segresnet_ds":
            self.backbone = SegResNetDSBackbone(dsdepth=dsdepth, **common)
        else:
            self.backbone = SegResNetBackbone(**common)
        self.text_dim = text_dim
        self.prior_channels = prior_channels
        self.use_film = use_film
        self.use_semantic_attention = use_semantic_attention
        info = {fi.name: fi.channels for fi in self.backbone.feature_info}
        self.cond_dim = text_dim + 2 * prior_channels
        self._cond: Optional[torch.Tensor] = None
        if use_film:
            stages = self.film_stages()
            self.film = nn.ModuleDict({name: FiLM(self.cond_dim, info[name]) for name, _ in stages})
            for name, layer in stages:
                layer.register_forward_hook(self._film_hook(name))
        if use_semantic_attention:
            self.gates = nn.ModuleDict({r: SemanticAttention(info["dec0"], prior_channels) for r in ("TC", "ET")})
        guard_cpu_bf16_convs(self)  # the gates' 3³ convs too (the backbone guards its own)

    def film_stages(self) -> list[tuple[str, nn.Module]]:
        """``(tap name, layer)`` of the FiLM-modulated stages: the bottleneck, then the decoder stages
        (``dec{n-2}`` … ``dec0``); a hook on the layer modulates its output, which is the tap."""
        bb = self.backbone
        if isinstance(bb, SegResNetDSBackbone):
            # MONAI SegResNetDS: encoder.layers[i] = {blocks, downsample}, the last one's blocks
            # output is the bottleneck; up_layers[j] = {upsample, blocks, head}, blocks after the skip
            enc, dec = bb.encoder.layers[-1]["blocks"], [level["blocks"] for level in bb.up_layers]
        else:
            enc, dec = bb.down_layers[-1], list(bb.up_layers)
        return [("bottleneck", enc)] + [(f"dec{len(dec) - 1 - i}", layer) for i, layer in enumerate(dec)]

    def _film_hook(self, name: str):
        def hook(_module, _inputs, output):
            if self._cond is None:
                return output
            return self.film[name](output, self._cond)

        return hook

    def condition(self, batch_size: int, prior: Optional[torch.Tensor], text: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
        """The FiLM conditioning vector ``[text, mean(prior), max(prior)]`` (zeros where absent)."""
        t = text.to(ref.dtype) if text is not None else ref.new_zeros(batch_size, self.text_dim)
        p = pooled_prior(prior).to(ref.dtype) if prior is not None else ref.new_zeros(batch_size, 2 * self.prior_channels)
        return torch.cat([t, p], dim=1)

    def forward(self, x: torch.Tensor, prior: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None, return_features: bool = False):
        b = x.shape[0]
        self._cond = self.condition(b, prior, text, x) if self.use_film else None
        try:
            logits, feats = self.backbone(x, return_features=True)
        finally:
            self._cond = None
        gates = {}
        if self.use_semantic_attention:
            levels = list(logits) if isinstance(logits, (list, tuple)) else None  # deep supervision (training)
            full = full_resolution(logits)
            pr = prior if prior is not None else x.new_zeros((b, self.prior_channels) + tuple(s // 4 for s in x.shape[2:]))
            chans = list(full.float().unbind(1))  # the gated logits are fp32 (log-space gates)
            for r in ("TC", "ET"):
                i = keys.REGIONS.index(r)
                gated, gate = self.gates[r](chans[i].unsqueeze(1), feats["dec0"], pr)
                chans[i] = gated[:, 0]
                gates[f"gate_{r}"] = gate
            logits = torch.stack(chans, dim=1)
            if levels is not None:  # the lower levels stay ungated
                logits = [logits] + levels[1:]
        if return_features:
            return logits, feats, gates
        return logits
