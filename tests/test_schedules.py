"""The one-cycle warm-up guard shared by CLIP (trifuse.semantic.clip.one_cycle) and the teachers
(trifuse.lightning.teacher.OneCycleCosine) lives in one light module."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trifuse.schedules import one_cycle_pct_start

ROOT = Path(__file__).resolve().parents[1]


def test_only_a_warm_up_ending_at_step_zero_moves():
    assert one_cycle_pct_start(0.1, 10) == pytest.approx(0.1, rel=1e-5) and one_cycle_pct_start(0.1, 10) < 0.1
    assert one_cycle_pct_start(0.25, 4) < 0.25
    for pct, steps in ((0.1, 9), (0.1, 11), (0.2, 100), (0.3, 10), (0.0, 1)):
        assert one_cycle_pct_start(pct, steps) == pct
    # the moved warm-up ends before step 0 in torch's terms: pct * steps - 1 < 0
    assert one_cycle_pct_start(0.1, 10) * 10 - 1 < 0


def test_clip_and_its_schedule_pay_no_lightning_import():
    code = ("import sys, torch; from trifuse.semantic.clip import one_cycle; "
            "one_cycle(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 0.1, 10); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_two_schedules_agree_where_torch_alone_divides_by_zero():
    from trifuse.lightning.teacher import OneCycleCosine
    from trifuse.semantic.clip import one_cycle

    def rates(make, steps=10):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = make(opt)
        out = []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    clip = rates(lambda opt: one_cycle(opt, 1e-3, 10, pct_start=0.1))
    teacher = rates(lambda opt: OneCycleCosine(opt, total_steps=10, pct_start=0.1))
    assert clip == pytest.approx(teacher) and all(r == r for r in clip)  # finite, no 0 / 0
