"""XTasC's Cityscapes protocol (Nakano, Chen, Demachi 2021, Table I): 7-class segmentation + depth at 128x256.

    accelerate launch recipes/cityscapes7.py [--toy] [--model xtasc-unet|xtasc-stl|mtl|...]
                                             [--consistency none|consistency|alignment]
                                             [--data-root D] [--out O] [key=value ...]

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.

The rows of its Table I, each with uncertainty weighting (this recipe's loss.weighting):
    --model xtasc-stl                                   Base ST-Net (one U-Net per task)
    --model xtasc-unet                                  Base MT-Net
    --model xtasc-unet --consistency alignment          Align-Net
    --model xtasc-unet --consistency consistency        XTasC-Net
and MTL with each task weighting: --model xtasc-unet loss.weighting=fixed|uncertainty|dwa|gradnorm.

Settings of the paper: ResNet-34 U-Net without ImageNet weights, Adam at 1e-4 halved every 80 epochs for 250
epochs (372 steps of batch 8 per epoch), lambda = 0.01 per task, L1 depth loss on inverse depth (the
network regresses 1/depth in 1/m: loss.d_far=1), horizontal flips and scale crops in [1, 1.5]; labels: the 7
Cityscapes categories (label set cityscapes7). Depth is evaluated in metres (from disparity, 80 m cap).
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.cli import base_parser, main, supervised_config  # noqa: E402

STEPS_PER_EPOCH = 372  # 2,975 train images / batch 8


def build(args):
    cfg = supervised_config("cityscapes", "cityscapes7", (128, 256), "SD", lr_backbone=1e-4, lr_decoder=1e-4)(
        args
    )
    return replace(
        cfg,
        # Depth is regressed as inverse depth in 1/m (d_far = 1 m: g = 1 / depth), starting at 1/20 m.
        model=replace(cfg.model, backbone="resnet34", pretrained=False, depth_init=1 / 20),
        data=replace(cfg.data, batch_size=8, scale_range=(1.0, 1.5)),
        loss=replace(
            cfg.loss,
            weights={"semseg": 1.0, "depth": 1.0},
            d_far=1.0,
            functions={"depth": "l1"},
            weighting="uncertainty",
        ),
        optim=replace(cfg.optim, betas=(0.9, 0.999), lr_gamma=0.5, lr_step_every=80 * STEPS_PER_EPOCH),
        train=replace(
            cfg.train,
            iterations=250 * STEPS_PER_EPOCH,
            val_every=10 * STEPS_PER_EPOCH,
            ckpt_every=10 * STEPS_PER_EPOCH,
        ),
    )


if __name__ == "__main__":
    main(build, base_parser(__doc__, default_model="xtasc-unet"), "cityscapes7")
