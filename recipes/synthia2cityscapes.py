"""Multi-task UDA, SYNTHIA (labelled) -> Cityscapes (unlabelled): semantic segmentation (16 classes) + depth.

    accelerate launch recipes/synthia2cityscapes.py [--toy] [--model stl|mtl|mteb] [--no-adapt | --oracle]
                                                   [--tasks SD|SDN] [--target-depth adversarial|photometric|both]
                                                   [--method adversarial|self-training|self-training+adversarial|none]
                                                   [--optim-preset paper|released] [--data-root D] [--out O]
                                                   [key=value ...]

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.

`--method self-training` adapts by an EMA teacher's pseudo-labels for every task on ClassMix-ed target images
(self_training.mix=depthmix for depth-aware mixing), `--method self-training+adversarial` adds the discriminators.

Rows of the paper's Table 6: `--oracle` (target), `--no-adapt` (source only), default (UDA), each with --model.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.adaptation import adaptation_config, adaptation_parser  # noqa: E402
from uda.cli import main  # noqa: E402

if __name__ == "__main__":
    main(
        lambda args: adaptation_config(
            args, source="synthia", source_labels="synthia16", target_labels="cityscapes16"
        ),
        adaptation_parser(__doc__),
        "synthia2cityscapes",
    )
