"""Student optimisation: one schedule per λ, a one-cycle learning rate, any sliding-window batch."""
import lightning as L
import pytest
import torch

from trifuse.lightning.data import BratsDataModule
from trifuse.lightning.student import StudentModule


def test_each_lambda_has_its_own_start_and_warmup():
    m = StudentModule(
        init_filters=8, use_feature=False, use_response=False, teacher_modalities=(), teacher_channels=[],
        lambda_resp=1.0, lambda_feat=0.5, lambda_sem=0.2,
        warmup_steps={"resp": 10, "feat": 20, "sem": 0}, start_steps={"feat": 5, "sem": 3},
    )
    s = m.schedules
    assert s["resp"](0) == 0 and s["resp"](5) == pytest.approx(0.5) and s["resp"](10) == 1.0
    assert s["feat"](5) == 0 and s["feat"](15) == pytest.approx(0.25) and s["feat"](25) == 0.5
    assert s["sem"](2) == 0 and s["sem"](3) == 0.2
    with pytest.raises(ValueError, match="unknown λ"):
        StudentModule(init_filters=8, warmup_steps={"response": 3})
    shared = StudentModule(init_filters=8, warmup_steps=4, start_steps=2, lambda_shape="cosine").schedules
    assert all(shared[k](2) == 0 for k in shared) and shared["resp"](4) == pytest.approx(0.5)


class LrLog(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_student_learning_rate_warms_up_then_anneals(synthetic_cohort, tmp_path):
    data, cache = synthetic_cohort
    dm = BratsDataModule(str(data), str(cache), patch_size=(16, 16, 16), batch_size=1, num_workers=0, steps_per_epoch=5, n_folds=3, limit_val_cases=1)
    model = StudentModule(init_filters=8, use_response=False, use_feature=False, use_semantic=False, teacher_modalities=(), teacher_channels=[],
                          lr=1e-3, pct_start=0.3, roi_size=(16, 16, 16), compute_hd95=False)
    lr = LrLog()
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, callbacks=[lr], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, dm)
    assert trainer.global_step == 10  # steps_per_epoch is per rank: 5 per epoch
    lrs = lr.lrs
    assert lrs[0] == pytest.approx(1e-3 / 25, rel=1e-6)  # one-cycle start: max_lr / div_factor
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert peak in (2, 3) and lrs[peak] > 0.9e-3  # the warm-up takes 30% of the 10 steps
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :])) and lrs[-1] < 0.2e-3


@pytest.mark.parametrize("use_semantic", [True, False])
def test_sliding_window_inference_is_independent_of_sw_batch_size(use_semantic):
    torch.manual_seed(0)
    kw = dict(init_filters=8, use_response=False, use_feature=False, teacher_modalities=(), teacher_channels=[], use_semantic=use_semantic,
              roi_size=(16, 16, 16), overlap=0.5)
    one = StudentModule(sw_batch_size=1, **kw).eval()
    four = StudentModule(sw_batch_size=4, **kw).eval()
    four.load_state_dict(one.state_dict())
    x = torch.randn(1, 4, 24, 24, 20)
    prior = torch.rand(1, 3, 6, 6, 5) if use_semantic else None
    text = torch.randn(1, 128) if use_semantic else None
    with torch.no_grad():
        a, b = one.infer(x, prior, text), four.infer(x, prior, text)
    assert a.shape == (1, 3, 24, 24, 20)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
