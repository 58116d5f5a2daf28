"""MTI-Net (Vandenhende, Georgoulis, Van Gool, ECCV 2020): multi-scale task interaction networks.

Outputs follow the `{task: {scale: tensor}}` convention: scales 2, 3, 4, 5 are the initial (front-end)
predictions at strides 4, 8, 16, 32, deeply supervised; scale 0 is the final prediction at the input size.

What the paper fixes (§2.3-2.5, §3):
- an off-the-shelf multi-scale backbone (HRNetV2, FPN: `build_backbone`, four maps at strides 4..32);
- per scale and task, two consecutive basic residual blocks (task-specific layers) on that scale's backbone
  features, then a prediction layer: the initial prediction at that scale (deep supervision);
- per scale, multi-modal distillation across tasks, Eq. 1:
  F^o_k = F^i_k + sum_{l != k} sigma(W_{k,l} F^i_l) * (W'_{k,l} F^i_l) (the registered "padnet" exchange block,
  3x3 convs without bias);
- a feature propagation module (FPM) from each scale to the next finer one, on the task features of the coarser
  scale (Fig. 2): harmonisation (concatenate the N task features, a learnable non-linear f = two basic residual
  blocks that reduce channels aggressively + a 1x1 conv back to N*C, split into N chunks of C, softmax over the
  task dimension = task attention masks, multiply with the task features, concatenate, reduce N*C -> C: the
  shared representation), then per task a squeeze-and-excitation block on the shared representation added as a
  residual to the task's features; the result is concatenated with the next scale's backbone features before
  that scale's task-specific layers;
- feature aggregation: the distilled features of all scales upsampled to the finest scale and concatenated per
  task, then decoded per task into the final prediction;
- auxiliary tasks are predicted in the front end only, at every scale (the "(N)", "(N+E)" rows of Tab. 4).

Arch "ctal-ms" is CTAL's multi-scale variant as the authors' released code builds it (EMA-Net, MEMANet; the seed
holds only CTAL's appendix): MTI-Net's front end (per-scale initial predictions, FPM) without the per-scale
distillation, the scales aggregated per task, then one CTAL block (the registered "ctal" exchange block) across
the main tasks on the aggregated task features at stride 4, then the prediction.

Arch "atrc-fpm" is ATRC + FPM (Bruggemann et al. 2021, Tables 2-4): the same front end without per-scale
distillation, the ATRC module (uda.models.atrc) on the aggregated task features of the main tasks, its auxiliary
heads on the detached concatenated backbone maps (stride 4); their logits leave as outputs[task]["aux"].

What was chosen where the paper is silent:
- task-specific layers: torchvision `BasicBlock`s giving C_s channels (the backbone's channels at scale s); the
  first has a 1x1 conv + BN projection shortcut when its input width differs (the FPM's propagated features add
  C_{s+1} channels); the prediction layer is `output_head` (1x1 conv; the disparity head of depth_output=
  "disparity" is a 3x3 conv + sigmoid) on those features, as every head of this package;
- harmonisation f: BasicBlock(N*C -> N*C/4, 1x1 conv + BN projection), BasicBlock(N*C/4), 1x1 conv (with bias)
  -> N*C: the reduction by 4 of the concatenated width is the authors' released code's ("aggressively" has no
  number in the paper); chunk k of the output is task k's mask (the tasks' order of concatenation), softmax over
  the N chunks at every channel and pixel, as the paper says (the released code views the N*C channels as
  [C, N], i.e. takes the softmax over groups of N adjacent channels, not over the tasks' chunks);
- the N*C -> C reducer: one BasicBlock with a 1x1 conv + BN projection shortcut;
- squeeze-and-excitation (Hu et al.): global average pooling, FC C -> max(1, C/16) (reduction r = 16), ReLU,
  FC -> C, sigmoid, channel gates on the shared representation (FCs as 1x1 convs with bias);
- propagation: bilinear upsampling (align_corners=False) of the refined features to the finer backbone map's
  size (x2), then concatenation after the backbone features; with model.fpm=false nothing is propagated and each
  scale's task layers see its backbone map only;
- aggregation head: `task_head`, the decoding of this package's multi-scale models: on HRNet bilinear
  upsampling to stride 4 + concatenation (sum of C_s channels), 3x3 conv + BN + ReLU to a quarter of them (the
  paper's "two convolutional layers" with the 1x1 prediction); on FPN Panoptic FPN's semantic branch, as the
  paper; then the 1x1 prediction, bilinear to the input size;
- auxiliary tasks (model.aux_tasks) take part in the FPM and in the distillation as sources only (Eq. 1 for
  k in the main tasks, l over every task), as the authors' code: the distillation has no gates into them
  (`PADNetDistillation(targets=main tasks)`), so every parameter serves a prediction. Auxiliary tasks have no
  scale-0 prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from uda.config import ModelConfig
from uda.models.decoder import output_head
from uda.models.multiscale import (
    BACKBONE_SCALES,
    SharedBackboneModel,
    build_backbone,
    task_head,
    upsample_concat,
    upsample_to,
)

# Exchange block (distillation at every scale) of each architecture built here.
# Whether each architecture built here distils (Eq. 1) at every scale, and its block on the aggregated features.
DISTILLATION_OF_ARCH = {"mti-net": True, "ctal-ms": False, "atrc-fpm": False}
# "atrc": the ATRC module (uda.models.atrc.ATRCHead, with its auxiliary heads on the detached backbone input).
AGGREGATED_EXCHANGE_OF_ARCH = {"mti-net": None, "ctal-ms": "ctal", "atrc-fpm": "atrc"}
HARMONISATION_REDUCTION = 4  # f reduces the N*C concatenated channels to N*C/4 (authors' code)
SE_REDUCTION = 16  # squeeze-and-excitation ratio r (Hu et al.; authors' code)


def residual_blocks(in_channels: int, channels: int, blocks: int = 2) -> nn.Sequential:
    """`blocks` torchvision BasicBlocks giving `channels`; a 1x1 conv + BN projection on the first if needed."""
    down = None
    if in_channels != channels:
        down = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
    layers = [BasicBlock(in_channels, channels, downsample=down)]
    layers += [BasicBlock(channels, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al.): x * sigmoid(FC(ReLU(FC(avgpool(x))))), hidden max(1, C / r)."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [B,C,H,W] -> channel-gated x [B,C,H,W]."""
        return x * self.gate(x)


class FeaturePropagation(nn.Module):
    """MTI-Net's FPM on the N task features [B,C,H,W] of one scale (see the module docstring).

    attention(features) -> task attention masks [B,N,C,H,W] (softmax over the task dimension 1);
    forward(features) -> {task: features + SE_task(shared)} at the same scale (the caller upsamples them).
    """

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks = tuple(tasks)
        self.channels = channels
        concat = len(self.tasks) * channels
        reduced = max(1, concat // HARMONISATION_REDUCTION)
        self.harmonise = nn.Sequential(residual_blocks(concat, reduced), nn.Conv2d(reduced, concat, 1))
        self.reduce = residual_blocks(concat, channels, blocks=1)
        self.se = nn.ModuleDict({t: SqueezeExcitation(channels) for t in self.tasks})

    def _stack(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([features[t] for t in self.tasks], dim=1)  # [B,N,C,H,W]

    def _masks(self, stacked: Tensor) -> Tensor:
        # f on the concatenation [B,N*C,H,W]; chunk k of its output (channels kC..(k+1)C) is task k's logits.
        return torch.softmax(self.harmonise(stacked.flatten(1, 2)).view_as(stacked), dim=1)

    def attention(self, features: Mapping[str, Tensor]) -> Tensor:
        """{task: [B,C,H,W]} -> task attention masks [B,N,C,H,W], summing to one over the N tasks."""
        return self._masks(self._stack(features))

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> refined {task: [B,C,H,W]}."""
        stacked = self._stack(features)
        masks = self._masks(stacked)
        shared = self.reduce((masks * stacked).flatten(1, 2))
        return {t: features[t] + self.se[t](shared) for t in self.tasks}


class MTINet(SharedBackboneModel):
    """MTI-Net on a multi-scale backbone; arch "ctal-ms": CTAL once on the aggregated features, no distillation;
    arch "atrc-fpm": the ATRC module there instead (plus {"aux": logits} for the tasks a label context needs).

    forward(image [B,3,H,W] in [0,1]) -> {task: {s: [B,C_task,H/2^s,W/2^s] for s in 2..5}} for every task, plus
    {0: [B,C_task,H,W]} for the main tasks (those not in cfg.aux_tasks).
    """

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig):
        super().__init__()
        from uda.models.exchange import EXCHANGE_BLOCKS, PADNetDistillation
        from uda.models.multitask import _head_bias, _head_scale, _sigmoid_head

        if cfg.arch not in DISTILLATION_OF_ARCH:
            raise ValueError(f"MTINet builds model.arch {' or '.join(DISTILLATION_OF_ARCH)}, not {cfg.arch}")
        distill = DISTILLATION_OF_ARCH[cfg.arch]
        aggregated = AGGREGATED_EXCHANGE_OF_ARCH[cfg.arch] or "none"
        self.tasks = tuple(tasks)
        unknown = [t for t in cfg.aux_tasks if t not in self.tasks]
        if unknown:
            raise ValueError(f"model.aux_tasks {unknown} are not among the tasks {self.tasks}")
        self.aux_tasks = tuple(t for t in self.tasks if t in cfg.aux_tasks)
        self.main_tasks = tuple(t for t in self.tasks if t not in cfg.aux_tasks)
        if not self.main_tasks:
            raise ValueError(
                f"model.aux_tasks={tuple(cfg.aux_tasks)} leaves no main task among {self.tasks}: auxiliary "
                "tasks have no final prediction"
            )
        self.fpm_enabled = cfg.fpm
        self.encoder = build_backbone(cfg)
        channels = dict(zip(BACKBONE_SCALES, self.encoder.channels))
        self.scales = tuple(sorted(BACKBONE_SCALES, reverse=True))  # coarse to fine
        coarsest = self.scales[0]

        def head(t: str, width: int) -> nn.Module:
            return output_head(
                width, tasks[t], _sigmoid_head(t, cfg), _head_bias(t, cfg), _head_scale(t, cfg)
            )

        self.task_layers = nn.ModuleDict()
        self.initial_head = nn.ModuleDict()
        self.distill = nn.ModuleDict()
        self.fpm = nn.ModuleDict()
        for s in self.scales:
            c = channels[s]
            inputs = c + (channels[s + 1] if cfg.fpm and s != coarsest else 0)
            self.task_layers[str(s)] = nn.ModuleDict({t: residual_blocks(inputs, c) for t in self.tasks})
            self.initial_head[str(s)] = nn.ModuleDict({t: head(t, c) for t in self.tasks})
            if distill:  # auxiliary tasks send messages (Eq. 1, l over every task) but receive none
                self.distill[str(s)] = PADNetDistillation(self.tasks, c, targets=self.main_tasks)
            if cfg.fpm and s != self.scales[-1]:
                self.fpm[str(s)] = FeaturePropagation(self.tasks, c)
        fused = sum(channels.values())
        per_scale = [channels[s] for s in BACKBONE_SCALES]  # fine to coarse, as the backbone's maps
        self.features = nn.ModuleDict({t: task_head(cfg.backbone, per_scale) for t in self.main_tasks})
        width = next(iter(self.features.values())).width
        self.atrc = None
        if aggregated == "atrc":
            from uda.models.atrc import ATRCHead

            self.atrc = ATRCHead(self.main_tasks, width, fused, cfg, tasks.get("semseg"))
            aggregated = "none"
        self.aggregated = EXCHANGE_BLOCKS[aggregated].from_config(self.main_tasks, width, cfg, 2)
        self.head = nn.ModuleDict({t: head(t, width) for t in self.main_tasks})

    def forward(self, image: Tensor) -> dict[str, dict[int, Tensor]]:
        """image [B,3,H,W] in [0,1] -> {task: {scale: prediction}} (see the class docstring)."""
        maps = dict(zip(BACKBONE_SCALES, self.encoder(image)))
        out: dict[str, dict[int, Tensor]] = {t: {} for t in self.tasks}
        distilled: dict[int, dict[str, Tensor]] = {}
        propagated: dict[str, Tensor] | None = None
        for s in self.scales:
            backbone = maps[s]
            if propagated is None:
                inputs = {t: backbone for t in self.tasks}
            else:
                inputs = {
                    t: torch.cat([backbone, upsample_to(propagated[t], backbone.shape[-2:])], dim=1)
                    for t in self.tasks
                }
            x = {t: self.task_layers[str(s)][t](inputs[t]) for t in self.tasks}
            for t in self.tasks:
                out[t][s] = self.initial_head[str(s)][t](x[t])
            distilled[s] = self.distill[str(s)](x) if str(s) in self.distill else x
            propagated = self.fpm[str(s)](x) if str(s) in self.fpm else None
        features = {t: self.features[t]([distilled[s][t] for s in BACKBONE_SCALES]) for t in self.main_tasks}
        features = self.aggregated(features)
        if self.atrc is not None:
            from uda.models.atrc import AUX_KEY

            features, aux = self.atrc(features, upsample_concat([maps[s] for s in BACKBONE_SCALES]))
            for t, a in aux.items():
                out[t][AUX_KEY] = a
        for t in self.main_tasks:
            out[t][0] = upsample_to(self.head[t](features[t]), image.shape[-2:])
        return out
