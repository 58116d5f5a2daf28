"""The multi-task UDA setting (paper §4.5): configs for source -> Cityscapes recipes and their Table 6 variants."""

from __future__ import annotations

import argparse
from dataclasses import replace

from uda.cli import TOY_SIZE, base_parser
from uda.config import (
    AdaptConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    SelfTrainingConfig,
    TrainConfig,
)
from uda.selfsupervised import with_photometric

# mIoU* of SYNTHIA -> Cityscapes: the 16 classes without wall, fence and pole.
CLASSES_13_OF_16 = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
# --method: (adversarial, self-training) objectives on, and the run's name.
METHODS = {
    "adversarial": (True, False, "uda"),
    "self-training": (False, True, "st"),
    "self-training+adversarial": (True, True, "st-adv"),
    "adabn": (False, False, "adabn"),  # source labels; target images only move target BatchNorm statistics
    "none": (False, False, "target"),
}
# VKITTI2 (1242x375) as the authors' VK -> CS code feeds it: resized to 1696x512 (aspect ratio kept,
# 1242 * 512 / 375 = 1695.7), then randomly cropped to the 1024x512 working size; (height, width).
VKITTI2_RESIZE_TO = (512, 1696)


def adaptation_parser(description: str) -> argparse.ArgumentParser:
    """The recipe options plus the Table 6 variants."""
    parser = base_parser(description)
    variant = parser.add_mutually_exclusive_group()
    variant.add_argument(
        "--no-adapt",
        action="store_true",
        help="source only: train on the labelled source, evaluate on the target",
    )
    variant.add_argument("--oracle", action="store_true", help="oracle: train on the target's own labels")
    parser.add_argument(
        "--optim-preset",
        choices=["paper", "released"],
        default="paper",
        help="optimiser: the paper's stated settings (Adam 2e-4/3e-4, x0.1 at 3/4 of the run, clip 10; STL: "
        "SGD), or the authors' released DA configs (Adam 1.5e-5/2.5e-4, constant, no clipping, every model)",
    )
    parser.set_defaults(paper_tables=True)  # the recipes of Table 6: the paper's baselines
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default=None,
        help="how the model adapts to the unlabelled target: output-level adversarial alignment (the paper's; "
        "default), self-training (EMA teacher, pseudo-labels for every task, ClassMix; tune with "
        "self_training.* keys, e.g. self_training.mix=depthmix self_training.rare_class_sampling=true), both, "
        "adabn (no target loss: target images only give BatchNorm its target statistics, train.bn_mode=domain, "
        "which the self-training methods use too and the adversarial one takes as an option), or none (only "
        "--target-depth photometric adapts, if set)",
    )
    parser.add_argument(
        "--target-depth",
        choices=["adversarial", "photometric", "both"],
        default="adversarial",
        help="how depth adapts to the unlabelled target: the depth discriminator (default), self-supervised "
        "photometric losses on target video (leftImg8bit_sequence) instead, or both",
    )
    return parser


def adaptation_config(
    args: argparse.Namespace, source: str, source_labels: str, target_labels: str
) -> ExperimentConfig:
    """SYNTHIA/VKITTI2 -> Cityscapes, S-D, mTEB, lambda_adv 5e-3, evaluated on Cityscapes val at 1024x512 with
    per-image median depth scaling (depth scale is ambiguous across domains)."""
    size = (512, 1024)
    resize_to = None
    if source == "vkitti2":
        # --toy later sets data.size to TOY_SIZE (uda.cli.finalise): scale resize_to by the same factor, so
        # the toy run also trains on undistorted crops of the resized source (96x318 -> 96x192).
        f = TOY_SIZE[0] / size[0] if args.toy else 1.0
        resize_to = (round(VKITTI2_RESIZE_TO[0] * f), round(VKITTI2_RESIZE_TO[1] * f))
    src = DataConfig(
        dataset=source,
        label_set=source_labels,
        size=size,
        variation="clone" if args.toy else "15-deg-left",
        resize_to=resize_to,
        train_split="all",  # the whole labelled source, as released (9,400 SYNTHIA / 2,126 VKITTI2 frames)
    )
    tgt = DataConfig(dataset="cityscapes", label_set=target_labels, size=size)
    cfg = ExperimentConfig(
        tasks=("semseg", "depth"),
        model=ModelConfig(arch="mteb"),
        data=src,
        target=tgt,
        adapt=AdaptConfig(),
        train=TrainConfig(iterations=40000, val_every=2000, ckpt_every=2000),
        eval=EvalConfig(
            median_scaling=True,
            subset_classes=CLASSES_13_OF_16 if target_labels == "cityscapes16" else (),
        ),
    )
    if args.target_depth != "adversarial" and not (args.no_adapt or args.oracle):
        cfg = with_photometric(cfg, "target")
        if args.target_depth == "photometric":
            cfg = replace(cfg, adapt=replace(cfg.adapt, tasks=("semseg",)))
    method = getattr(args, "method", None)
    if method is not None and (args.no_adapt or args.oracle):
        raise ConfigError(
            f"--method {method} adapts to the target; --no-adapt and --oracle do not adapt: drop one of them"
        )
    if args.no_adapt:
        return replace(cfg, name="source", adapt=None)
    if args.oracle:
        return replace(cfg, name="oracle", data=replace(tgt), adapt=None)
    adversarial, self_training, name = METHODS[method or "adversarial"]
    if not adversarial:
        cfg = replace(cfg, adapt=None)
    if self_training or method == "adabn":
        # Self-training's teacher labels target images: with the source's BatchNorm statistics a toy source-only
        # start calls the target's vegetation building, and the pseudo-labels teach it (README, self-training).
        cfg = replace(cfg, train=replace(cfg.train, bn_mode="domain"))
    if self_training:
        cfg = replace(cfg, self_training=SelfTrainingConfig())
    if args.target_depth != "adversarial":
        name = f"{name}-{args.target_depth}" if name != "target" else args.target_depth
    elif name == "target":  # nothing adapts: the source-only run
        name = "source"
    return replace(cfg, name=name)
