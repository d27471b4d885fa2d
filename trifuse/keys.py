"""Sample-dict keys, modality order and region order: defined once, used everywhere.

A sample is a ``dict``; tensors are channel-first, ``(C, D, H, W)`` per sample and
``(B, C, D, H, W)`` per batch (see ``shared/DESIGN.md``, "The sample").
"""
from __future__ import annotations

# --- sample keys -----------------------------------------------------------------
MRI = "mri"  #: (4, D, H, W) float32, order MODALITIES
US = "us"  #: (1, D, H, W) float32 simulated ultrasound in [0, 1]
CT = "ct"  #: (1, D, H, W) float32 synthetic CT, HU / 1000 clipped to about [-1, 1]
LABEL = "label"  #: (3, D, H, W) uint8 regions, order REGIONS (nested, largest first)
SEG = "seg"  #: (1, D, H, W) uint8 raw label map in the dataset's own convention
BRAIN = "brain"  #: (1, D, H, W) bool brain mask
PRIOR = "prior"  #: (3, d, h, w) float16 semantic priors for REGIONS
TEXT = "text"  #: (E,) pooled description embedding
CASE_ID = "case_id"  #: str
META = "meta"  #: dict: affine, spacing, year, convention, crop box, applied transforms

IMAGE_KEYS = (MRI, US, CT)
LABEL_KEYS = (LABEL, SEG, BRAIN)

# --- modalities --------------------------------------------------------------------
#: canonical MRI channel order of ``sample[MRI]``
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: file suffixes per BraTS release, in canonical order (2023 renamed the contrasts)
MODALITY_SUFFIXES = {
    2020: ("t1", "t1ce", "t2", "flair"),
    2021: ("t1", "t1ce", "t2", "flair"),
    2023: ("t1n", "t1c", "t2w", "t2f"),
}
T1, T1CE, T2, FLAIR = range(4)  #: channel indices into sample[MRI]

#: teacher modalities of the feature tier
TEACHER_MODALITIES = ("mri", "us", "ct")

# --- regions -----------------------------------------------------------------------
REGIONS = ("WT", "TC", "ET")  #: nested, largest first
WT, TC, ET = range(3)  #: channel indices into sample[LABEL]

#: BraTS image diagonal in mm (240, 240, 155 at 1 mm): HD95 when exactly one mask is empty
HD95_EMPTY_MM = 373.128664

YEARS = (2020, 2021, 2023)
