"""Supervised multi-task learning on SYNTHIA RAND_CITYSCAPES, 16 classes, 1024x512.

    accelerate launch recipes/synthia.py [--toy] [--tasks SD|SDN|SDNE] [--model M]
                                       [--data-root D] [--out O] [key=value ...]

Models M: stl, mtl, padnet, 3ways-padnet, mteb, cross-stitch, pap-net, ctal on the dilated ResNets
(model.backbone=resnet18..101); stl, mtl, padnet, mteb, cross-stitch, pap-net, ctal, mti-net, ctal-ms on the
multi-scale backbones (model.backbone=hrnetv2-w18-small|hrnetv2-w18|hrnetv2-w48|fpn-resnet18|fpn-resnet50).

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.

Default task set: SD; task weights: the paper's preset for the task set.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.cli import supervised_recipe  # noqa: E402

if __name__ == "__main__":
    supervised_recipe("synthia", __doc__, "synthia", "synthia16", (512, 1024), "SD")
