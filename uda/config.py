"""Typed configuration: dataclasses, strict dict loading, and `section.key=value` command-line overrides.

Unknown keys and ill-typed values are errors that name the key and list what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

Task = Literal["semseg", "depth", "normals", "edges", "parts", "saliency"]
Arch = Literal[
    "stl",
    "mtl",
    "padnet",
    "3ways-padnet",
    "mteb",
    "cross-stitch",
    "pap-net",
    "ctal",
    "mti-net",
    "ctal-ms",
    "atrc",
    "atrc-fpm",
    "xtasc-unet",
    "xtasc-stl",
]
# Dilated torchvision ResNets (output stride 16), and the multi-scale backbones (strides 4..32): HRNetV2
# through timm, FPN on a plain ResNet.
Backbone = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "hrnetv2-w18-small",
    "hrnetv2-w18",
    "hrnetv2-w48",
    "fpn-resnet18",
    "fpn-resnet50",
]


class ConfigError(ValueError):
    """A configuration key or value that cannot be used (the message names it and the fix)."""


@dataclass
class ModelConfig:
    """Which network to build: encoder, decoders, exchange block and its options."""

    arch: Arch = "mteb"
    backbone: Backbone = "resnet101"
    pretrained: bool = True  # ImageNet weights through torchvision
    weights_path: str | None = None  # local copy of the torchvision ImageNet weights (.pth)
    # The task decoder of stl/mtl: 3-ways (ASPP 6/12/18 + 4 upsampling stages) or the DeepLab head of the MTL
    # survey (ASPP 12/24/36 + 3x3 + 1x1 at output stride 16) used by the paper's STL/MTL baselines.
    decoder: Literal["3ways", "deeplab"] = "3ways"
    decoder_channels: tuple[int, ...] = (64, 128, 128, 256, 256)  # fine (scale 0) to coarse (scale 4)
    exchange_scales: tuple[int, ...] = (1,)  # decoder scales where the exchange block sits (1..4)
    fusion: Literal["add", "prod", "concat"] = "add"  # mTEB fusion, paper Table 4a
    attention: Literal["spatial", "channel", "both"] = "spatial"  # xTAM correlation type, Table 4b
    self_attention: bool = True  # xTAM self-attention branch, App. A.2
    downscale: int = 4  # xTAM token downscale s
    cross_stitch_init: float = (
        0.9  # cross-stitch units' self weight at initialisation (1.0 = separate networks)
    )
    # PAP-Net and CTAL: blend of the propagated features, out = gamma * propagated + (1 - gamma) * f (PAP-Net's
    # and CTAL's 0.05); CTAL's fusion filter size f; PAP-Net's number of diffusion iterations.
    affinity_gamma: float = 0.05
    ctal_kernel: int = 3
    pap_iterations: int = 1
    # MTI-Net: tasks predicted in the front end only (deep supervision at every scale, no final prediction; its
    # "(N)", "(N+E)" rows), and the feature propagation module between scales.
    aux_tasks: tuple[str, ...] = ()
    fpm: bool = True
    depth_output: Literal["inverse", "disparity"] = "inverse"  # linear d_far/d, or sigmoid disparity (SDE)
    output_scales: tuple[int, ...] | None = None  # side outputs; None = exchange scales + final scale 0
    # Initial raw depth output (inverse normalised depth d_far/d): 32.768 = 20 m with d_far = 655.36 m.
    depth_init: float = 32.768
    sync_bn: bool = False  # SyncBatchNorm across processes (GPUs only; torch has no CPU version)
    # Activation checkpointing of the encoder blocks, decoder stages and exchange attention: their activations
    # are recomputed in the backward pass (less memory for large inputs, about a third more compute).
    checkpointing: bool = False
    # ATRC (atrc, atrc-fpm): the context of every CP block, one of global, local, tlabel, slabel, none (the
    # fixed-context baselines of ATRC's Table 1), or a JSON file {"<target>": {"<source>": "<context>"}} (a
    # searched architecture). Label spaces of the auxiliary predictions: depth in atrc_depth_bins log-scale bins
    # (range: label_context.depth_range); normals: the centroids of normal_clusters (a JSON file written by
    # uda-normal-clusters) or, without one, atrc_normal_clusters Fibonacci-sphere directions.
    atrc_contexts: str = "global"
    # model.atrc_contexts=search (ATRC's context-type search, recipes/atrc_search.py): the Gumbel-softmax
    # temperature lambda of Eq. 7 mixing each block's five candidates in training (the seed gives no value).
    atrc_search_temperature: float = 1.0
    atrc_depth_bins: int = 40
    normal_clusters: str | None = None
    atrc_normal_clusters: int = 40


@dataclass
class DataConfig:
    """One dataset as used by a run: which files, which label set, which working size and augmentation."""

    dataset: Literal["synthia", "cityscapes", "vkitti2", "nyudv2", "pascal_context"] = "synthia"
    root: str | None = None  # dataset folder; None = datasets/<dataset>
    label_set: str = "cityscapes16"
    train_split: str = "train"
    val_split: str = "val"
    size: tuple[int, int] = (512, 1024)  # working (height, width) after resizing
    scale_range: tuple[float, float] = (1.0, 1.0)  # random rescale before the crop to `size`
    hflip: bool = True
    color_jitter: float = 0.0
    batch_size: int = 2
    num_workers: int = 2
    variation: str = "clone"  # VKITTI2 variation folder
    # (height, width) every sample is resized to before the random scale (relative to it) and the crop to
    # `size`, e.g. VKITTI2 375x1242 -> (512, 1696), aspect kept, then crop 512x1024; evaluation runs on the
    # whole image at resize_to. None = resize straight to the (scaled) `size`.
    resize_to: tuple[int, int] | None = None
    # VKITTI2 sky (depth PNG 65535): "far" = supervised as 655.35 m, as the authors (the < 80 m evaluation
    # cap removes it); "none" = 0, no measurement. Other datasets have no sky code and only accept "far".
    sky_depth: Literal["far", "none"] = "far"
    # How a sample reaches `size`: "resize" (resize_to or size, times the random scale, then crop), or "pad"
    # (PASCAL-Context as ATRC: the image keeps its own size times the random scale, is cropped where larger
    # and padded, centred, where smaller; evaluation pads to size without resizing).
    fit: Literal["resize", "pad"] = "resize"
    # Discrete random scales replacing scale_range when given (MTI-Net's NYUDv2 augmentation: 1,1.2,1.5).
    scale_choices: tuple[float, ...] = ()
    # Where the training window sits in the scaled image: random, or centred (MTI-Net's zoom about the centre).
    crop: Literal["random", "center"] = "random"

    def __post_init__(self) -> None:
        if self.resize_to is not None and min(self.resize_to) < 1:
            raise ConfigError(f"resize_to: {self.resize_to} must be (height, width) >= 1, or None")
        if self.sky_depth != "far" and self.dataset != "vkitti2":
            raise ConfigError(
                f"sky_depth={self.sky_depth!r} is an option of vkitti2 only ({self.dataset} reads its depth "
                "files as stored); remove the key"
            )


@dataclass
class LossConfig:
    """The supervised multi-task objective: task losses, their base weights and the task weighting method."""

    weights: dict[str, float] = field(default_factory=dict)  # empty = the paper's preset for the task set
    d_far: float = 655.36  # inverse normalised depth g = d_far / d (metres)
    functions: dict[str, str] = field(default_factory=dict)  # loss per task, e.g. depth:l1 (default berhu)
    # A task's intermediate-prediction losses: their mean added to the final one (DenseMTL Eq. 6), or their sum
    # (MTI-Net: every scale's initial prediction with the final loss weight; its default).
    intermediate: Literal["mean", "sum"] = "mean"
    # How the per-task losses (base weight x loss) are combined: fixed (the base weights alone), uncertainty
    # (Kendall et al. 2018), dwa (Liu et al. 2019, MTAN), gradnorm (Chen et al. 2018).
    weighting: Literal["fixed", "uncertainty", "dwa", "gradnorm"] = "fixed"
    weighting_lr: float = (
        0.025  # uncertainty: rate of the log-variances (model optimiser); gradnorm: Adam rate
    )
    dwa_period: int = 100  # DWA: steps over which task losses are averaged (MTAN: one epoch)
    dwa_temperature: float = 2.0
    gradnorm_alpha: float = 1.5  # GradNorm's restoring-force asymmetry


@dataclass
class OptimConfig:
    """Optimiser, learning rates and schedule of the multi-task model."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr_backbone: float = 2e-4
    lr_decoder: float = 3e-4
    # Architecture weights of a search (ATRC's context logits alpha): their own learning rate; None = lr_decoder.
    lr_architecture: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step_fraction: float = 0.75  # learning rate x gamma at this fraction of the iterations
    lr_step_every: int = 0  # if > 0: learning rate x gamma every this many steps instead (step decay)
    lr_gamma: float = 0.1
    clip_grad_norm: float = 10.0  # per independent network; <= 0: no clipping
    fused: bool = False  # torch's fused Adam/SGD kernels (one kernel for every parameter)


@dataclass
class TrainConfig:
    """The training loop: length, logging, validation, checkpoints, precision, seed."""

    iterations: int = 40000
    val_every: int = 2000
    ckpt_every: int = 2000
    log_every: int = 50
    image_every: int = 0  # write prediction images every N steps (0 = only at validation)
    # auto: bf16 on GPUs that support it and CPUs with AMX-BF16, fp16 with a scaler on older GPUs, else fp32.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    channels_last: bool = False  # channels-last memory format for the model and its inputs
    compile: bool = False  # torch.compile the model (through accelerate's dynamo plugin, inductor backend)
    # With compile: the share of the activations the compiled graph keeps for the backward pass (torch's
    # activation_memory_budget); below 1 it recomputes cheap operations instead of keeping their outputs.
    compile_memory_budget: float = 1.0
    # CPU runs: freed memory stays in the process for the next step instead of going back to the system and being
    # page-faulted in again every step (glibc; uda.hardware.keep_freed_memory): 0.76x the fp32 step time, same
    # peak memory at 256x512; it can raise peak memory elsewhere. Process-wide; false = the C library's defaults.
    keep_cpu_memory: bool = True
    seed: int = 42
    deterministic: bool = False
    max_bad_steps: int = 20  # consecutive non-finite losses before the run stops
    # How BatchNorm sees the domains of a mixed batch: "separate" = one forward per domain (per-domain batch
    # statistics, as the DenseMTL code); "joint" = one forward over the concatenated batch (equal image sizes);
    # "domain" = separate forwards and separate running statistics per domain, the target's used wherever the
    # network sees the target (AdaBN; uda.models.domain_bn). Runs without target images have one domain.
    bn_mode: Literal["separate", "joint", "domain"] = "separate"
    val_batches: int | None = None  # limit validation batches (None = the whole split)
    # Run or checkpoint folder whose weights initialise the model (and pose net); not read again once the run
    # has checkpoints of its own (a resume replaces every weight).
    init_from: str | None = None
    # bn_mode=domain from weights without target statistics (init_from a source-only run): target training
    # images, spread over the split, whose BatchNorm statistics start the target's (AdaBN); 0 = the source's.
    adabn_images: int = 64
    # Micro-batches per iteration: their gradients are summed (each loss / grad_accum) before the one optimiser
    # step of the iteration, so an iteration sees grad_accum x batch_size samples per domain.
    grad_accum: int = 1
    keep_checkpoints: int = 2  # newest complete checkpoints kept in <run>/checkpoints
    # Experiment trackers (accelerate): tensorboard, wandb, comet_ml, aim, mlflow, clearml, dvclive, or "none";
    # several as "tensorboard+wandb".
    log_with: str = "tensorboard"

    def __post_init__(self) -> None:
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum={self.grad_accum}: must be >= 1 (1 = no accumulation)")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints}: must be >= 1")
        if self.adabn_images < 0:
            raise ConfigError(f"train.adabn_images={self.adabn_images}: must be >= 0 (0 = keep the source's)")
        if not 0.0 < self.compile_memory_budget <= 1.0:
            raise ConfigError(
                f"train.compile_memory_budget={self.compile_memory_budget}: must lie in (0, 1] (1 = keep every "
                "activation the compiled graph would keep; 0.5 measured in README's speed section)"
            )
        if self.compile_memory_budget < 1.0 and not self.compile:
            raise ConfigError(
                f"train.compile_memory_budget={self.compile_memory_budget} acts on the compiled model only; set "
                "train.compile=true as well, or leave the budget at 1"
            )


@dataclass
class EvalConfig:
    """Evaluation protocol, explicit and logged with every result."""

    scale: int = 0  # which output scale is evaluated
    label_resolution: bool = False  # evaluate at the label files' native resolution
    median_scaling: bool = False
    min_depth: float = 1e-3
    max_depth: float = 80.0
    per_image: bool = True
    subset_classes: tuple[int, ...] = ()  # e.g. the 13 of 16 classes for mIoU*
    # Edges: "f1" at a fixed threshold, or "odsf" (the boundary benchmark of the MTI-Net / ATRC tables) with the
    # matching tolerance edge_max_dist as a fraction of the image diagonal (PASCAL-Context 0.0075, NYUDv2
    # 0.011; None = the metric's default).
    edge_metric: Literal["f1", "odsf"] = "f1"
    edge_max_dist: float | None = None


@dataclass
class AdaptConfig:
    """Output-level adversarial adaptation (paper Eqs. 7-9): one patch discriminator per (task, scale)."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("tasks", "scales", "disc_channels", "spectral_norm")
    NEEDS_TARGET: ClassVar[bool] = True  # ignored without a target domain

    lambda_adv: float = 5e-3
    tasks: tuple[Task, ...] = ("semseg", "depth")  # outputs aligned by a discriminator
    scales: tuple[int, ...] | None = None  # aligned scales; None = intermediate (exchange) scales + final 0
    disc_lr: float = 1e-4
    disc_betas: tuple[float, float] = (0.9, 0.99)
    disc_poly_power: float = 0.9
    disc_channels: int = 64
    spectral_norm: bool = True  # spectral-norm convolutions, as the authors' discriminator
    flip_inputs: bool = True  # mirror each discriminator's input batch with p = 1/2, as the authors' code
    depth_range: tuple[float, float] = (
        1.0,
        100.0,
    )  # fixed source depth range (m) normalising D's depth input
    start_step: int = 0  # adversarial terms switched on from this step


@dataclass
class PhotometricConfig:
    """Self-supervised depth from video (Monodepth2-style): the depth task is learnt by view synthesis."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("pose_backbone",)
    NEEDS_TARGET: ClassVar[bool] = False

    domain: Literal["source", "target"] = (
        "source"  # whose frames train depth (target = UDA without depth labels)
    )
    frames: tuple[int, ...] = (-1, 1)  # neighbouring frames warped onto the current one
    scales: tuple[int, ...] = (0, 1, 2, 3)  # disparity outputs used (each upsampled to full resolution)
    weight: float = 1.0  # weight of the photometric objective in the total loss
    smoothness_weight: float = 1e-3  # divided by 2^scale
    min_depth: float = 0.1  # metres: sigmoid disparity -> depth range
    max_depth: float = 100.0
    automask: bool = True
    lr_pose: float = 1e-6
    pose_backbone: Literal["resnet18", "resnet34"] = "resnet18"
    # Initial forward translation of the pose net per frame, in depth units (driving video moves forward;
    # see PoseNet): avoids the wrong-signed pose that joint training from scratch locks into. 0: Monodepth2.
    pose_init_forward: float = 0.015


@dataclass
class ConsistencyConfig:
    """Cross-task consistency (XTasC, Nakano et al. 2021): a task-transfer network per direction maps one task's
    prediction to the other task, compared with that task's own detached prediction (consistency, Eq. 13/15)
    or with its labels (alignment, "Align-Net")."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ("tasks", "channels")
    NEEDS_TARGET: ClassVar[bool] = False

    mode: Literal["consistency", "alignment"] = "consistency"
    tasks: tuple[Task, Task] = ("semseg", "depth")  # task-transfer networks in both directions
    # lambda_t of Eq. 11, in [0, 1): L_t = (1 - l) loss_t + l consistency_t (see the objective's docstring).
    lambdas: dict[str, float] = field(default_factory=lambda: {"semseg": 0.01, "depth": 0.01})
    domains: tuple[Literal["source", "target"], ...] = ("source",)  # target: no labels needed (adaptation)
    channels: tuple[int, ...] = (64, 128, 256)  # task-transfer U-Net widths, fine to coarse
    lr: float | None = None  # task-transfer networks' learning rate; None = optim.lr_decoder


@dataclass
class LabelContextConfig:
    """ATRC's auxiliary label-context supervision: cross-entropy of each task's auxiliary prediction (outputs
    [task]["aux"]) against its discretised labels (semseg classes, log-scale depth bins, nearest normal
    centroid, edge / no edge), attributed to the task (its task weight applies, as the authors' code adds the
    aux losses to each task's loss). Set by default for the ATRC architectures."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ()
    NEEDS_TARGET: ClassVar[bool] = False

    weight: float = 1.0  # factor on every aux cross-entropy (the authors' code: 1)
    # Log-scale depth bins between these depths (metres); beyond them the end bins. 0.5-80 m spans the driving
    # datasets up to the evaluation cap (eval.max_depth 80); NYUD-v2 (<= 10 m) may set (0.5, 10.0).
    depth_range: tuple[float, float] = (0.5, 80.0)

    def __post_init__(self) -> None:
        if not 0 < self.depth_range[0] < self.depth_range[1]:
            raise ConfigError(f"label_context.depth_range={self.depth_range}: must be 0 < min < max")


@dataclass
class ContextSearchConfig:
    """ATRC's context-type search (§3.3) with model.atrc_contexts=search: the entropy regulariser
    w(step) * mean H(p_alpha) over the blocks still searching, w linear from weight_start (negative: towards
    uniform p_alpha) at step 0 to weight_end (positive: towards one context) at the last step; after every
    step each searching block with H(p_alpha) < threshold nats (uniform over 5: ln 5 = 1.61) is fixed at its
    argmax. The chosen {target: {source: context}} is written to <run>/atrc_contexts.json at every checkpoint
    (argmax for the blocks still searching). The seed gives none of these values."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ()
    NEEDS_TARGET: ClassVar[bool] = False

    weight_start: float = -0.1
    weight_end: float = 0.1
    threshold: float = 0.3

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError(f"context_search.threshold={self.threshold}: must be >= 0 (nats)")


@dataclass
class SelfTrainingConfig:
    """Self-training on the target (DACS / DAFormer / CorDA family; uda.objectives.self_training): an EMA teacher
    of the whole model gives pseudo-labels on target images (segmentation weighted by the share of confident
    pixels, depth and normals where the teacher agrees with itself on the flipped image); the student learns
    them on strongly augmented, optionally source-mixed, target images."""

    SHAPE_KEYS: ClassVar[tuple[str, ...]] = ()  # the teacher has the model's shape
    NEEDS_TARGET: ClassVar[bool] = True  # ignored without a target domain

    tasks: tuple[Task, ...] = ("semseg", "depth", "normals")  # pseudo-labelled (those the run has)
    weight: float = 1.0  # factor on each pseudo-label term (added to its task's terms)
    alpha: float = 0.99  # EMA: teacher = alpha * teacher + (1 - alpha) * student after each applied step
    ema_ramp: bool = True  # alpha_t = min(1 - 1/(t + 1), alpha), t = student steps done (false: alpha)
    threshold: float = 0.968  # semseg quality weight = share of pixels whose max probability exceeds this
    # > 0: class-balanced pseudo-labels instead (CBST): per class, this most confident share of the batch's
    # pixels predicted as that class is labelled (weight 1), the rest not.
    class_portion: float = 0.0
    depth_agreement: float = 0.1  # reliable depth: |d - d_flip| / mean(d, d_flip) below this
    normals_agreement: float = 11.25  # reliable normals: angle to the flipped prediction below (degrees)
    # Geometry pseudo-labels (depth, normals) also only where the teacher's semseg confidence > threshold.
    confidence_gate: bool = False
    # Target rows without pseudo-labels (weight 0 for semseg, no label for depth/normals; pasted source pixels
    # keep theirs), as shares of the image height: DAFormer's psweight_ignore_top/bottom for Cityscapes, 15 and
    # 120 of its 512 rows (rectification border, ego vehicle), are 0.03 and 0.234. 0: every row labelled.
    ignore_top: float = 0.0
    ignore_bottom: float = 0.0
    mix: Literal["classmix", "depthmix", "none"] = "classmix"
    jitter: float = 0.2  # colour jitter strength (brightness, contrast, saturation; hue / 4)
    # probability of the colour jitter per image: DAFormer's 0.8 (its color_jitter_p = 0.2 is the probability of
    # skipping it: it jitters when a uniform draw exceeds 0.2)
    jitter_p: float = 0.8
    blur: bool = True  # Gaussian blur (sigma 0.15-1.15, p = 0.5) per image
    start_step: int = 0  # pseudo-label terms switched on from this step (the teacher follows from step 0)
    # Rare-class sampling of the source (DAFormer): p(c) ~ exp((1 - f_c) / T), then an image holding at least
    # rcs_min_pixels pixels of c (in its label file's resolution).
    rare_class_sampling: bool = False
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    # DAFormer's thing-class feature distance to a frozen ImageNet encoder (needs model.pretrained=true).
    feature_distance: bool = False
    fd_weight: float = 0.005
    fd_classes: tuple[str, ...] = (
        "traffic light",
        "traffic sign",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
        "vehicle",
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"self_training.alpha={self.alpha}: must be in [0, 1) (0.99 = slow teacher)")
        if self.rcs_temperature <= 0:
            raise ConfigError(f"self_training.rcs_temperature={self.rcs_temperature}: must be > 0 (0.01)")
        if not (
            0.0 <= self.ignore_top and 0.0 <= self.ignore_bottom and self.ignore_top + self.ignore_bottom < 1
        ):
            raise ConfigError(
                f"self_training.ignore_top/ignore_bottom={self.ignore_top}/{self.ignore_bottom}: shares of the image "
                "height, each >= 0 and together < 1 (DAFormer's Cityscapes rows: 0.03 / 0.234)"
            )
        if not 0.0 <= self.class_portion <= 1.0:
            raise ConfigError(
                f"self_training.class_portion={self.class_portion}: must be in [0, 1] (0 = DACS quality weight, "
                "0.5 = half of each class's pixels)"
            )


@dataclass
class ExperimentConfig:
    """A whole run: tasks, model, data, objective, optimisation, evaluation."""

    name: str = "experiment"
    tasks: tuple[Task, ...] = ("semseg", "depth")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(
        default_factory=DataConfig
    )  # the labelled (source) data; validation if no target
    target: DataConfig | None = None  # unlabelled target domain (UDA); validation runs on its val split
    adapt: AdaptConfig | None = None  # None = no adversarial adaptation
    photometric: PhotometricConfig | None = None  # None = depth (if any) is supervised
    consistency: ConsistencyConfig | None = None  # None = no cross-task consistency
    label_context: LabelContextConfig | None = None  # ATRC's aux label supervision (set for atrc archs)
    context_search: ContextSearchConfig | None = None  # ATRC's context-type search (recipes/atrc_search.py)
    self_training: SelfTrainingConfig | None = None  # EMA teacher + pseudo-labels + mixing (UDA)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    out: str = "runs/experiment"

    def __post_init__(self) -> None:
        if self.model.checkpointing and self.train.compile:
            raise ConfigError(
                "model.checkpointing=true and train.compile=true do not combine (torch.compile cannot trace the "
                "checkpointed blocks' BatchNorm-exact recomputation); set one of them to false"
            )


# Sections that configure an objective besides the supervised one (see uda.objectives), with the keys that
# shape their networks (checked when resuming).
OBJECTIVE_SECTIONS: dict[str, type] = {
    "adapt": AdaptConfig,
    "photometric": PhotometricConfig,
    "consistency": ConsistencyConfig,
    "label_context": LabelContextConfig,
    "context_search": ContextSearchConfig,
    "self_training": SelfTrainingConfig,
}


# --------------------------------------------------------------------------- generic machinery


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from JSON or a command-line string) to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot parse {value!r}")
    if origin is Literal:
        for arg in args:
            if value == arg or (isinstance(value, str) and str(arg) == value):
                return arg
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a comma-separated list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if isinstance(value, str):
            pairs = [p for p in value.split(",") if p.strip()]
            try:
                value = dict(p.split(":", 1) for p in pairs)
            except ValueError:
                raise ConfigError(f"{key}: expected 'name:value,name:value', got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Keys that moved to another section: named in the error of the old spelling.
MOVED_KEYS = {"adapt.bn_mode": "train.bn_mode"}


def _unknown(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    if f"{prefix}{key}" in MOVED_KEYS:
        hint = f" (it moved: use {MOVED_KEYS[prefix + key]})"
    return ConfigError(f"unknown config key {prefix}{key}{hint}; valid keys: {', '.join(valid)}")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """An ExperimentConfig dict of an older version in today's keys (adapt.bn_mode is now train.bn_mode)."""
    adapt = data.get("adapt")
    if isinstance(adapt, dict) and "bn_mode" in adapt:
        data = {**data, "adapt": {k: v for k, v in adapt.items() if k != "bn_mode"}}
        data["train"] = {"bn_mode": adapt["bn_mode"], **(data.get("train") or {})}
    return data


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested) dict; unknown keys and bad values raise ConfigError."""
    if cls is ExperimentConfig and isinstance(data, dict):
        data = migrate(data)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(key, list(fields), prefix)
        kwargs[key] = _coerce(value, fields[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-serialisable data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _section_type(tp: Any) -> type | None:
    """The dataclass inside an annotation (`X` or `X | None`), or None for a plain value."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Return a copy of `cfg` with `section.key=value` overrides applied (strictly checked)."""
    data = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form section.key=value (e.g. train.iterations=100)"
            )
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        node, cls = data, type(cfg)
        for depth, key in enumerate(keys):
            fields = _fields(cls)
            prefix = ".".join(keys[:depth]) + ("." if depth else "")
            if key not in fields:
                raise _unknown(key, list(fields), prefix)
            if depth == len(keys) - 1:
                node[key] = _coerce(value, fields[key], path)
            else:
                section = _section_type(fields[key])
                if section is None:
                    raise ConfigError(f"{prefix}{key} is a value, not a section; use {prefix}{key}=...")
                if node[key] is None:
                    raise ConfigError(f"{prefix}{key} is not used by this recipe, so {path} cannot be set")
                node, cls = node[key], section
    return from_dict(type(cfg), data)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the config as indented JSON (atomically: a crash leaves the previous file)."""
    from uda.files import write_text_atomic

    write_text_atomic(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def load_config(cls: type, path: str | Path) -> Any:
    """Read a config file: JSON as written by save_config (a run's config.json), or YAML (.yaml/.yml) with the
    same sections and keys. Unknown keys and bad values raise a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML (pip install pyyaml); or pass JSON"
                ) from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, JSON and YAML syntax errors: one line each
        reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())
        raise ConfigError(
            f"{path}: cannot read config ({reason}); pass a config.json written by a run"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections (name, tasks, model, data, ...)")
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _show(value: Any) -> str:
    """A default as it is written on the command line (section.key=value)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return ",".join(map(_show, value)) or "()"
    if isinstance(value, dict):
        return ",".join(f"{k}:{_show(v)}" for k, v in value.items()) or "{}"
    if value == "":
        return "''"
    return str(value)


def keys_help(width: int = 100) -> str:
    """Every config section and key with its dataclass default, wrapped for a --help epilog."""
    import textwrap

    top = ExperimentConfig()
    lines, plain = [], []
    for name, tp in _fields(ExperimentConfig).items():
        section = _section_type(tp)
        if section is None:
            plain.append(f"{name}={_show(getattr(top, name))}")
            continue
        value = getattr(top, name)
        optional = value is None
        value = section() if optional else value
        keys = " ".join(f"{f.name}={_show(getattr(value, f.name))}" for f in dataclasses.fields(section))
        head = f"{name}{' (if the recipe uses it)' if optional else ''}: "
        lines.append(textwrap.fill(head + keys, width, initial_indent="  ", subsequent_indent="      "))
    lines.insert(0, textwrap.fill(" ".join(plain), width, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)
