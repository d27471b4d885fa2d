"""BratsRegionMetrics: accumulation, binarisation and DDP ("cat") state semantics."""
from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trifuse import keys
from trifuse.metrics import BratsRegionMetrics, binarize
from trifuse.metrics.functional import batch_region_dice_hd95

SHAPE = (12, 12, 12)


def make_cases(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n cases of (3, 12, 12, 12): random nested-ish masks, some regions empty."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 3, *SHAPE, generator=g) > 0.75
    pred = torch.rand(n, 3, *SHAPE, generator=g) > 0.75
    target[0, 2] = False  # one-empty ET in case 0
    if n > 1:
        target[1, 2] = False
        pred[1, 2] = False  # both-empty ET in case 1
    return pred, target


def test_compute_equals_functional_means():
    pred, target = make_cases(4)
    ref = batch_region_dice_hd95(pred, target, (1.0, 1.0, 2.0))
    m = BratsRegionMetrics(spacing=(1.0, 1.0, 2.0))
    m.update(pred[:3], target[:3])
    m.update(pred[3:], target[3:])
    out = m.compute()
    for i, r in enumerate(keys.REGIONS):
        assert out[f"dice_{r}"].item() == pytest.approx(ref["dice"][:, i].mean().item(), abs=1e-6)
        assert out[f"hd95_{r}"].item() == pytest.approx(ref["hd95"][:, i].mean().item(), abs=1e-4)
    assert out["dice_mean"].item() == pytest.approx(ref["dice"].mean().item(), abs=1e-6)
    assert out["hd95_mean"].item() == pytest.approx(ref["hd95"].mean().item(), abs=1e-4)
    # conventions reach the metric: case 0 ET one-empty, case 1 ET both-empty
    dice, hd = m.per_case()
    assert dice[0, 2] == 0 and hd[0, 2] == pytest.approx(keys.HD95_EMPTY_MM, abs=1e-4)
    assert dice[1, 2] == 1 and hd[1, 2] == 0


def test_logits_probs_binary_inputs_agree():
    pred, target = make_cases(2, seed=3)
    logits = torch.where(pred, 4.0, -4.0)
    probs = torch.sigmoid(logits)
    outs = []
    for x, kind in ((logits, "auto"), (probs, "auto"), (pred, "auto"), (pred.to(torch.uint8), "binary"), (logits, "logits")):
        m = BratsRegionMetrics(input_type=kind, hd95=False)
        m.update(x, target)
        outs.append(m.compute()["dice_mean"].item())
    assert outs == pytest.approx([outs[0]] * len(outs))
    assert torch.equal(binarize(torch.tensor([-0.1, 0.2, 0.7]), "auto"), torch.tensor([False, True, True]))
    assert torch.equal(binarize(torch.tensor([0.2, 0.7]), "auto"), torch.tensor([False, True]))  # probs
    assert torch.equal(binarize(torch.tensor([0.2, 0.7]), "logits"), torch.tensor([True, True]))


def test_rows_and_per_case_output():
    pred, target = make_cases(2)
    m = BratsRegionMetrics(return_per_case=True)
    m.update(pred, target, case_ids=["a", "b"])
    out = m.compute()
    assert out["per_case_dice"].shape == (2, 3)
    rows = m.rows()
    assert [(r["case_id"], r["region"]) for r in rows] == [(c, r) for c in "ab" for r in keys.REGIONS]
    assert rows[2]["dice"] == pytest.approx(out["per_case_dice"][0, 2].item())
    m.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert torch.isnan(m.compute()["dice_mean"]) and m.rows() == []


def test_merged_states_equal_single_metric_not_mean_of_means():
    # rank 0 sees 1 case, rank 1 sees 3: the global mean weights cases, not ranks
    pred, target = make_cases(4, seed=5)
    single = BratsRegionMetrics()
    single.update(pred, target)
    r0, r1 = BratsRegionMetrics(), BratsRegionMetrics()
    r0.update(pred[:1], target[:1])
    r1.update(pred[1:], target[1:])
    # (compute on copies: torchmetrics caches compute() and merge_state does not clear it)
    mean_of_means = (copy.deepcopy(r0).compute()["dice_mean"] + copy.deepcopy(r1).compute()["dice_mean"]) / 2
    r0.merge_state(r1)  # the "cat" reduction, as the DDP sync does
    merged, ref = r0.compute(), single.compute()
    for k in ref:
        assert merged[k].item() == pytest.approx(ref[k].item(), abs=1e-6), k
    assert abs(mean_of_means.item() - ref["dice_mean"].item()) > 1e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pred, target = make_cases(4, seed=5)
        # uneven split: rank 0 → case 0, rank 1 → cases 1..3
        sl = slice(0, 1) if rank == 0 else slice(1, 4)
        m = BratsRegionMetrics(return_per_case=True)
        m.update(pred[sl], target[sl])
        res = m.compute()  # syncs ("cat" over ranks), computes, then restores the local state
        n = res.pop("per_case_dice").shape[0]
        res.pop("per_case_hd95")
        out = {k: v.item() for k, v in res.items()}
        if rank == 0:
            torch.save({"out": out, "n": n}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: ~20 s on 2 cores; merge_state above is the fast check
def test_ddp_gloo_sync(tmp_path):
    """Two real gloo processes: the synced result equals one process over all cases."""
    out_file = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out_file), nprocs=2, join=True)
    got = torch.load(out_file)
    pred, target = make_cases(4, seed=5)
    single = BratsRegionMetrics()
    single.update(pred, target)
    ref = single.compute()
    assert got["n"] == 4
    for k, v in ref.items():
        assert got["out"][k] == pytest.approx(v.item(), abs=1e-5), k
