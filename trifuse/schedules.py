"""Learning-rate schedule helpers shared by the CLIP trainer (:func:`trifuse.semantic.clip.one_cycle`)
and the Lightning teachers (:class:`trifuse.lightning.teacher.OneCycleCosine`).

Plain Python: importing it costs neither torch nor Lightning.
"""
from __future__ import annotations


def one_cycle_pct_start(pct_start: float, total_steps: int) -> float:
    """``pct_start`` for torch's ``OneCycleLR`` that works for any ``total_steps``.

    Torch ends the warm-up phase at step ``pct_start * total_steps - 1``; when that is
    exactly 0 (10 steps at 0.1, e.g. one epoch of 10 batches) it divides 0 by 0. A warm-up
    of one step peaks at step 0 anyway, so it is moved just before step 0, as any shorter
    run has it; every other ``pct_start`` is returned unchanged.
    """
    if abs(pct_start * total_steps - 1.0) < 1e-9:
        return pct_start * (1.0 - 1e-6)
    return pct_start
