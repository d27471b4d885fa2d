"""Teacher/student backbones: MONAI networks that also return multi-scale features.

Both classes keep their MONAI parent's parameters and ``state_dict`` unchanged (no new
modules), so MONAI checkpoints load into them and vice versa; with
``return_features=False`` the forward pass is the parent's.

Feature names (an ordered ``dict``), for ``n`` resolution levels:

* ``"enc0"`` … ``"enc{n-2}"``: encoder stage outputs, stride ``2**i`` (level ``i``);
* ``"bottleneck"``: deepest encoder stage, stride ``2**(n-1)``;
* ``"dec{n-2}"`` … ``"dec0"``: decoder stage outputs (after the skip merge), stride ``2**i``.

``feature_info`` lists ``(name, channels, stride)`` for every tap without a forward pass,
so fusion/projection layers can be built up front.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
from monai.networks.nets import DynUNet, SegResNet, SegResNetDS
from torch import nn

__all__ = ["FeatureInfo", "SegResNetBackbone", "SegResNetDSBackbone", "DynUNetBackbone", "build_backbone", "guard_cpu_bf16_convs"]


# --- a CPU bfloat16 workaround ------------------------------------------------------------
def _onednn_bf16_weight_grad_unsafe(x: torch.Tensor, weight: torch.Tensor, kernel_size: Sequence[int]) -> bool:
    """Whether this 3-D convolution would hit oneDNN's broken bfloat16 weight gradient.

    On CPU, PyTorch's oneDNN (mkldnn) bfloat16 ``Conv3d`` backward returns a garbage weight
    gradient (values up to ~1e36, inf or nan: it reads memory it never wrote, so the values
    depend on what was allocated before) when the input is thinner than the kernel along the
    depth axis (``1 < D < k``, e.g. ``D = 2`` with ``k = 3``; ``D = 2…4`` with ``k = 5``)
    and the layer has 16 or more input channels. The forward pass and the input gradient are
    right, so the loss looks fine. Found in torch 2.13.0+cpu (a 4-level SegResNet on 16³ patches
    has a 2³ bottleneck); fp32, fp16 and disabling mkldnn are correct. Every axis thinner
    than its kernel is checked (other CPUs may pick other oneDNN kernels); such layers are
    tiny, so computing them in fp32 costs nothing measurable.
    """
    if x.device.type != "cpu" or not (torch.is_grad_enabled() and weight.requires_grad):
        return False
    bf16 = torch.bfloat16 in (x.dtype, weight.dtype) or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    return bf16 and any(s < k for s, k in zip(x.shape[2:], kernel_size))


class _CPUBFloat16SafeConv3d(nn.Conv3d):
    """``nn.Conv3d`` that computes the layers oneDNN's bfloat16 weight gradient gets wrong in
    fp32 (then returns bfloat16, the dtype the layer would have had); see
    :func:`guard_cpu_bf16_convs`. Same parameters and ``state_dict`` as ``nn.Conv3d``."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _onednn_bf16_weight_grad_unsafe(input, weight, self.kernel_size):
            with torch.autocast("cpu", enabled=False):
                out = super()._conv_forward(input.float(), weight.float(), None if bias is None else bias.float())
            return out.to(torch.bfloat16)
        return super()._conv_forward(input, weight, bias)


def guard_cpu_bf16_convs(module: nn.Module) -> nn.Module:
    """Protect every ``nn.Conv3d`` of ``module`` from oneDNN's broken CPU bfloat16 weight
    gradient (:func:`_onednn_bf16_weight_grad_unsafe`), in place; returns ``module``.

    Only the class of the layers changes (to a subclass of ``nn.Conv3d``): parameters,
    ``state_dict`` and every other dtype/device path are untouched. Under ``bf16-mixed`` /
    ``bf16-true`` on CPU, a layer whose input is thinner than its kernel is computed in fp32.
    """
    for m in module.modules():
        if type(m) is nn.Conv3d:
            m.__class__ = _CPUBFloat16SafeConv3d
    return module


class FeatureInfo(NamedTuple):
    """One feature tap: its name, channel count and stride (per spatial axis) w.r.t. the input."""

    name: str
    channels: int
    stride: tuple[int, ...]


class SegResNetBackbone(SegResNet):
    """MONAI SegResNet (Myronenko, "3D MRI brain tumor segmentation using autoencoder
    regularization", BrainLes 2018) with feature taps.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (4 for the MRI teacher, 1 for US/CT).
        out_channels: output channels (3 regions: WT, TC, ET).
        init_filters: width of the first level; level ``i`` has ``init_filters * 2**i`` channels.
        blocks_down: residual blocks per encoder level (its length is the number of levels).
        blocks_up: residual blocks per decoder level; default one per level below the top.
        dropout_prob, act, norm, use_conv_final, upsample_mode: as in MONAI ``SegResNet``.

    Shapes, for input ``(B, in_channels, D, H, W)`` with D, H, W divisible by
    ``2**(len(blocks_down)-1)`` and the default config (``f = init_filters``, 4 levels):

    ========== ================================
    name       shape
    ========== ================================
    enc0       (B, f,  D,   H,   W)
    enc1       (B, 2f, D/2, H/2, W/2)
    enc2       (B, 4f, D/4, H/4, W/4)
    bottleneck (B, 8f, D/8, H/8, W/8)
    dec2       (B, 4f, D/4, H/4, W/4)
    dec1       (B, 2f, D/2, H/2, W/2)
    dec0       (B, f,  D,   H,   W)
    ========== ================================
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        init_filters: int = 16,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] | None = None,
        dropout_prob: float | None = None,
        act: tuple | str = ("RELU", {"inplace": True}),
        norm: tuple | str = ("GROUP", {"num_groups": 8}),
        use_conv_final: bool = True,
        upsample_mode: str = "nontrainable",
    ) -> None:
        blocks_down = tuple(blocks_down)
        blocks_up = tuple(blocks_up) if blocks_up is not None else (1,) * (len(blocks_down) - 1)
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            dropout_prob=dropout_prob,
            act=act,
            norm=norm,
            use_conv_final=use_conv_final,
            blocks_down=blocks_down,
            blocks_up=blocks_up,
            upsample_mode=upsample_mode,
        )
        self.out_channels = out_channels
        guard_cpu_bf16_convs(self)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """``(name, channels, stride)`` of every tap, in the order of the features dict."""
        n, f, d = len(self.blocks_down), self.init_filters, self.spatial_dims
        enc = [
            FeatureInfo("bottleneck" if i == n - 1 else f"enc{i}", f * 2**i, (2**i,) * d) for i in range(n)
        ]
        n_up = len(self.blocks_up)
        dec = [FeatureInfo(f"dec{n - 2 - j}", f * 2 ** (n_up - 1 - j), (2 ** (n - 2 - j),) * d) for j in range(n_up)]
        return enc + dec

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Run the network.

        Args:
            x: ``(B, in_channels, *spatial)``.
            return_features: also return the feature dict (see the class docstring).

        Returns:
            logits ``(B, out_channels, *spatial)``, or ``(logits, features)``.
        """
        x, down_x = self.encode(x)  # MONAI's encoder: down_x[i] is level i, x is the bottleneck
        if not return_features:
            down_x.reverse()
            return self.decode(x, down_x)
        n = len(down_x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, t in enumerate(down_x):
            feats["bottleneck" if i == n - 1 else f"enc{i}"] = t
        # MONAI's decode() without taps; the same ops in the same order, so logits are identical
        skips = down_x[::-1]
        for i, (up, upl) in enumerate(zip(self.up_samples, self.up_layers)):
            x = upl(up(x) + skips[i + 1])
            feats[f"dec{n - 2 - i}"] = x
        if self.use_conv_final:
            x = self.conv_final(x)
        return x, feats


class SegResNetDSBackbone(SegResNetDS):
    """MONAI SegResNetDS (Myronenko et al., "Auto3DSeg for brain tumor segmentation from 3D MRI
    in BraTS 2023 challenge", BrainLes 2023) with deep supervision and feature taps.

    In training mode with ``dsdepth > 1`` the network returns a list of ``dsdepth`` logits,
    full resolution first (level ``i`` at stride ``2**i``), which
    :class:`~trifuse.losses.RegionDiceBCELoss` weights with ``ds_weights`` (nnU-Net: 1/2^i,
    normalised); in eval mode it returns the full-resolution logits only. Parameters and
    ``state_dict`` are MONAI's.

    Args:
        spatial_dims, init_filters, in_channels, out_channels, act, norm, blocks_down,
            blocks_up, upsample_mode: as in MONAI ``SegResNetDS`` (defaults here: 16 filters,
            4 levels ``(1, 2, 2, 4)``, instance norm, ``dsdepth=3``).
        dsdepth: number of deep-supervision outputs (1 = none).

    Shapes: as :class:`SegResNetBackbone` (``enc0`` … ``bottleneck`` … ``dec0``); inputs must be
    divisible by ``2**(len(blocks_down) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        init_filters: int = 16,
        in_channels: int = 4,
        out_channels: int = 3,
        act: tuple | str = "relu",
        norm: tuple | str = ("INSTANCE", {"affine": True}),
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        blocks_up: Sequence[int] | None = None,
        dsdepth: int = 3,
        upsample_mode: str = "deconv",
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=out_channels,
            act=act,
            norm=norm,
            blocks_down=tuple(blocks_down),
            blocks_up=tuple(blocks_up) if blocks_up is not None else None,
            dsdepth=dsdepth,
            upsample_mode=upsample_mode,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_levels = len(tuple(blocks_down))
        guard_cpu_bf16_convs(self)

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """``(name, channels, stride)`` of every tap, in the order of the features dict."""
        n, f, d = self.n_levels, self.init_filters, self.spatial_dims
        enc = [FeatureInfo("bottleneck" if i == n - 1 else f"enc{i}", f * 2**i, (2**i,) * d) for i in range(n)]
        dec = [FeatureInfo(f"dec{i}", f * 2**i, (2**i,) * d) for i in range(n - 2, -1, -1)]
        return enc + dec

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits (a list of ``dsdepth`` levels, full resolution first, in training), or ``(logits, features)``."""
        if not return_features:
            return super().forward(x)
        if not self.is_valid_shape(x):
            raise ValueError(f"Input spatial dims {x.shape} must be divisible by {self.shape_factor()}")
        # MONAI's _forward with taps: the same ops in the same order, so logits are identical
        x_down = self.encoder(x)
        n = len(x_down)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, t in enumerate(x_down):
            feats["bottleneck" if i == n - 1 else f"enc{i}"] = t
        skips = x_down[::-1][1:]
        x = x_down[-1]
        outputs: list[torch.Tensor] = []
        for i, level in enumerate(self.up_layers):
            x = level["upsample"](x)
            x = x + skips[i]
            x = level["blocks"](x)
            feats[f"dec{n - 2 - i}"] = x
            if len(self.up_layers) - i <= self.dsdepth:
                outputs.append(level["head"](x))
        outputs.reverse()
        out = outputs[0] if (not self.training or len(outputs) == 1) else outputs
        return out, feats


def _nnunet_plan(n_levels: int, spatial_dims: int) -> tuple[list, list, list]:
    kernels = [[3] * spatial_dims for _ in range(n_levels)]
    strides = [[1] * spatial_dims] + [[2] * spatial_dims for _ in range(n_levels - 1)]
    return kernels, strides, strides[1:]


class DynUNetBackbone(DynUNet):
    """MONAI DynUNet (Isensee et al., nnU-Net, Nat. Methods 2021; Futrega et al., "Optimized
    U-Net for brain tumor segmentation", BrainLes 2021) with feature taps.

    Taps are forward hooks on the encoder blocks, the bottleneck and the decoder blocks of the
    unchanged DynUNet; they only record while ``return_features=True``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (3 regions).
        kernel_size: per-level kernels; default 3 everywhere.
        strides: per-level strides, first is the input block; default ``1, 2, 2, 2, 2``
            (5 levels: a 128³ patch has an 8³ bottleneck).
        upsample_kernel_size: default ``strides[1:]``.
        filters: per-level widths; default ``(32, 64, 128, 256, 320)`` (nnU-Net), cut to the
            number of levels.
        n_levels: number of levels when ``strides`` is not given.
        dropout, norm_name, act_name, deep_supervision, deep_supr_num, res_block, trans_bias:
            as in MONAI ``DynUNet`` (``res_block`` defaults to ``True`` here).

    Shapes for input ``(B, in_channels, D, H, W)`` with strides of 2 at each level below the
    top: ``enc{i}`` and ``dec{i}`` are ``(B, filters[i], D/2**i, H/2**i, W/2**i)``, the
    bottleneck ``(B, filters[-1], D/2**(n-1), …)``. In training mode with deep supervision the
    logits are DynUNet's stacked ``(B, 1 + deep_supr_num, out_channels, D, H, W)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 3,
        kernel_size: Sequence | None = None,
        strides: Sequence | None = None,
        upsample_kernel_size: Sequence | None = None,
        filters: Sequence[int] | None = None,
        n_levels: int = 5,
        dropout: float | None = None,
        norm_name: tuple | str = ("INSTANCE", {"affine": True}),
        act_name: tuple | str = ("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision: bool = False,
        deep_supr_num: int = 1,
        res_block: bool = True,
        trans_bias: bool = False,
    ) -> None:
        if strides is None:
            k, s, u = _nnunet_plan(n_levels, spatial_dims)
            strides = s
            kernel_size = kernel_size if kernel_size is not None else k
            upsample_kernel_size = upsample_kernel_size if upsample_kernel_size is not None else u
        strides = [list(s) if isinstance(s, Sequence) else [s] * spatial_dims for s in strides]
        if kernel_size is None:
            kernel_size = [[3] * spatial_dims for _ in strides]
        if upsample_kernel_size is None:
            upsample_kernel_size = strides[1:]
        if filters is None:
            filters = [min(32 * 2**i, 320) for i in range(len(strides))]
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=upsample_kernel_size,
            filters=list(filters),
            dropout=dropout,
            norm_name=norm_name,
            act_name=act_name,
            deep_supervision=deep_supervision,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
            trans_bias=trans_bias,
        )
        guard_cpu_bf16_convs(self)
        self._taps: OrderedDict[str, torch.Tensor] | None = None
        n = len(self.strides)
        # encoder: input block, downsamples; bottleneck; decoder: upsamples[j] is level n-2-j
        tapped: list[tuple[str, nn.Module]] = [("enc0", self.input_block)]
        tapped += [(f"enc{i + 1}", m) for i, m in enumerate(self.downsamples)]
        tapped.append(("bottleneck", self.bottleneck))
        tapped += [(f"dec{n - 2 - j}", m) for j, m in enumerate(self.upsamples)]
        for name, module in tapped:
            module.register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(_module, _inputs, output):
            if self._taps is not None:
                self._taps[name] = output

        return hook

    @property
    def feature_info(self) -> list[FeatureInfo]:
        """``(name, channels, stride)`` of every tap, in the order of the features dict."""
        cum = []
        acc = [1] * self.spatial_dims
        for s in self.strides:
            s = s if isinstance(s, Sequence) else [s] * self.spatial_dims
            acc = [a * int(v) for a, v in zip(acc, s)]
            cum.append(tuple(acc))
        n = len(self.strides)
        info = {}
        for i in range(n):
            name = "bottleneck" if i == n - 1 else f"enc{i}"
            info[name] = FeatureInfo(name, int(self.filters[i]), cum[i])
        for i in range(n - 2, -1, -1):
            info[f"dec{i}"] = FeatureInfo(f"dec{i}", int(self.filters[i]), cum[i])
        return [info[k] for k in _ordered(n)]

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Run the network.

        Args:
            x: ``(B, in_channels, *spatial)``.
            return_features: also return the feature dict (see the module docstring).

        Returns:
            logits, or ``(logits, features)``.
        """
        if not return_features:
            return super().forward(x)
        self._taps = OrderedDict()
        try:
            out = super().forward(x)
            taps = self._taps
        finally:
            self._taps = None
        n = len(self.strides)
        return out, OrderedDict((k, taps[k]) for k in _ordered(n))


def _ordered(n: int) -> list[str]:
    return [f"enc{i}" for i in range(n - 1)] + ["bottleneck"] + [f"dec{i}" for i in range(n - 2, -1, -1)]


def build_backbone(name: str = "segresnet", **kwargs) -> SegResNetBackbone | DynUNetBackbone:
    """Backbone by name (``"segresnet"``, ``"segresnetds"`` or ``"dynunet"``), for configs."""
    key = name.lower()
    if key == "segresnet":
        return SegResNetBackbone(**kwargs)
    if key in ("segresnetds", "segresnet_ds"):
        return SegResNetDSBackbone(**kwargs)
    if key == "dynunet":
        return DynUNetBackbone(**kwargs)
    raise ValueError(f"unknown backbone {name!r}; choose segresnet, segresnetds or dynunet")
