"""Supervised multi-task learning on SYNTHIA RAND_CITYSCAPES, 16 classes, 1024x512.

    accelerate launch recipes/synthia.py [--toy] [--tasks SD|SDN|SDNE] [--model stl|mtl|padnet|3ways-padnet|mteb]
                                       [--data-root D] [--out O] [key=value ...]

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
