"""Sample-dict keys, modality order and region order: defined once, used everywhere.

A sample is a ``dict``; tensors are channel-first, ``(C, D, H, W)`` per sample and
``(B, C, D, H, W)`` per batch (see ``shared/DESIGN.md``, "The sample").
"""
from __future__ import annotations

# --- sample keys -----------------------------------------------------------------
MRI = "mri"  #: (4, D, H, W) float32, order MODALITIES
US = "us"  #: (1, D, H, W) float32 simulated ultrasound in [0, 1]
CT = "ct"  #: (len(CT_WINDOWS), D, H, W) float32 synthetic CT, one channel per window of CT_WINDOWS, each in [0, 1]
LABEL = "label"  #: (3, D, H, W) uint8 regions, order REGIONS (nested, largest first)
SEG = "seg"  #: (1, D, H, W) uint8 raw label map in the dataset's own convention
BRAIN = "brain"  #: (1, D, H, W) bool brain mask
PRIOR = "prior"  #: (3, d, h, w) float16 semantic priors for REGIONS
TEXT = "text"  #: (E,) pooled description embedding
CASE_ID = "case_id"  #: str
META = "meta"  #: dict: affine, spacing, year, convention, crop box, applied transforms

IMAGE_KEYS = (MRI, US, CT)

# --- CT encoding -------------------------------------------------------------------
#: Synthetic-CT channels: (name, low HU, high HU); channel value = clip((HU - low) / (high - low), 0, 1).
#: "brain": the standard brain window (level 40, width 80 HU): CSF ~0.1, white matter ~0.3, grey
#: matter ~0.5, enhancing tumour ~0.45 -- the brain tissues fill about half of the channel.
#: "bone": a wide window from air to beyond cortical bone (-1000 to 2200 HU): air 0, soft tissue ~0.32,
#: diploë 0.56, cortical tables (1800 HU) 0.88, so the skull is not saturated.
CT_WINDOWS = (("brain", 0.0, 80.0), ("bone", -1000.0, 2200.0))
CT_CHANNELS = len(CT_WINDOWS)
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
