"""The student with a deep-supervised backbone (``backbone="segresnet_ds"``, MONAI SegResNetDS).

Every level in training, one output in eval; FiLM on the bottleneck and every decoder stage;
the gates on the full-resolution level only; L_seg over every level with weights summing to
1; a real Lightning training step reaching the lowest head; checkpoint → Predictor round trip;
the attention figure's gate hooks.
"""
import lightning as L
import pytest
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.losses import deep_supervision_weights, region_dice_bce
from trifuse.nets.backbone import SegResNetDSBackbone
from trifuse.nets.student import StudentNet

P = 16  # patch edge (voxels): a 4-level net has a 2³ bottleneck


def _inputs(seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, P, P, P, generator=g), torch.rand(b, 3, P // 4, P // 4, P // 4, generator=g),
            torch.randn(b, 128, generator=g))


def _bare_copy(student: StudentNet) -> SegResNetDSBackbone:
    """A fresh SegResNetDSBackbone (no hooks) holding the student backbone's weights."""
    bare = SegResNetDSBackbone(init_filters=student.backbone.init_filters, dsdepth=student.backbone.dsdepth)
    bare.load_state_dict(student.backbone.state_dict(), strict=True)
    return bare.train(student.training)


def _stage_modules(net) -> dict:
    """The FiLM-hooked stages of a (student's or bare) SegResNetDS, by tap name, in execution order."""
    ups = [level["blocks"] for level in net.up_layers]
    return {"bottleneck": net.encoder.layers[-1]["blocks"], **{f"dec{len(ups) - 1 - i}": m for i, m in enumerate(ups)}}


class _Recorder:
    """Outputs of the given modules, recorded by forward hooks (registered after FiLM's, so they see its result)."""

    def __init__(self, modules: dict):
        self.out: dict = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name):
        def hook(_m, _args, output):
            self.out[name] = output.detach().clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# --- (a) levels in training, one tensor in eval -----------------------------------------------
@pytest.mark.parametrize("dsdepth", [2, 3])
def test_training_returns_every_level_eval_one_tensor(dsdepth):
    torch.manual_seed(0)
    s = StudentNet(init_filters=8, backbone="segresnet_ds", dsdepth=dsdepth).train()
    x, prior, text = _inputs(b=2)
    out = s(x, prior, text)
    assert isinstance(out, list) and len(out) == dsdepth
    assert [tuple(t.shape) for t in out] == [(2, 3, P // 2**i, P // 2**i, P // 2**i) for i in range(dsdepth)]
    logits, feats, gates = s(x, prior, text, return_features=True)
    assert isinstance(logits, list) and len(logits) == dsdepth
    assert {"bottleneck", "dec0"} <= set(feats) and set(gates) == {"gate_TC", "gate_ET"}
    assert feats["bottleneck"].shape == (2, 64, 2, 2, 2) and feats["dec0"].shape == (2, 8, P, P, P)
    s.eval()
    with torch.no_grad():
        one = s(x, prior, text)
        logits_eval, _, _ = s(x, prior, text, return_features=True)
    assert torch.is_tensor(one) and one.shape == x.shape[:1] + (3,) + x.shape[2:]
    torch.testing.assert_close(logits_eval, one)
    # the default backbone is unchanged: one tensor in training too
    plain = StudentNet(init_filters=8).train()
    assert torch.is_tensor(plain(x, prior, text)) and plain.backbone_name == "segresnet"
    with pytest.raises(ValueError, match="unknown student backbone"):
        StudentNet(backbone="unet")


def test_gates_apply_to_the_full_resolution_level_only():
    torch.manual_seed(0)
    s = StudentNet(init_filters=8, backbone="segresnet_ds").train()
    for gate in s.gates.values():  # a gate that varies (a fresh one is σ(4) everywhere)
        torch.nn.init.normal_(gate.net[-1].weight, std=2.0)
    x, prior, text = _inputs()
    logits, _, gates = s(x, prior, text, return_features=True)
    s._cond = s.condition(1, prior, text, x)  # the backbone with the student's FiLM, without the gates
    try:
        raw = s.backbone(x)
    finally:
        s._cond = None
    # lower levels: the backbone's heads, ungated
    for lvl, ref in zip(logits[1:], raw[1:]):
        torch.testing.assert_close(lvl, ref, rtol=0, atol=0)
    # full resolution: WT ungated, TC/ET gated (log-space, the gate only lowers the probability)
    torch.testing.assert_close(logits[0][:, keys.WT], raw[0][:, keys.WT].float(), rtol=0, atol=0)
    for r in ("TC", "ET"):
        i = keys.REGIONS.index(r)
        assert gates[f"gate_{r}"].std() > 0.05
        assert not torch.allclose(logits[0][:, i], raw[0][:, i].float(), atol=1e-3)
        assert torch.all(logits[0][:, i] <= raw[0][:, i].float() + 1e-4)


# --- (b) FiLM on every hooked stage -------------------------------------------------------------
def test_identity_film_equals_the_bare_backbone():
    torch.manual_seed(0)
    s = StudentNet(init_filters=8, backbone="segresnet_ds", use_semantic_attention=False).train()
    assert set(s.film) == {"bottleneck", "dec2", "dec1", "dec0"}
    x, prior, text = _inputs()
    bare = _bare_copy(s)
    got, ref = s(x, prior, text), bare(x)
    assert len(got) == len(ref) == 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    s.eval(), bare.eval()
    with torch.no_grad():
        torch.testing.assert_close(s(x, prior, text), bare(x), rtol=0, atol=1e-6)


def test_film_modulates_every_hooked_stage_and_the_levels_after_it():
    torch.manual_seed(0)
    s = StudentNet(init_filters=8, backbone="segresnet_ds", use_semantic_attention=False).train()
    bare = _bare_copy(s)
    x, prior, text = _inputs()
    cond = s.condition(1, prior, text, x)
    order = list(_stage_modules(s.backbone))
    assert order == [name for name, _ in s.film_stages()]
    # dec_j feeds the heads of levels i ≤ j; the bottleneck feeds all
    level_of = {"bottleneck": 3, "dec2": 2, "dec1": 1, "dec0": 0}
    rec_bare = _Recorder(_stage_modules(bare))
    with torch.no_grad():
        ref = bare(x)
    rec_bare.remove()
    for name in order:
        for film in s.film.values():  # every FiLM the identity ...
            torch.nn.init.zeros_(film.mlp[-1].weight)
            torch.nn.init.zeros_(film.mlp[-1].bias)
        torch.nn.init.normal_(s.film[name].mlp[-1].weight, std=0.1)  # ... but this one
        rec = _Recorder(_stage_modules(s.backbone))
        with torch.no_grad():
            out = s(x, prior, text)
        rec.remove()
        k = order.index(name)
        for before in order[:k]:
            torch.testing.assert_close(rec.out[before], rec_bare.out[before], rtol=0, atol=1e-6)
        # the hooked stage's output is FiLM of the bare stage output (same input: earlier stages equal)
        assert not torch.allclose(rec.out[name], rec_bare.out[name], atol=1e-4), name
        with torch.no_grad():
            torch.testing.assert_close(rec.out[name], s.film[name](rec_bare.out[name], cond), rtol=1e-5, atol=1e-5)
        for i, (a, b) in enumerate(zip(out, ref)):
            if i <= level_of[name]:
                assert not torch.allclose(a, b, atol=1e-5), f"FiLM at {name} left level {i} unchanged"
            else:
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # with every FiLM live, another conditioning changes every hooked stage's output
    for film in s.film.values():
        torch.nn.init.normal_(film.mlp[-1].weight, std=0.1)
    outs = []
    for t in (text, torch.randn_like(text)):
        rec = _Recorder(_stage_modules(s.backbone))
        with torch.no_grad():
            s(x, prior, t)
        rec.remove()
        outs.append(rec.out)
    for name in order:
        assert not torch.allclose(outs[0][name], outs[1][name], atol=1e-4), f"text does not reach {name}"


# --- (c) the deep-supervision loss ---------------------------------------------------------------
def test_level_weights_sum_to_one_and_weight_the_student_loss():
    from trifuse.lightning.student import StudentModule

    for n in range(1, 6):
        for mode in ("exp", "same", "two", "nnunet"):
            assert sum(deep_supervision_weights(n, mode)) == pytest.approx(1.0, abs=1e-12), (n, mode)
    w = deep_supervision_weights(3, "exp")
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    model = StudentModule(init_filters=8, backbone="segresnet_ds", batch_dice=True, use_response=False, use_feature=False,
                          roi_size=(P, P, P), compute_hd95=False)
    assert model.criterion.kwargs["batch"] is True and model.criterion.ds_weights == "exp"
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(2, 3, P, P, P, generator=g) > 0.6).float()
    levels = [torch.randn(2, 3, P // 2**i, P // 2**i, P // 2**i, generator=g) for i in range(3)]
    expect = sum(wi * region_dice_bce(lv, F.interpolate(target, size=lv.shape[2:], mode="nearest-exact"), batch=True)
                 for wi, lv in zip(w, levels))
    assert float(model.criterion(levels, target)) == pytest.approx(float(expect), rel=1e-5)
    # the same loss on every level gives that loss (the weights keep the single-output scale)
    flat = [torch.zeros_like(lv) for lv in levels]
    assert float(model.criterion(flat, torch.zeros_like(target))) == pytest.approx(
        float(region_dice_bce(flat[0], torch.zeros_like(target), batch=True)), rel=1e-6)


# --- (d) a real training step -------------------------------------------------------------------
def _samples(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{
        keys.MRI: torch.randn(4, P, P, P, generator=g),
        keys.LABEL: (torch.rand(3, P, P, P, generator=g) > 0.7).to(torch.uint8),
        keys.PRIOR: torch.rand(3, P // 4, P // 4, P // 4, generator=g),
        keys.TEXT: torch.randn(128, generator=g),
    } for _ in range(n)]


def _ds_student(**kw):
    from trifuse.lightning.student import StudentModule

    torch.manual_seed(0)
    kw.setdefault("dsdepth", 3)
    return StudentModule(init_filters=8, backbone="segresnet_ds", use_response=False, use_feature=False,
                         use_semantic=True, warmup_steps=0, roi_size=(P, P, P), compute_hd95=False, **kw)


class _HeadGrads(L.Callback):
    """Gradient norm of every deep-supervision head after each backward."""

    def __init__(self):
        self.norms = []

    def on_after_backward(self, trainer, pl_module):
        heads = [level["head"].weight.grad for level in pl_module.student.backbone.up_layers]
        self.norms.append([None if g is None else float(g.norm()) for g in heads])


def test_ds_student_trains_and_the_loss_reaches_the_lowest_head(tmp_path):
    model = _ds_student()
    grads = _HeadGrads()
    loader = torch.utils.data.DataLoader(_samples(), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, callbacks=[grads], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, loader)
    assert trainer.global_step == 2 and len(grads.norms) == 2
    for step in grads.norms:
        # up_layers[0] is the lowest level (stride 4): its head is reached only through the DS loss
        assert all(n is not None and n > 0 for n in step), step
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/loss_seg"]) and torch.isfinite(m["train/loss_sem"])
    assert "train/loss_resp" not in m and "train/loss_feat" not in m


# --- (e) checkpoint round trip, prediction and the attention figure -------------------------------
def test_checkpoint_round_trip_through_the_predictor(tmp_path):
    from trifuse.figures.attention import GateRecorder
    from trifuse.inference import Predictor, load_model

    model = _ds_student(dsdepth=2)
    with torch.no_grad():  # FiLM and gates away from their identity/constant start
        for p in list(model.student.film.parameters()) + list(model.student.gates.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "ds_student.ckpt"
    trainer.save_checkpoint(path)
    loaded = load_model(path)
    assert loaded.hparams.backbone == "segresnet_ds" and loaded.hparams.dsdepth == 2
    assert isinstance(loaded.student.backbone, SegResNetDSBackbone) and loaded.student.backbone.dsdepth == 2
    assert not loaded.training
    x, prior, text = _inputs(seed=3)
    model.eval()
    with torch.no_grad():
        ref = model.infer(x, prior, text)
        got = loaded.infer(x, prior, text)
    assert torch.is_tensor(got) and got.shape == (1, 3, P, P, P)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    sample = {keys.MRI: x[0], keys.PRIOR: prior[0], keys.TEXT: text[0], keys.CASE_ID: "c",
              keys.META: {"spacing": [1.0, 1.0, 1.0], "case_id": "c"}}
    probs = Predictor(loaded, tta=False, postprocess=False).predict_probabilities(sample)
    torch.testing.assert_close(probs, torch.sigmoid(ref[0]), rtol=0, atol=1e-6)
    # the attention figure's hooks see the full-resolution gates of the eval forward pass
    with GateRecorder(loaded) as rec:
        probs7 = Predictor(loaded, tta=False, postprocess=False).predict_probabilities(sample)
    region_probs, maps = GateRecorder.split(probs7)
    assert rec.calls == 1 and probs7.shape[0] == 7
    torch.testing.assert_close(region_probs, probs, rtol=0, atol=1e-6)
    # StudentModule.infer hands the window its part of the prior upsampled to the case grid
    # and pooled back by 4: the gates of a direct call with that prior are the reference
    import torch.nn.functional as F

    seen = F.interpolate(F.interpolate(prior, size=x.shape[2:], mode="trilinear", align_corners=False), scale_factor=0.25, mode="trilinear", align_corners=False)
    with torch.no_grad():
        _, _, gates = loaded.student(x, seen, text, return_features=True)
    for r in ("TC", "ET"):
        assert maps[f"gate_{r}"].shape == (P, P, P)
        torch.testing.assert_close(torch.from_numpy(maps[f"gate_{r}"]), gates[f"gate_{r}"][0, 0], rtol=0, atol=1e-5)
