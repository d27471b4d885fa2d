"""Pixel tier: MRI → simulated ultrasound and synthetic CT (pure torch, differentiable).

Modules: :mod:`~trifuse.physics.tissues` (tissue table, image-only posteriors, head
layers), :mod:`~trifuse.physics.ct` (Gaussian-mixture CT), :mod:`~trifuse.physics.acoustic`
(impedance mappers), :mod:`~trifuse.physics.ultrasound` (ray simulator),
:mod:`~trifuse.physics.transforms` (sample transforms), :mod:`~trifuse.physics.figure`.
"""
from trifuse.physics.acoustic import AcousticMaps, DiffUSMapper, ImpedanceMapper
from trifuse.physics.ct import CTMixtureModel, fit_ct_from_samples, fit_ct_gmr, fit_ct_mixture, synthesize_ct
from trifuse.physics.tissues import TISSUES, HeadConfig, Tissue, TissueModel, tissue_posteriors
from trifuse.physics.transforms import SimulateUltrasound, SynthesizeCT
from trifuse.physics.ultrasound import ProbeConfig, UltrasoundSimulator, simulate_ultrasound


def render_physics_figure(sample, out_png, ct_model=None, **kwargs):
    """See :func:`trifuse.physics.figure.render_physics_figure` (matplotlib imported lazily)."""
    from trifuse.physics.figure import render_physics_figure as _render

    return _render(sample, out_png, ct_model=ct_model, **kwargs)


__all__ = [
    "AcousticMaps", "DiffUSMapper", "ImpedanceMapper", "CTMixtureModel", "fit_ct_from_samples", "fit_ct_gmr",
    "fit_ct_mixture", "synthesize_ct", "TISSUES", "HeadConfig", "Tissue", "TissueModel", "tissue_posteriors",
    "SimulateUltrasound", "SynthesizeCT", "ProbeConfig", "UltrasoundSimulator", "simulate_ultrasound",
    "render_physics_figure",
]
