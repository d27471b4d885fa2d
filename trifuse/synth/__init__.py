"""Synthetic BraTS-like cohort on real MNI152 anatomy."""
from trifuse.synth.cohort import SIZES, generate_case, synthesize_cohort, write_case_folder

__all__ = ["SIZES", "generate_case", "synthesize_cohort", "write_case_folder"]
