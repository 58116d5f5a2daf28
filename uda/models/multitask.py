"""Assembled networks: multi-task (MTL, 3-ways PAD-Net, mTEB), single-task baselines and original PAD-Net.

STL and MTL take either task decoder (cfg.decoder): the 3-ways decoder or the DeepLab head of the MTL survey
(the paper's STL/MTL baselines), which predicts at scale 0 only.

Every model maps an RGB batch [B,3,H,W] in [0,1] to `{task: {scale: prediction}}`: scale 0 is the final
prediction at full input resolution, scale s > 0 an intermediate one at 1/2^s resolution taken before the
exchange block at that scale. Task output channels come from the caller (semseg C, depth 1, normals 3,
edges 1). Outputs are raw, except depth with `depth_output="disparity"` (sigmoid).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPP

from uda.config import ModelConfig
from uda.models.backbone import ResNetEncoder
from uda.models.checkpointing import enable_checkpointing
from uda.models.decoder import ConvBlock, DeepLabDecoder, TaskDecoder, output_head
from uda.models.exchange import EXCHANGE_BLOCKS, XTAM, CrossStitchUnit, PADNetDistillation

Outputs = dict[str, dict[int, Tensor]]

# Exchange block of each multi-task architecture built on the 3-ways decoder.
EXCHANGE_OF_ARCH = {"mtl": "none", "3ways-padnet": "padnet", "mteb": "mteb", "pap-net": "pap", "ctal": "ctal"}

# Architectures whose task decoder is chosen by cfg.decoder (the others have their own decoder design).
DEEPLAB_ARCHS = ("stl", "mtl")


def check_decoder(cfg: ModelConfig, arch: str | None = None) -> None:
    """Raise ValueError unless `arch` (default cfg.arch) can take cfg.decoder (the DeepLab head: stl, mtl)."""
    arch = arch or cfg.arch
    if cfg.decoder == "deeplab" and arch not in DEEPLAB_ARCHS:
        raise ValueError(
            f"model.decoder=deeplab is the task decoder of the STL/MTL baselines: it works with model.arch "
            f"{' or '.join(DEEPLAB_ARCHS)}, not model.arch={arch}; set model.decoder=3ways"
        )


def output_scales(cfg: ModelConfig) -> tuple[int, ...]:
    """Side-output scales, coarse to fine: cfg.output_scales, or the exchange scales plus 0."""
    scales = cfg.output_scales if cfg.output_scales is not None else (*cfg.exchange_scales, 0)
    scales = tuple(sorted(set(scales), reverse=True))
    if not set(scales) <= set(range(5)):
        raise ValueError(f"model.output_scales must lie in 0..4, got {scales}")
    return scales


def _sigmoid_head(task: str, cfg: ModelConfig) -> bool:
    return task == "depth" and cfg.depth_output == "disparity"


def _head_bias(task: str, cfg: ModelConfig) -> float | None:
    """Raw inverse-depth heads start at cfg.depth_init (a mid-range depth), not at 0 (infinitely far)."""
    return cfg.depth_init if task == "depth" and cfg.depth_output == "inverse" else None


def _head_scale(task: str, cfg: ModelConfig) -> float | None:
    """Output scale of the raw inverse-depth heads of the multi-scale models: cfg.depth_init, the size of the
    targets (d_far/d, tens to hundreds), as their BN+ReLU task features are of unit size; the dilated-ResNet
    models keep unscaled heads (their decoders' ELU features grow to the targets' size; their tables were
    measured so)."""
    return cfg.depth_init if _head_bias(task, cfg) is not None else None


def _split_params(model: nn.Module, backbones: list[nn.Module]) -> dict[str, list[nn.Parameter]]:
    """{"backbone": parameters of `backbones`, "decoder": every other parameter of `model`}."""
    backbone = [p for m in backbones for p in m.parameters()]
    ids = {id(p) for p in backbone}
    return {"backbone": backbone, "decoder": [p for p in model.parameters() if id(p) not in ids]}


class MultiTaskModel(nn.Module):
    """Shared ResNet encoder, one 3-ways decoder per task, an exchange block after each exchange scale.

    exchange: registered exchange block kind; default from cfg.arch ("mtl" none, "3ways-padnet" padnet,
    "mteb" mteb). Exchange scales must lie in 1..4; the block at scale s works on decoder_channels[s].
    With cfg.decoder="deeplab" (exchange "none" only): one DeepLab head per task on the deepest encoder map,
    outputs at scale 0 only; cfg.decoder_channels, exchange_scales and output_scales do not apply.
    """

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig, exchange: str | None = None):
        super().__init__()
        kind = exchange if exchange is not None else EXCHANGE_OF_ARCH[cfg.arch]
        self.decoder_kind = cfg.decoder
        if cfg.decoder == "deeplab":
            self._build_deeplab(tasks, cfg, kind)
            return
        if not set(cfg.exchange_scales) <= {1, 2, 3, 4}:
            raise ValueError(f"model.exchange_scales must lie in 1..4, got {cfg.exchange_scales}")
        self.tasks = tuple(tasks)
        self.scales = output_scales(cfg)
        self.encoder = ResNetEncoder(cfg.backbone, cfg.pretrained, cfg.weights_path)
        self.decoders = nn.ModuleDict(
            {
                t: TaskDecoder(
                    self.encoder.channels,
                    n,
                    cfg.decoder_channels,
                    self.scales,
                    _sigmoid_head(t, cfg),
                    _head_bias(t, cfg),
                )
                for t, n in tasks.items()
            }
        )
        block = EXCHANGE_BLOCKS[kind]
        self.exchange = nn.ModuleDict(
            {
                str(s): block.from_config(self.tasks, cfg.decoder_channels[s], cfg, s)
                for s in cfg.exchange_scales
            }
        )

    def _build_deeplab(self, tasks: Mapping[str, int], cfg: ModelConfig, kind: str) -> None:
        """Encoder + one DeepLab head per task; exchange `kind` must be "none", side outputs scale 0 only."""
        if kind != "none":
            raise ValueError(
                f"model.decoder=deeplab takes no exchange block (got {kind!r}): it works with model.arch "
                f"{' or '.join(DEEPLAB_ARCHS)}; set model.decoder=3ways"
            )
        if cfg.output_scales is not None and not set(cfg.output_scales) <= {0}:
            raise ValueError(
                f"model.decoder=deeplab predicts at scale 0 only (it has no decoder stages), but "
                f"model.output_scales={cfg.output_scales}; set model.decoder=3ways or drop model.output_scales"
            )
        self.tasks = tuple(tasks)
        self.scales = (0,)
        self.encoder = ResNetEncoder(cfg.backbone, cfg.pretrained, cfg.weights_path)
        self.decoders = nn.ModuleDict(
            {
                t: DeepLabDecoder(self.encoder.channels[-1], n, _sigmoid_head(t, cfg), _head_bias(t, cfg))
                for t, n in tasks.items()
            }
        )
        self.exchange = nn.ModuleDict()  # none: tasks meet only in the shared encoder

    def forward(self, image: Tensor) -> Outputs:
        """image [B,3,H,W] in [0,1] -> {task: {scale: [B,C_task,H/2^s,W/2^s]}} (deeplab: scale 0 only)."""
        if self.decoder_kind == "deeplab":
            deepest = self.encoder(image)[-1]
            return {t: {0: self.decoders[t](deepest, image.shape[-2:])} for t in self.tasks}
        return self.decode(self.encoder(image), image.shape[-2:])

    def decode(self, skips: Sequence[Tensor], size: tuple[int, int]) -> Outputs:
        """Encoder maps (strides 2 .. 16) -> every task's outputs through its decoder and the exchange blocks."""
        x = {t: skips[4] for t in self.tasks}
        out: Outputs = {t: {} for t in self.tasks}
        for s in range(4, -1, -1):
            x = {t: self.decoders[t].stage(s, x[t], skips, size=size) for t in self.tasks}
            if s > 0 and s in self.scales:  # intermediate outputs come before the exchange
                for t in self.tasks:
                    out[t][s] = self.decoders[t].head(s, x[t])
            if str(s) in self.exchange:
                x = self.exchange[str(s)](x)
        for t in self.tasks:
            out[t][0] = self.decoders[t].head(0, x[t])
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": encoder parameters, "decoder": decoders and exchange blocks}."""
        return _split_params(self, [self.encoder])

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """The last layer every task shares (the encoder's last convolution), e.g. for GradNorm."""
        return self.encoder.last_layer()


class STLModel(nn.Module):
    """Single-task baselines: one full network (own encoder + decoder) per task, outputs merged.

    `network(tasks, cfg)` builds each task's network (default: MultiTaskModel without exchange block, whose
    decoder is cfg.decoder: 3-ways or the DeepLab head).
    """

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig, network=None):
        super().__init__()
        network = network or (lambda one, c: MultiTaskModel(one, c, exchange="none"))
        self.nets = nn.ModuleDict({t: network({t: n}, cfg) for t, n in tasks.items()})

    def forward(self, image: Tensor) -> Outputs:
        """image [B,3,H,W] in [0,1] -> {task: {scale: prediction}} (each task from its own network)."""
        out: Outputs = {}
        for net in self.nets.values():
            out.update(net(image))
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": every task's encoder, "decoder": every task's decoder}."""
        return _split_params(self, [net.encoder for net in self.nets.values()])

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """Nothing is shared between single-task networks: the last encoder layer of the task's own network."""
        return self.nets[task].encoder.last_layer()

    def independent_parts(self) -> list[list[nn.Parameter]]:
        """The parameters of each task's network: they share nothing, so each is clipped on its own."""
        return [list(net.parameters()) for net in self.nets.values()]


class CrossStitchModel(nn.Module):
    """Cross-stitch networks: one network per task (encoder + 3-ways decoder, as STL), their encoder maps mixed by
    a cross-stitch unit after each of the five encoder stages (stem, layer1 .. layer4); each task then decodes its
    own mixed maps. model.cross_stitch_init is the units' self weight (1.0: exactly the STL networks)."""

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig):
        super().__init__()
        if cfg.decoder != "3ways":
            raise ValueError("model.arch=cross-stitch uses the 3-ways decoder; set model.decoder=3ways")
        self.tasks = tuple(tasks)
        self.nets = nn.ModuleDict({t: MultiTaskModel({t: n}, cfg, exchange="none") for t, n in tasks.items()})
        channels = next(iter(self.nets.values())).encoder.channels
        self.units = nn.ModuleList(
            [CrossStitchUnit(len(self.tasks), c, cfg.cross_stitch_init) for c in channels]
        )

    def forward(self, image: Tensor) -> Outputs:
        """image [B,3,H,W] in [0,1] -> {task: {scale: prediction}}."""
        encoders = [self.nets[t].encoder for t in self.tasks]
        x = [e.normalise(image) for e in encoders]
        skips: list[list[Tensor]] = []
        for k, unit in enumerate(self.units):
            x = unit([e.stage(k, v) for e, v in zip(encoders, x)])
            skips.append(x)
        out: Outputs = {}
        for k, t in enumerate(self.tasks):
            out.update(self.nets[t].decode([maps[k] for maps in skips], image.shape[-2:]))
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": every task's encoder, "decoder": decoders and cross-stitch units}."""
        return _split_params(self, [net.encoder for net in self.nets.values()])

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """The last cross-stitch unit: the last parameters every task's output depends on."""
        return [self.units[-1].alpha]


def _bottlenecks(in_channels: int, width: int) -> nn.Sequential:
    """Two torchvision Bottleneck blocks giving `width` channels (a 1x1 projection on the first if needed)."""
    down = None
    if in_channels != width:
        down = nn.Sequential(nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width))
    return nn.Sequential(Bottleneck(in_channels, width // 4, downsample=down), Bottleneck(width, width // 4))


class PADNet(nn.Module):
    """The original PAD-Net baseline on a shared dilated ResNet encoder.

    Per task: initial head (2 bottlenecks, `width` ch, + 1x1 conv) on the deepest encoder map, emitted as
    the intermediate prediction at scale 4 (output stride 16); PAD-Net distillation across tasks on the
    `width`-channel features; final head (2 bottlenecks + 1x1 conv) upsampled bilinearly to the input size,
    emitted as scale 0. cfg.output_scales and the 3-ways decoder options do not apply.
    """

    INTERMEDIATE_SCALE = 4

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig, width: int = 256):
        super().__init__()
        check_decoder(cfg, arch="padnet")
        self.tasks = tuple(tasks)
        self.encoder = ResNetEncoder(cfg.backbone, cfg.pretrained, cfg.weights_path)
        deepest = self.encoder.channels[-1]
        self.initial = nn.ModuleDict({t: _bottlenecks(deepest, width) for t in self.tasks})
        self.initial_head = nn.ModuleDict(
            {t: output_head(width, n, _sigmoid_head(t, cfg), _head_bias(t, cfg)) for t, n in tasks.items()}
        )
        self.distill = PADNetDistillation(self.tasks, width)
        self.final = nn.ModuleDict({t: _bottlenecks(width, width) for t in self.tasks})
        self.final_head = nn.ModuleDict(
            {t: output_head(width, n, _sigmoid_head(t, cfg), _head_bias(t, cfg)) for t, n in tasks.items()}
        )

    def forward(self, image: Tensor) -> Outputs:
        """image [B,3,H,W] in [0,1] -> {task: {4: [B,C,H/16,W/16], 0: [B,C,H,W]}}."""
        deepest = self.encoder(image)[-1]
        x = {t: self.initial[t](deepest) for t in self.tasks}
        out: Outputs = {t: {self.INTERMEDIATE_SCALE: self.initial_head[t](x[t])} for t in self.tasks}
        x = self.distill(x)
        for t in self.tasks:
            final = self.final_head[t](self.final[t](x[t]))
            out[t][0] = F.interpolate(final, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return out

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": encoder parameters, "decoder": heads and distillation}."""
        return _split_params(self, [self.encoder])

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """The last layer every task shares (the encoder's last convolution), e.g. for GradNorm."""
        return self.encoder.last_layer()


from uda.models.xtasc import XTasCUNet  # noqa: E402 - it builds on the helpers above

ARCHS: dict[str, Callable[[Mapping[str, int], ModelConfig], nn.Module]] = {
    "stl": STLModel,
    "mtl": MultiTaskModel,
    "3ways-padnet": MultiTaskModel,
    "mteb": MultiTaskModel,
    "pap-net": MultiTaskModel,
    "ctal": MultiTaskModel,
    "padnet": PADNet,
    "cross-stitch": CrossStitchModel,
    "xtasc-unet": XTasCUNet,
    "xtasc-stl": lambda tasks, cfg: STLModel(tasks, cfg, network=XTasCUNet),  # XTasC's Base ST-Net
}

# On a multi-scale backbone (HRNetV2, FPN): the exchange block each architecture puts on the task features of
# MultiScaleModel (ATRC's controlled comparison), and the architectures that work across scales.
MULTISCALE_EXCHANGE = {
    "mtl": "none",
    "padnet": "padnet",  # PAD-Net's distillation = MTI-Net's Eq. 1 at one scale (ATRC's "PAD-Net C")
    "mteb": "mteb",
    "cross-stitch": "cross-stitch",
    "pap-net": "pap",
    "ctal": "ctal",
}
ACROSS_SCALES = ("mti-net", "ctal-ms", "atrc-fpm")
# Architectures with their own head on a multi-scale backbone (no exchange block of MultiScaleModel).
MULTISCALE_ONLY = ("atrc",)


def _build_multiscale(tasks: Mapping[str, int], cfg: ModelConfig) -> nn.Module:
    from uda.models.multiscale import MultiScaleModel

    if cfg.arch == "stl":
        return STLModel(tasks, cfg, network=lambda one, c: MultiScaleModel(one, c, "none"))
    if cfg.arch in MULTISCALE_EXCHANGE:
        return MultiScaleModel(tasks, cfg, MULTISCALE_EXCHANGE[cfg.arch])
    if cfg.arch == "atrc":
        from uda.models.atrc import ATRCModel

        return ATRCModel(tasks, cfg)
    from uda.models.mtinet import MTINet

    return MTINet(tasks, cfg)


def check_model_config(cfg: ModelConfig) -> None:
    """Raise ValueError (naming the keys and the fix) unless cfg.arch can be built on cfg.backbone with its
    options. Multi-scale backbones take the HRNet head whatever cfg.decoder says (the recipes of the paper's
    tables set the DeepLab head for stl/mtl on the dilated ResNets)."""
    from uda.models.multiscale import MULTISCALE_BACKBONES, is_multiscale

    known = (*ARCHS, *ACROSS_SCALES, *MULTISCALE_ONLY)
    if cfg.arch not in known:
        raise ValueError(f"unknown model.arch {cfg.arch!r}; choose one of {', '.join(known)}")
    if cfg.aux_tasks and cfg.arch not in ACROSS_SCALES:
        raise ValueError(
            f"model.aux_tasks (tasks predicted in the front end only) applies to model.arch "
            f"{' or '.join(ACROSS_SCALES)}, not {cfg.arch}; remove it"
        )
    if is_multiscale(cfg.backbone):
        multiscale = (*MULTISCALE_EXCHANGE, *ACROSS_SCALES, *MULTISCALE_ONLY)
        if cfg.arch != "stl" and cfg.arch not in multiscale:
            raise ValueError(
                f"model.arch={cfg.arch} needs a dilated ResNet backbone (resnet18/34/50/101), not model.backbone="
                f"{cfg.backbone}; on a multi-scale backbone choose one of stl, {', '.join(multiscale)}"
            )
        return
    if cfg.arch in ACROSS_SCALES or cfg.arch in MULTISCALE_ONLY:
        raise ValueError(
            f"model.arch={cfg.arch} works across the scales of a multi-scale backbone; set model.backbone to one "
            f"of {', '.join(MULTISCALE_BACKBONES)}"
        )
    check_decoder(cfg)


def intermediate_scales(cfg: ModelConfig) -> tuple[int, ...]:
    """Scales of the intermediate predictions (taken before the exchange block) a model of cfg emits."""
    from uda.models.multiscale import BACKBONE_SCALES, FEATURE_SCALE, is_multiscale

    check_model_config(cfg)
    if is_multiscale(cfg.backbone):
        if cfg.arch in ACROSS_SCALES:
            return BACKBONE_SCALES  # every scale's initial prediction
        # atrc: no prediction before the ATRC module (the authors' code has none)
        return () if MULTISCALE_EXCHANGE.get(cfg.arch, "none") == "none" else (FEATURE_SCALE,)
    if cfg.decoder == "deeplab":
        return ()  # the DeepLab head has no decoder stage to take an intermediate prediction from
    if cfg.arch == "padnet":
        return (PADNet.INTERMEDIATE_SCALE,)
    if cfg.arch in ("xtasc-unet", "xtasc-stl"):
        return ()  # one final prediction per task
    return tuple(cfg.exchange_scales)


def build_model(cfg: ModelConfig, tasks: Mapping[str, int]) -> nn.Module:
    """The network of cfg.arch for `tasks` (task -> output channels) on cfg.backbone."""
    from uda.models.multiscale import is_multiscale

    check_model_config(cfg)
    model = _build_multiscale(tasks, cfg) if is_multiscale(cfg.backbone) else ARCHS[cfg.arch](tasks, cfg)
    if cfg.checkpointing:
        # Encoder blocks, decoder stages (3-ways, DeepLab, PAD-Net) and xTAM: the memory of a step's activations.
        enable_checkpointing(model, (BasicBlock, Bottleneck, ConvBlock, ASPP, XTAM, *_timm_blocks(cfg)))
    return model


def _timm_blocks(cfg: ModelConfig) -> tuple[type[nn.Module], ...]:
    """The residual blocks of timm's HRNet (checkpointed as the ResNet ones), if the backbone is one."""
    from uda.models.multiscale import HRNETS

    if cfg.backbone not in HRNETS:
        return ()
    from timm.models.hrnet import HighResolutionModule

    return (HighResolutionModule,)
