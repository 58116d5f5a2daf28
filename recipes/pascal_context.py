"""Supervised multi-task learning on PASCAL-Context (MTI-Net / ATRC protocol): 21 classes, human parts, saliency,
normals and boundaries at 512x512.

    accelerate launch recipes/pascal_context.py [--toy] [--tasks SPA|SPANE] [--model M]
                                                [--data-root D] [--out O] [key=value ...]

Data: the multi-task PASCAL-Context folder (datasets/pascal_context/README.md), 4,998 train / 5,105 val images.
Tasks: SPANE = semseg, parts, saliency, normals, edges (default); SPA = semseg, parts, saliency (the "small" set).
Loss weights of the literature (MTI-Net, ATRC): semseg 1, parts 2, saliency 5, normals 10, edges 50; parts:
cross-entropy ignoring images without people; saliency: balanced BCE; normals: cosine; edges: BCE with positive
weight 0.95.

Pad-and-resize protocol (ATRC, data.fit=pad): training scales each image by a random factor in [0.5, 2.0]
(data.scale_range), crops a random 512x512 window where it is larger and pads it, centred, to 512x512 where it
is smaller (labels with their ignore value), flips horizontally; evaluation pads every image, centred, to
512x512 without resizing (PASCAL images are at most 500 px a side), so every metric is computed on the image's
own pixels. Optimiser: Adam 1e-4, weight decay 1e-4 (as MTI-Net / ATRC; they decay the rate polynomially, we
with the step schedule of optim.lr_step_fraction), 40,000 iterations of batch 8.

Models M: every --model (ATRC's label contexts: parts over the part classes, saliency binary).
Edges are validated with F1 at 0.5; the tables of the literature use odsF at maxDist 0.0075 (set here):
eval.edge_metric=odsf. --toy: the toy PASCAL-Context (street scenes in the same layout, images of at most
94 px padded to the toy size).

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda import cli  # noqa: E402
from uda.config import (  # noqa: E402
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
)

RECIPE = "pascal_context"
SIZE = (512, 512)
# PASCAL-Context boundaries are matched within 0.0075 of the image diagonal (ATRC's README for SEISM).
EDGE_MAX_DIST = 0.0075


def build(args) -> ExperimentConfig:
    """The PASCAL-Context config of the MTI-Net / ATRC protocol (weights: the preset of the task set)."""
    data = DataConfig(
        dataset="pascal_context",
        label_set="pascal_context21",
        size=SIZE,
        fit="pad",
        scale_range=(0.5, 2.0),
        hflip=True,
        batch_size=8,
    )
    return ExperimentConfig(
        tasks=cli.TASK_SETS["SPANE"],
        data=data,
        loss=LossConfig(),  # empty weights: the literature's preset of the task set (uda.losses)
        optim=OptimConfig(optimizer="adam", lr_backbone=1e-4, lr_decoder=1e-4, weight_decay=1e-4),
        train=TrainConfig(iterations=40000, val_every=2000, ckpt_every=2000),
        eval=EvalConfig(edge_max_dist=EDGE_MAX_DIST),
    )


def main(argv=None):
    """Parse and run."""
    parser = cli.base_parser(__doc__, default_model="mtl")
    return cli.main(build, parser, RECIPE, argv)


if __name__ == "__main__":
    main()
