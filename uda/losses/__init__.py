"""uda.losses: supervised task losses, the multi-task objective and adversarial helpers."""

from uda.losses.adversarial import (
    SOURCE_LABEL,
    TARGET_LABEL,
    bce_with_domain,
    entropy_map,
    normalise_depth_for_discriminator,
)
from uda.losses.tasks import (
    D_FAR,
    IGNORE_INDEX,
    TASK_LOSSES,
    TASK_WEIGHT_PRESETS,
    MultiTaskLoss,
    berhu,
    default_task_weights,
    depth_loss,
    edges_loss,
    normals_loss,
    resize_to,
    semseg_loss,
)

__all__ = [
    "D_FAR",
    "IGNORE_INDEX",
    "SOURCE_LABEL",
    "TARGET_LABEL",
    "TASK_LOSSES",
    "TASK_WEIGHT_PRESETS",
    "MultiTaskLoss",
    "bce_with_domain",
    "berhu",
    "default_task_weights",
    "depth_loss",
    "edges_loss",
    "entropy_map",
    "normalise_depth_for_discriminator",
    "normals_loss",
    "resize_to",
    "semseg_loss",
]
