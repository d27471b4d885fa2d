"""BraTS region metrics on top of MONAI: functions first, a torchmetrics ``Metric``, folder reports."""
from trifuse.metrics.brats import BratsRegionMetrics, binarize
from trifuse.metrics.functional import (
    batch_region_dice_hd95,
    compute_region_dice,
    compute_region_hd95,
    hd95_single,
    lesion_wise_dice_hd95,
    region_dice_hd95,
)

__all__ = [
    "BratsRegionMetrics",
    "binarize",
    "batch_region_dice_hd95",
    "compute_region_dice",
    "compute_region_hd95",
    "hd95_single",
    "lesion_wise_dice_hd95",
    "region_dice_hd95",
    "evaluate_folder",
]


def __getattr__(name):
    # report pulls in the io layer (nibabel); import it only when asked for
    if name == "evaluate_folder":
        from trifuse.metrics.report import evaluate_folder

        return evaluate_folder
    raise AttributeError(name)
