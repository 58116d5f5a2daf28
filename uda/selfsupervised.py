"""Self-supervised monocular depth settings (paper §4.4): Cityscapes SDE and photometric target depth in UDA."""

from __future__ import annotations

import argparse
from dataclasses import replace

from uda.cli import base_parser
from uda.config import (
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PhotometricConfig,
    TrainConfig,
    apply_overrides,
)

# Toy schedules are a few hundred steps: the paper's fine-tuning rates (1e-5 / 5e-5 / 1e-6) would not move.
TOY_RATES = ["optim.lr_backbone=1e-4", "optim.lr_decoder=3e-4", "photometric.lr_pose=1e-4"]


def with_photometric(cfg: ExperimentConfig, domain: str) -> ExperimentConfig:
    """Learn depth by view synthesis on `domain`'s video: sigmoid disparity head at scales 0-3 + pose net."""
    photometric = PhotometricConfig(domain=domain)
    model = replace(cfg.model, depth_output="disparity", output_scales=photometric.scales)
    return replace(cfg, photometric=photometric, model=model)


def sde_parser(description: str, default_model: str = "mteb") -> argparse.ArgumentParser:
    """Recipe options plus --init-from (the depth-only run that initialises the model)."""
    parser = base_parser(description, default_model)
    parser.add_argument(
        "--init-from",
        default=None,
        metavar="RUN",
        help="run or checkpoint folder of a depth-only run (recipes/cityscapes_depth.py) whose "
        "weights initialise the encoder, both decoders and the pose network",
    )
    return parser


def sde_config(args: argparse.Namespace, depth_only: bool) -> ExperimentConfig:
    """Cityscapes: segmentation supervised (16 classes), depth self-supervised from leftImg8bit_sequence; Adam
    (0.9, 0.999), learning rates 1e-5 encoder / 5e-5 decoders / 1e-6 pose net, uniform task weights; depth
    evaluated against disparity depth with per-image median scaling and an 80 m cap."""
    tasks = ("depth",) if depth_only else ("semseg", "depth")
    cfg = ExperimentConfig(
        tasks=tasks,
        model=ModelConfig(arch="mtl" if depth_only else "mteb"),
        data=DataConfig(dataset="cityscapes", label_set="cityscapes16", size=(512, 1024)),
        loss=LossConfig(weights={t: 1.0 for t in tasks}),
        optim=OptimConfig(lr_backbone=1e-5, lr_decoder=5e-5, betas=(0.9, 0.999)),
        train=TrainConfig(
            iterations=40000, val_every=2000, ckpt_every=2000, init_from=getattr(args, "init_from", None)
        ),
        eval=EvalConfig(median_scaling=True, max_depth=80.0),
    )
    cfg = with_photometric(cfg, "source")
    if depth_only:  # Monodepth2's rate for training depth from scratch
        cfg = replace(
            cfg,
            optim=replace(cfg.optim, lr_backbone=1e-4, lr_decoder=1e-4),
            photometric=replace(cfg.photometric, lr_pose=1e-4),
        )
    if args.toy:
        cfg = apply_overrides(cfg, TOY_RATES)
    return cfg
