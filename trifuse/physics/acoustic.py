"""MRI → acoustic property maps (impedance, attenuation, backscatter).

DESIGN.md: ``Z = f_MRI→Z(I_MRI; θ_mapper)`` per voxel. Two mappers share one
interface, ``mapper(mri, brain, labels) -> AcousticMaps``:

* :class:`ImpedanceMapper` — tissue posteriors × acoustic table,
  ``Z = Σ_k p_k · ρ_k c_k`` with θ = (log c_k, log ρ_k) learnable, initialised from
  :data:`trifuse.physics.tissues.TISSUES` (Duck 1990; Pichardo 2011; ImFusion).
* :class:`DiffUSMapper` — the DiffUS MLP 1→32→32→1 on one z-scored contrast,
  softplus output in MRayl (DiffUS fits it to real intra-operative US with a
  1−SSIM loss; initialised here to the brain's mean impedance).

Voxels outside the brain are not MRI-derived: ``labels`` (:func:`geometry_labels`)
marks the CSF gap, skull, scalp, air and the coupling saline of the craniotomy
window, and their properties come from the same (learnable) table.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from trifuse import keys
from trifuse.physics.tissues import (
    BRAIN_TISSUES,
    DEFAULT_TISSUE_MODEL,
    HEAD_TISSUES,
    TISSUES,
    TissueModel,
    map_voxels,
    tissue_logits_flat,
)

__all__ = [
    "AcousticMaps",
    "GEOMETRY_LABELS",
    "geometry_labels",
    "ImpedanceMapper",
    "DiffUSMapper",
    "db_to_intensity_nepers",
]

#: codes of :func:`geometry_labels` (0 = brain: properties from MRI)
GEOMETRY_LABELS = ("brain", "csf", "skull", "scalp", "air", "saline")
#: index into HEAD_TISSUES of each geometry label code >= 1
_GEO_TO_HEAD = torch.tensor([HEAD_TISSUES.index(n) if n != "brain" else 0 for n in GEOMETRY_LABELS])


class AcousticMaps(NamedTuple):
    """Per-voxel acoustic properties, each (B, 1, D, H, W).

    Attributes:
        impedance: characteristic impedance Z in MRayl.
        attenuation: α in dB/(cm·MHz).
        scatter: backscatter intensity (linear, relative to a perfect reflector).
    """

    impedance: torch.Tensor
    attenuation: torch.Tensor
    scatter: torch.Tensor

    def stack(self) -> torch.Tensor:
        """(B, 3, D, H, W) in the order impedance, attenuation, scatter."""
        return torch.cat([self.impedance, self.attenuation, self.scatter], 1)


def db_to_intensity_nepers(alpha_db: torch.Tensor | float) -> torch.Tensor | float:
    """Convert an attenuation coefficient in dB/(cm·MHz) to an intensity coefficient.

    A loss of α dB per cm is the same number of dB for amplitude (20·log10) and for
    intensity (10·log10). As an exponential rate: amplitude ∝ exp(−a z) with
    a = α·ln(10)/20 Np/(cm·MHz) (1 Np = 8.686 dB), and intensity ∝ exp(−μ z) with
    μ = 2a = α·ln(10)/10 = α / 4.343 per (cm·MHz). The round-trip echo intensity from
    depth z at frequency f is then exp(−2 μ f z), the DESIGN's exp(−2 α f z).
    """
    return alpha_db * (math.log(10.0) / 10.0)


def geometry_labels(brain: torch.Tensor, layers: dict[str, torch.Tensor], window: torch.Tensor | None = None) -> torch.Tensor:
    """Label map of where acoustic properties come from.

    Args:
        brain: (B, 1, D, H, W) bool.
        layers: :func:`trifuse.physics.tissues.head_layers` output.
        window: optional (B, 1, D, H, W) bool craniotomy region; outside the brain it
            becomes saline (the skull is removed and the cavity filled).

    Returns:
        (B, 1, D, H, W) uint8 codes indexing :data:`GEOMETRY_LABELS`.
    """
    lab = torch.full(brain.shape, 4, dtype=torch.uint8, device=brain.device)  # air
    lab = torch.where(layers["scalp"], 3, lab)
    lab = torch.where(layers["skull"], 2, lab)
    lab = torch.where(layers["csf"], 1, lab)
    if window is not None:
        lab = torch.where(window.bool(), 5, lab)
    lab = torch.where(brain.bool(), 0, lab)
    return lab.to(torch.uint8)


def _table(names: tuple[str, ...], attr: str) -> torch.Tensor:
    return torch.tensor([float(getattr(TISSUES[n], attr)) for n in names], dtype=torch.float32)


class _TableMixin(nn.Module):
    """Holds θ = (log c, log ρ) per head tissue plus attenuation/backscatter tables."""

    def _init_table(self, learn_attenuation: bool, learn_scatter: bool = True):
        self.log_c = nn.Parameter(torch.log(_table(HEAD_TISSUES, "c")))
        self.log_rho = nn.Parameter(torch.log(_table(HEAD_TISSUES, "rho")))
        log_alpha = torch.log(_table(HEAD_TISSUES, "alpha"))
        if learn_attenuation:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        # tissue echogenicity (backscatter level, dB): learnable, as DiffUS fits it to real US
        scatter = _table(HEAD_TISSUES, "scatter_db")
        if learn_scatter:
            self.scatter_db = nn.Parameter(scatter)
        else:
            self.register_buffer("scatter_db", scatter)
        self.register_buffer("geo_index", _GEO_TO_HEAD.clone(), persistent=False)

    def impedance_table(self) -> torch.Tensor:
        """(K,) impedance per :data:`HEAD_TISSUES` in MRayl: exp(log c + log ρ) / 1e6."""
        return torch.exp(self.log_c + self.log_rho) / 1e6

    def property_table(self) -> torch.Tensor:
        """(K, 3): impedance (MRayl), attenuation (dB/cm/MHz), scatter (linear)."""
        return torch.stack([self.impedance_table(), torch.exp(self.log_alpha), 10.0 ** (self.scatter_db / 10.0)], 1)

    def _outside(self, labels: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, 3, V) table properties of the flattened geometric label map."""
        props = table[self.geo_index]  # (6, 3): per label code
        lab = labels.reshape(labels.shape[0], -1).long()  # (B, V)
        return props.T[:, lab].transpose(0, 1)  # (B, 3, V)

    def _inside(self, mri: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(B, 3, V) posterior-weighted brain-tissue properties (table rows 0..5)."""
        b, c = mri.shape[:2]
        t = table[: len(BRAIN_TISSUES)].T.to(mri.dtype)  # (3, 6)

        def mix(x: torch.Tensor) -> torch.Tensor:
            return torch.matmul(t, torch.softmax(tissue_logits_flat(x, self.tissue_model, self.temperature), 1))

        return map_voxels(mix, mri.reshape(b, c, -1))


class ImpedanceMapper(_TableMixin):
    """Tissue posteriors × acoustic table, θ = log c and log ρ per tissue.

    Args:
        tissue_model: contrast profiles for the image-only posteriors.
        temperature: posterior softening (see :func:`tissue_posteriors`).
        learn_attenuation: also make log α a parameter.
        learn_scatter: make the tissue echogenicity ``scatter_db`` (dB) a parameter
            (default; ``trifuse physics fit-us --paired`` fits it).

    Shape:
        forward(mri (B,4,D,H,W), brain (B,1,D,H,W) bool, labels (B,1,D,H,W) uint8)
        -> :class:`AcousticMaps` of (B,1,D,H,W) tensors.
    """

    def __init__(self, tissue_model: TissueModel = DEFAULT_TISSUE_MODEL, temperature: float = 1.5, learn_attenuation: bool = False,
                 learn_scatter: bool = True):
        super().__init__()
        if tuple(tissue_model.names) != BRAIN_TISSUES:
            raise ValueError(f"tissue model classes {tissue_model.names} must be {BRAIN_TISSUES}")
        self.tissue_model = tissue_model
        self.temperature = float(temperature)
        self.learn_attenuation = bool(learn_attenuation)
        self.learn_scatter = bool(learn_scatter)
        self._init_table(learn_attenuation, learn_scatter)

    def forward(self, mri: torch.Tensor, brain: torch.Tensor, labels: torch.Tensor) -> AcousticMaps:
        table = self.property_table()  # (10, 3)
        b = mri.shape[0]
        inside = self._inside(mri, table)
        br = brain.reshape(b, 1, -1).bool()
        maps = torch.where(br, inside, self._outside(labels, table).to(inside.dtype)).reshape(b, 3, *mri.shape[2:])
        return AcousticMaps(maps[:, 0:1], maps[:, 1:2], maps[:, 2:3])


class DiffUSMapper(_TableMixin):
    """DiffUS-style learnable intensity → impedance MLP (1→32→32→1, softplus, MRayl).

    The MLP runs per voxel on one z-scored contrast (default T2) inside the brain;
    attenuation and backscatter still come from tissue posteriors × table, and the
    geometric tissues from the table, so only the impedance is MLP-driven, as in
    DiffUS.

    Args:
        channel: MRI channel index fed to the MLP (``trifuse.keys.T1`` ... ``FLAIR``).
        hidden: width of the two hidden layers (32 in DiffUS).
        tissue_model, temperature: for the attenuation/backscatter posteriors.
    """

    def __init__(self, channel: int = keys.T2, hidden: int = 32, tissue_model: TissueModel = DEFAULT_TISSUE_MODEL, temperature: float = 1.5):
        super().__init__()
        self.channel = int(channel)
        self.tissue_model = tissue_model
        self.temperature = float(temperature)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        # start near brain impedance: softplus(b) = 1.6 MRayl  ->  b = log(exp(1.6) - 1)
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.fill_(math.log(math.expm1(1.6)))
        self._init_table(False)

    def forward(self, mri: torch.Tensor, brain: torch.Tensor, labels: torch.Tensor) -> AcousticMaps:
        table = self.property_table()
        b = mri.shape[0]
        # the per-voxel MLP as matrix products over flattened voxels (no (V, 1) copies)
        def mlp(h: torch.Tensor) -> torch.Tensor:
            for layer in self.mlp:
                h = torch.matmul(layer.weight, h) + layer.bias.view(1, -1, 1) if isinstance(layer, nn.Linear) else layer(h)
            return F.softplus(h)

        z_brain = map_voxels(mlp, mri[:, self.channel : self.channel + 1].reshape(b, 1, -1))  # (B, 1, V) MRayl
        inside = self._inside(mri, table)
        outside = self._outside(labels, table).to(inside.dtype)
        br = brain.reshape(b, 1, -1).bool()
        maps = torch.where(br, torch.cat([z_brain, inside[:, 1:]], 1), outside).reshape(b, 3, *mri.shape[2:])
        return AcousticMaps(maps[:, 0:1], maps[:, 1:2], maps[:, 2:3])
