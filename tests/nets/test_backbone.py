"""Backbones with feature taps: documented shapes, identical logits to plain MONAI networks."""
from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DynUNet, SegResNet

from trifuse.nets import DynUNetBackbone, SegResNetBackbone, build_backbone

X = (1, 4, 32, 32, 16)  # (B, C, D, H, W); anisotropic shape to catch axis mix-ups


def test_segresnet_features_have_documented_shapes():
    torch.manual_seed(0)
    f = 8
    net = SegResNetBackbone(in_channels=4, out_channels=3, init_filters=f).eval()
    x = torch.randn(*X)
    with torch.no_grad():
        logits, feats = net(x, return_features=True)
    B, _, D, H, W = X
    expected = {
        "enc0": (B, f, D, H, W),
        "enc1": (B, 2 * f, D // 2, H // 2, W // 2),
        "enc2": (B, 4 * f, D // 4, H // 4, W // 4),
        "bottleneck": (B, 8 * f, D // 8, H // 8, W // 8),
        "dec2": (B, 4 * f, D // 4, H // 4, W // 4),
        "dec1": (B, 2 * f, D // 2, H // 2, W // 2),
        "dec0": (B, f, D, H, W),
    }
    assert logits.shape == (B, 3, D, H, W)
    assert list(feats) == list(expected)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    # feature_info agrees with the tensors, without a forward pass
    for info in net.feature_info:
        t = feats[info.name]
        assert t.shape[1] == info.channels
        assert tuple(s // info.stride[i] for i, s in enumerate((D, H, W))) == tuple(t.shape[2:])


def test_segresnet_logits_equal_plain_monai():
    torch.manual_seed(1)
    cfg = dict(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
    plain = SegResNet(**cfg).eval()
    ours = SegResNetBackbone(**cfg).eval()
    ours.load_state_dict(plain.state_dict())  # same parameter names: strict load works both ways
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(*X)
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(ours(x), ref)
        logits, _ = ours(x, return_features=True)
        assert torch.equal(logits, ref)


def test_segresnet_features_carry_gradients():
    net = SegResNetBackbone(in_channels=1, init_filters=8)
    logits, feats = net(torch.randn(2, 1, 16, 16, 16), return_features=True)
    feats["bottleneck"].pow(2).mean().backward()  # a loss on the tap alone reaches the first layer
    g = net.convInit.conv.weight.grad
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0
    assert net.conv_final[-1].conv.weight.grad is None if hasattr(net.conv_final[-1], "conv") else True  # the head took no part


def test_dynunet_features_and_logits_equal_plain_monai():
    torch.manual_seed(2)
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]]
    kernels = [[3, 3, 3]] * 4
    filters = [8, 16, 32, 48]
    plain = DynUNet(3, 4, 3, kernels, strides, strides[1:], filters=filters, res_block=True).eval()
    ours = DynUNetBackbone(3, 4, 3, kernel_size=kernels, strides=strides, filters=filters, res_block=True).eval()
    ours.load_state_dict(plain.state_dict())
    x = torch.randn(*X)
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(ours(x), ref)
        logits, feats = ours(x, return_features=True)
    assert torch.equal(logits, ref)
    B, _, D, H, W = X
    expected = {
        "enc0": (B, 8, D, H, W),
        "enc1": (B, 16, D // 2, H // 2, W // 2),
        "enc2": (B, 32, D // 4, H // 4, W // 4),
        "bottleneck": (B, 48, D // 8, H // 8, W // 4),  # last stride is (2, 2, 1)
        "dec2": (B, 32, D // 4, H // 4, W // 4),
        "dec1": (B, 16, D // 2, H // 2, W // 2),
        "dec0": (B, 8, D, H, W),
    }
    assert {k: tuple(v.shape) for k, v in feats.items()} == expected
    assert list(feats) == list(expected)
    assert [(i.name, i.channels, i.stride) for i in ours.feature_info][3] == ("bottleneck", 48, (8, 8, 4))
    # taps record only on request
    assert ours._taps is None


def test_dynunet_defaults_and_deep_supervision():
    net = DynUNetBackbone(in_channels=1, filters=(8, 16, 16, 16, 16), deep_supervision=True, deep_supr_num=2)
    assert [i.stride[0] for i in net.feature_info] == [1, 2, 4, 8, 16, 8, 4, 2, 1]
    net.train()
    out, feats = net(torch.randn(1, 1, 32, 32, 32), return_features=True)
    assert out.shape == (1, 3, 3, 32, 32, 32)  # (B, 1 + deep_supr_num, C, ...)
    assert feats["bottleneck"].shape == (1, 16, 2, 2, 2)


def test_build_backbone():
    assert isinstance(build_backbone("SegResNet", in_channels=1, init_filters=8), SegResNetBackbone)
    assert isinstance(build_backbone("dynunet", in_channels=1, filters=(8, 8, 8, 8, 8)), DynUNetBackbone)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("unetr")


def test_segresnetds_deep_supervision_levels_in_training_one_output_in_eval():
    from trifuse.losses import RegionDiceBCELoss
    from trifuse.losses.segmentation import deep_supervision_weights
    from trifuse.nets import SegResNetDSBackbone

    net = SegResNetDSBackbone(in_channels=4, out_channels=3, init_filters=4, dsdepth=3)
    x = torch.randn(2, 4, 32, 32, 32)
    net.train()
    outs = net(x)
    assert [tuple(o.shape) for o in outs] == [(2, 3, 32, 32, 32), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    outs2, feats = net(x, return_features=True)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs2))
    assert [(k, tuple(v.shape[1:2])) for k, v in feats.items()] == [(f.name, (f.channels,)) for f in net.feature_info]
    w = deep_supervision_weights(3, "exp")
    assert sum(w) == pytest.approx(1.0) and w[0] > w[1] > w[2]
    label = (torch.rand(2, 3, 32, 32, 32) > 0.5).float()
    loss = RegionDiceBCELoss(ds_weights="exp")(outs, label)
    loss.backward()
    low_head = net.up_layers[-3]["head"] if len(net.up_layers) >= 3 else None
    assert low_head is not None and float(low_head.weight.grad.abs().sum()) > 0  # the low-resolution head learns
    net.eval()
    with torch.no_grad():
        single = net(x)
    assert torch.is_tensor(single) and tuple(single.shape) == (2, 3, 32, 32, 32)


# --- oneDNN's CPU bfloat16 Conv3d weight gradient (trifuse.nets.backbone.guard_cpu_bf16_convs) ---
def _weight_grads(net, x, go, dtype):
    net.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        out = net(x)
    out.float().backward(go)
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None and p.ndim == 5}


def test_conv_weight_gradient_of_an_input_thinner_than_the_kernel_is_right_in_cpu_bf16():
    """oneDNN's bf16 weight gradient of a 3³ conv over an input of depth 2 (64 channels) is
    garbage (relative error 1.2 to 1e36, inf or nan, varying with the heap: the order-dependent
    non-finite gradient of the student's deepest conv); a guarded layer computes it in fp32.
    bf16 rounding alone gives a relative error of ~4e-3 (measured 3e-3 to 5e-3 on other depths)."""
    from trifuse.nets.backbone import guard_cpu_bf16_convs

    torch.manual_seed(0)
    for shape in [(2, 4, 4), (2, 2, 2), (2, 8, 8)]:
        conv = guard_cpu_bf16_convs(torch.nn.Sequential(torch.nn.Conv3d(64, 64, 3, padding=1)))
        x, go = torch.randn(2, 64, *shape), torch.randn(2, 64, *shape)
        ref = _weight_grads(conv, x, go, None)["0.weight"]
        got = _weight_grads(conv, x, go, torch.bfloat16)["0.weight"]
        assert torch.isfinite(got).all(), shape
        assert float((got - ref).norm() / ref.norm()) < 2e-2, shape
    # the guard changes the class only: same parameters, state_dict and fp32 output
    plain = torch.nn.Conv3d(16, 16, 3, padding=1)
    guarded = guard_cpu_bf16_convs(torch.nn.Sequential(torch.nn.Conv3d(16, 16, 3, padding=1)))
    guarded[0].load_state_dict(plain.state_dict())
    assert isinstance(guarded[0], torch.nn.Conv3d) and guarded[0].state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 16, 2, 4, 4)
    torch.testing.assert_close(guarded(x), plain(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert guarded(x).dtype == torch.bfloat16  # the dtype autocast would have given


@pytest.mark.parametrize("make", [lambda: SegResNetBackbone(in_channels=4, out_channels=3, init_filters=8),
                                  lambda: build_backbone("segresnet_ds", in_channels=4, out_channels=3, init_filters=8, dsdepth=1)])
def test_backbone_weight_gradients_under_cpu_bf16_match_fp32_on_a_patch_with_a_2_voxel_bottleneck(make):
    """A 4-level backbone on a 16³ patch has a 2³ bottleneck: every conv weight gradient under CPU
    bf16 autocast must be finite and within 0.5 (relative, L2) of fp32. bf16 rounding through
    this untrained network gives 0.07-0.24 on every level (SegResNet; up to 0.32 SegResNetDS;
    fp16: 0.03-0.07); the unguarded deepest convs gave 0.8 to inf."""
    torch.manual_seed(0)
    net = make().train()
    x = torch.randn(2, 4, 16, 16, 16)
    go = torch.randn(2, 3, 16, 16, 16)
    ref = _weight_grads(net, x, go, None)
    got = _weight_grads(net, x, go, torch.bfloat16)
    assert ref.keys() == got.keys() and len(ref) > 10
    errs = {n: float((got[n] - ref[n]).norm() / ref[n].norm()) for n in ref}
    bad = {n: e for n, e in errs.items() if not e < 0.5}
    assert not bad, bad
