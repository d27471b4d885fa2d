"""``trifuse figures attention``: the student's TC/ET semantic attention next to the priors it received.

The method paper's Figure 3, one row per held-out case, on the axial slice where the tumour
is widest: FLAIR, then for TC and for ET the prior the gate received and the gate's
attention map ``σ(conv([F_dec0, F_prior]))`` (:class:`~trifuse.nets.semantic_attention.SemanticAttention`),
then the prediction and the truth (BraTS label colours).

The maps are not recomputed: :class:`GateRecorder` puts forward hooks on the student's two
gate modules while :meth:`trifuse.inference.Predictor.predict_probabilities` runs the
student's own inference path (spacing resampling, priors derived from the MRI as in
training, sliding windows, optional mirroring). Each window's gate and the prior it was fed
travel as extra output channels of that window, so the sliding-window stitching, the
mirroring and the resampling back to the case grid treat them exactly as the region logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trifuse import keys
from trifuse.figures.common import (grey_slice, labelled_slice, region_legend, row_axes, row_figure, save_with_boxes,
                                    take_view, tumour_centre)

GATED = ("TC", "ET")
#: extra output channels appended per window, in this order (after the 3 region logits)
EXTRA = tuple(f"{kind}_{r}" for r in GATED for kind in ("gate", "prior"))
COLUMNS = ("FLAIR", "prior TC", "attention TC", "prior ET", "attention ET", "prediction", "truth")
_EPS = 1e-6


class NoAttentionError(ValueError):
    """The checkpoint has no semantic attention gates (not a student, or an ablation without the semantic tier)."""


def attention_gates(model):
    """The student's ``{"TC": SemanticAttention, "ET": ...}``, or :class:`NoAttentionError` saying why there are none."""
    net = getattr(model, "student", None)
    if net is None or not hasattr(model, "uses_priors"):
        raise NoAttentionError(f"{type(model).__name__} is not a TriFuse student: it has no semantic attention to show")
    if not model.uses_priors:
        raise NoAttentionError("this student was trained without semantic priors (use_semantic: false, an ablation "
                               "without the semantic tier): it has no priors and no TC/ET attention gates to show")
    if not getattr(net, "use_semantic_attention", False):
        raise NoAttentionError("this student uses semantic priors but has no TC/ET attention gates "
                               "(use_semantic_attention: false): there is no attention map to show")
    return {r: net.gates[r] for r in GATED}


class GateRecorder:
    """Forward hooks that expose the student's TC/ET gates through its normal inference path.

    While active (``with GateRecorder(model):``), each gate's hook keeps its attention map
    ``σ(g)`` and the prior it was fed (resized to the gate's grid as the gate does), and a hook
    on the student network appends them, in logit form, to that forward's region logits as the
    channels :data:`EXTRA`. Whatever inference does to the logits (window stitching, flips, a
    sigmoid, resampling) then applies to them alike, and :meth:`split` reads them back after
    the sigmoid. ``calls`` counts the network's forward passes (windows × mirrorings).
    """

    def __init__(self, model):
        self.gates = attention_gates(model)
        self.net = model.student
        self.calls = 0
        self._stash: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> "GateRecorder":
        for r, gate in self.gates.items():
            self._handles.append(gate.register_forward_hook(self._gate_hook(r)))
        self._handles.append(self.net.register_forward_hook(self._net_hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _gate_hook(self, region: str):
        def hook(_module, args, output):
            _gated, gate = output
            prior = args[2][:, keys.REGIONS.index(region) : keys.REGIONS.index(region) + 1].float()
            prior = F.interpolate(prior, size=gate.shape[2:], mode="trilinear", align_corners=False)
            self._stash[region] = (gate.float(), prior)

        return hook

    def _net_hook(self, _module, _args, output):
        if not torch.is_tensor(output):  # return_features (training): leave it alone
            return output
        self.calls += 1
        extra = [torch.logit(t.clamp(_EPS, 1 - _EPS), eps=None) for r in GATED for t in self._stash.pop(r)]
        return torch.cat([output.float()] + extra, dim=1)

    @staticmethod
    def split(probs: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
        """``(3 + 4, …)`` sigmoid outputs → region probabilities ``(3, …)`` and ``{EXTRA name: (…) array}``."""
        n = len(keys.REGIONS)
        return probs[:n], {name: probs[n + i].numpy() for i, name in enumerate(EXTRA)}


@dataclass
class AttentionRow:
    """One case as the figure shows it (all on the prepared, cropped case grid).

    Attributes:
        case_id: the case.
        flair, brain: ``(D, H, W)`` z-scored FLAIR and brain mask (the model's input).
        maps: :data:`EXTRA` name → ``(D, H, W)`` gate / prior map in [0, 1].
        pred: ``(3, D, H, W)`` bool predicted regions (thresholded, post-processed as the checkpoint says).
        truth: ``(3, D, H, W)`` bool true regions, or ``None``.
        affine, spacing: geometry of the grid.
        windows: the network's forward passes for this case.
        origin: the prepared crop's first voxel in the case's grid (slice numbers are shown in that grid).
    """

    case_id: str
    flair: np.ndarray
    brain: np.ndarray
    maps: dict
    pred: np.ndarray
    truth: np.ndarray | None
    affine: np.ndarray
    spacing: tuple
    windows: int = 1
    origin: tuple = (0, 0, 0)


def capture_attention(predictor, sample: dict, truth: np.ndarray | None = None) -> AttentionRow:
    """Run ``predictor`` (a :class:`~trifuse.inference.Predictor` of a student) on a prepared sample, gates recorded.

    Args:
        predictor: its ``tta`` decides whether the maps (and prediction) average the 8 mirrorings.
        sample: a prepared case (:func:`trifuse.inference.prepare_case`); ``prior``/``text``
            in it are used instead of deriving them (as the student's ``semantic_for_sample`` does).
        truth: ``(3, D, H, W)`` true regions on the sample's grid.

    Raises:
        NoAttentionError: the model has no gates.
    """
    from trifuse.inference import apply_decision

    with GateRecorder(predictor.model) as rec:
        probs = predictor.predict_probabilities(sample)
    region_probs, maps = GateRecorder.split(probs)
    regions = region_probs > predictor.threshold
    if predictor.postprocess and predictor.decision:
        regions = apply_decision(regions, predictor.decision, sample[keys.META]["spacing"])
    meta = sample[keys.META]
    return AttentionRow(
        case_id=str(sample[keys.CASE_ID]),
        flair=torch.as_tensor(sample[keys.MRI][keys.FLAIR]).float().numpy(),
        brain=torch.as_tensor(sample[keys.BRAIN][0]).numpy().astype(bool),
        maps=maps,
        pred=torch.as_tensor(regions).numpy().astype(bool),
        truth=None if truth is None else np.asarray(truth).astype(bool),
        affine=np.asarray(meta["affine"], dtype=float),
        spacing=tuple(float(s) for s in meta["spacing"]),
        windows=rec.calls,
        origin=tuple(int(b[0]) for b in meta.get("crop_box", [[0, 0]] * 3)),
    )


def axial_centre(row: AttentionRow) -> tuple[int, int, int]:
    """Through the widest axial cross-section of the true WT, else the predicted WT, else the TC prior."""
    prior = row.maps["prior_TC"] > 0.5
    return tumour_centre(None if row.truth is None else row.truth[keys.WT], row.pred[keys.WT], prior,
                         fallback_shape=row.flair.shape)


def _dice_text(row: AttentionRow) -> str:
    if row.truth is None:
        return "no label"
    from trifuse.metrics.functional import compute_region_dice

    d = compute_region_dice(torch.from_numpy(row.pred)[None], torch.from_numpy(row.truth)[None])[0]
    return "Dice " + " · ".join(f"{r} {float(d[i]):.3f}" for i, r in enumerate(keys.REGIONS))


def render_attention_figure(rows: list[AttentionRow], out_png: str | Path, title: str = "") -> dict:
    """Draw one row per case (see the module docstring) and write ``out_png``.

    Returns:
        ``{"png", "rows": [case ids], "cases": the rows, "attention_scale": (low, 1), "centres": {case: voxel}, "panels": {(case_id, column): 2-D map
        (prior/attention columns, values in [0, 1]) or RGB array, exactly as drawn}, "boxes": {same key: pixel box}}``.
    """
    from trifuse.semantic.slices import view_geometry

    if not rows:
        raise ValueError("no case to draw")
    # the gate starts near 1 (bias 4: σ ≈ 0.98) and a briefly trained one stays close to it: its colour
    # scale runs from the lowest value in any brain (rounded down to 0.05) to 1, the priors' from 0 to 1
    low = min(float(row.maps[f"gate_{r}"][row.brain].min()) for row in rows for r in GATED if row.brain.any())
    low = min(np.floor(low * 20) / 20, 0.9)
    fig, subs = row_figure(len(rows), len(COLUMNS), row_in=2.55, footer_in=0.7)
    panels, axes, centres = {}, {}, {}
    heat = {}
    for row, sub in zip(rows, subs):
        centre = axial_centre(row)
        centres[row.case_id] = centre
        geo = view_geometry(row.affine, "axial", row.spacing)
        aspect = geo.row_mm / geo.col_mm

        def view(vol):
            return take_view(vol, "axial", centre, row.affine)

        grey, b2 = grey_slice(row.flair, row.brain, "axial", centre, row.affine)
        rng = ", ".join(f"{r} {row.maps[f'gate_{r}'][row.brain].min():.3f}–{row.maps[f'gate_{r}'][row.brain].max():.3f}"
                        for r in GATED)
        head = f"{row.case_id}    axial {centre[geo.slice_axis] + row.origin[geo.slice_axis]}    {_dice_text(row)}    attention in brain: {rng}"
        for ax, col in zip(row_axes(sub, head, COLUMNS), COLUMNS):
            key = (row.case_id, col)
            axes[key] = ax
            if col == "FLAIR":
                panels[key] = np.repeat(grey[..., None], 3, axis=-1)
                ax.imshow(panels[key], aspect=aspect, interpolation="nearest")
            elif col.startswith(("prior", "attention")):
                kind, region = col.split()
                m = view(row.maps[("gate" if kind == "attention" else "prior") + f"_{region}"])
                panels[key] = m
                heat[kind] = ax.imshow(np.ma.masked_where(~b2, m), cmap="inferno" if kind == "prior" else "viridis",
                                       vmin=low if kind == "attention" else 0.0, vmax=1.0, aspect=aspect,
                                       interpolation="nearest")
                if row.truth is not None:
                    t = view(row.truth[keys.REGIONS.index(region)]).astype(float)
                    if t.max() > 0:
                        ax.contour(t, levels=[0.5], colors=["cyan" if kind == "prior" else "white"], linewidths=0.9,
                                   linestyles="dashed")
            else:
                regions = row.pred if col == "prediction" else row.truth
                if regions is None:
                    panels[key] = np.repeat(grey[..., None], 3, axis=-1)
                    ax.text(0.5, 0.5, "no label", color="gray", ha="center", va="center", transform=ax.transAxes)
                else:
                    panels[key] = labelled_slice(grey, regions, "axial", centre, row.affine)
                ax.imshow(panels[key], aspect=aspect, interpolation="nearest")
    foot = subs[-1]
    for k, (kind, label) in enumerate((("prior", "prior (0–1)"), ("attention", f"attention σ(gate), scale {low:.2f}–1"))):
        if kind in heat:
            cax = foot.add_axes([0.05 + 0.3 * k, 0.55, 0.22, 0.14])
            cb = foot.colorbar(heat[kind], cax=cax, orientation="horizontal")
            cb.ax.tick_params(colors="white", labelsize=7)
            cb.set_label(label, color="white", fontsize=8)
    from matplotlib.lines import Line2D

    dashed = [Line2D([], [], color=c, linestyle="--", linewidth=0.9, label=f"true TC / ET outline ({on})")
              for c, on in (("cyan", "on priors"), ("white", "on attention"))]
    region_legend(foot, extra=dashed, loc="center right", ncol=2, bbox_to_anchor=(0.99, 0.55))
    fig.suptitle(title or "semantic attention of the student", color="white", fontsize=11, y=1.0, va="bottom")
    png, boxes = save_with_boxes(fig, axes, out_png)
    return {"png": png, "rows": [r.case_id for r in rows], "cases": rows, "centres": centres, "panels": panels,
            "boxes": boxes, "attention_scale": (low, 1.0)}


def attention_figure_from_data(ckpt: str | Path, data_dir: str | Path, out_png: str | Path, max_cases: int = 4,
                               case: str | None = None, device: str = "auto", tta: bool = False,
                               describer: str = "as-trained") -> dict:
    """Load the student, run it on the first ``max_cases`` cases of ``data_dir`` with its gates recorded; draw the figure.

    Raises:
        NoAttentionError: the checkpoint has no semantic attention (checked before any case is read).
        ValueError: no case (named ``case``) in ``data_dir``.
    """
    from trifuse.inference import Predictor, prepare_case
    from trifuse.io.discovery import discover_cases
    from trifuse.io.labels import labels_to_regions
    from trifuse.io.validate import decode_case

    predictor = Predictor.from_checkpoint(ckpt, device=device, tta=tta)
    attention_gates(predictor.model)
    predictor.model.set_describer(describer)
    records = [r for r in discover_cases(data_dir) if case is None or r.case_id == case]
    if not records:
        raise ValueError(f"{data_dir}: no case" + (f" named {case}" if case else ""))
    rows = []
    for rec in records[: max(1, int(max_cases))]:
        decoded = decode_case(rec)
        sample = prepare_case(decoded)
        truth = None
        if decoded.seg is not None:
            sl = (slice(None),) + tuple(slice(a, b) for a, b in sample[keys.META]["crop_box"])
            truth = labels_to_regions(np.asarray(decoded.seg.data), rec.year)[sl]
        rows.append(capture_attention(predictor, sample, truth))
        del decoded
    how = "8 mirrorings averaged" if tta else "one pass, no mirroring"
    return render_attention_figure(rows, out_png, title=f"semantic attention of {Path(ckpt)} on {Path(data_dir).name} ({how})")
