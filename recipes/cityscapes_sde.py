"""Cityscapes SDE (paper §4.4): segmentation supervised, depth self-supervised from leftImg8bit_sequence.

    accelerate launch recipes/cityscapes_sde.py [--toy] [--model mteb|3ways-padnet|mtl] [--init-from RUN]
                                       [--data-root D] [--out O] [key=value ...]

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.

"3-ways_mTEB" is --model mteb, "3-ways_PAD-Net" is --model 3ways-padnet. Depth is evaluated against
disparity-derived depth with per-image median scaling and an 80 m cap.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.cli import main  # noqa: E402
from uda.selfsupervised import sde_config, sde_parser  # noqa: E402

if __name__ == "__main__":
    main(lambda args: sde_config(args, depth_only=False), sde_parser(__doc__), "cityscapes_sde")
