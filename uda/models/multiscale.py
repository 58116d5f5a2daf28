"""Multi-scale backbones (HRNetV2 through timm, FPN on ResNet) and the multi-task models on them.

A multi-scale backbone maps an RGB batch [B,3,H,W] in [0,1] to four maps at strides 4, 8, 16, 32 (output
scales 2..5 in the `{task: {scale: tensor}}` convention). `MultiScaleModel` is the single-scale setting of
ATRC's controlled comparison (Bruggemann et al. 2021, Table 1): all four maps are upsampled to stride 4 and
concatenated; per task a 3x3 conv + BN + ReLU reduces them to a quarter of the channels (the task features,
67 channels on HRNetV2-W18); an exchange block works on those features (`{task: feature} -> {task: feature}`:
none, PAD-Net/MTI-Net distillation, mTEB, PAP, CTAL, cross-stitch units); a 1x1 conv predicts, and the
prediction is upsampled bilinearly to the input size. With that head the parameter counts of ATRC's Table 1
come out (single task 16.09 M, multi-task 4.52 M, PAD-Net C 5.50 M on HRNetV2-W18-small, four NYUD-v2 tasks).
On the FPN backbones the task features come from Panoptic FPN's semantic branch instead (128 channels), as
MTI-Net decodes its FPN rows (`task_head`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.config import ModelConfig
from uda.models.backbone import _IMAGENET_MEAN, _IMAGENET_STD, PretrainedWeightsError, ResNetEncoder
from uda.models.decoder import output_head

# Our backbone name -> timm model name (HRNetV2: the plain branch outputs, feature_location="").
HRNETS = {
    "hrnetv2-w18-small": "hrnet_w18_small_v2",
    "hrnetv2-w18": "hrnet_w18",
    "hrnetv2-w48": "hrnet_w48",
}
# FPN on a plain (undilated) torchvision ResNet: name -> ResNet name.
FPNS = {"fpn-resnet18": "resnet18", "fpn-resnet50": "resnet50"}
MULTISCALE_BACKBONES = (*HRNETS, *FPNS)
# The modules of timm's classification HRNet that its features-only model (feature_location="") lacks: the
# head, dropped from a weights_path checkpoint before the strict load (checked against timm 1.0's models).
HRNET_HEAD = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
HRNET_STRIDE = 32  # the coarsest branch: HRNet's fusions need input sizes that are multiples of it

# Output scale of each backbone map: strides 4, 8, 16, 32.
BACKBONE_SCALES = (2, 3, 4, 5)
# Scale of the task features of MultiScaleModel (stride 4) and of its intermediate predictions.
FEATURE_SCALE = 2
FPN_CHANNELS = 256  # Panoptic FPN's width


def is_multiscale(backbone: str) -> bool:
    """Whether `backbone` names a multi-scale backbone (HRNetV2, FPN) rather than a dilated ResNet."""
    return backbone in MULTISCALE_BACKBONES


class HRNetBackbone(nn.Module):
    """HRNetV2 from timm: the four branch outputs (strides 4..32; W18: 18, 36, 72, 144 channels).

    Weights: ImageNet through timm (Hugging Face hub or its cache) with pretrained=True, a local timm
    checkpoint with weights_path (the classification model's state dict; the head is dropped), none otherwise.
    """

    def __init__(self, name: str, pretrained: bool = False, weights_path: str | None = None):
        super().__init__()
        import timm

        kwargs = {"features_only": True, "feature_location": "", "out_indices": (1, 2, 3, 4)}
        try:
            # A local file is loaded below, strictly: timm's own loading is not strict in features mode.
            self.net = timm.create_model(
                HRNETS[name], pretrained=pretrained and weights_path is None, **kwargs
            )
        except Exception as exc:  # noqa: BLE001 - offline hub or missing cache: the same fix
            raise PretrainedWeightsError(_hrnet_weights_message(name, "the Hugging Face hub", exc)) from None
        if weights_path is not None:
            self._load_weights(name, weights_path)
        self.channels: list[int] = list(self.net.feature_info.channels())
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _load_weights(self, name: str, weights_path: str) -> None:
        """Load a timm classification checkpoint (.pth or .safetensors) strictly, less the head features mode lacks."""
        from timm.models import load_state_dict

        where = f"model.weights_path={weights_path}"
        try:
            state = load_state_dict(str(weights_path))
        except Exception as exc:  # noqa: BLE001 - missing, unreadable or foreign file: the same fix
            raise PretrainedWeightsError(_hrnet_weights_message(name, where, exc)) from None
        state = {k: v for k, v in state.items() if not k.startswith(HRNET_HEAD)}
        own = self.net.state_dict().keys()
        missing, unexpected = sorted(own - state.keys()), sorted(state.keys() - own)
        try:
            if missing or unexpected:  # named here: torch's message would list every key
                raise RuntimeError(
                    f"{len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
                    f"e.g. {unexpected[:2]}"
                )
            self.net.load_state_dict(state, strict=True)  # still strict: misshapen tensors
        except RuntimeError as exc:
            raise PretrainedWeightsError(
                _hrnet_weights_message(name, where, exc, f"not a state dict of timm's {HRNETS[name]}")
            ) from None

    def last_layer(self) -> list[nn.Parameter]:
        """The weight of the last convolution of the last stage (the multi-resolution fusion)."""
        return [[m for m in self.net.stage4.modules() if isinstance(m, nn.Conv2d)][-1].weight]

    def forward(self, image: Tensor) -> list[Tensor]:
        """image [B,3,H,W] in [0,1] (any size) -> four maps at strides 4, 8, 16, 32 of ceil(H/s) x ceil(W/s)."""
        x = (image - self.mean) / self.std
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % HRNET_STRIDE, -w % HRNET_STRIDE
        if not (pad_h or pad_w):
            return self.net(x)
        # HRNet's fusions add upsampled coarse branches to finer ones, which only fit at multiples of 32: pad the
        # bottom and right with zeros (the ImageNet mean once normalised, what the convolutions' own zero padding
        # assumes beyond every border; constant padding is also deterministic on CUDA, replicate's backward is
        # not) and crop every map to the size a ResNet gives, ceil(H/s) x ceil(W/s).
        maps = self.net(F.pad(x, (0, pad_w, 0, pad_h)))
        return [m[..., : -(-h // s), : -(-w // s)] for m, s in zip(maps, self.net.feature_info.reduction())]


def _hrnet_weights_message(name: str, where: str, exc: BaseException, why: str = "") -> str:
    """One line: which HRNet weights could not be loaded from where, why, and the fix."""
    reason = " ".join(str(exc).split())[:160] or type(exc).__name__
    return (
        f"cannot load {name} ImageNet weights from {where} ({f'{why}: ' if why else ''}{reason}); pass a local "
        f"timm {HRNETS[name]} checkpoint (the classification model's state dict) with "
        f"model.weights_path=/path/{HRNETS[name]}.pth (or .safetensors), or train without them with "
        "model.pretrained=false"
    )


class FPNBackbone(nn.Module):
    """Feature pyramid network (Lin et al. 2017; torchvision's FeaturePyramidNetwork) on a plain ResNet:
    layer1..layer4 (strides 4..32) -> four maps of 256 channels. ImageNet weights as ResNetEncoder's."""

    def __init__(self, name: str, pretrained: bool = False, weights_path: str | None = None):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        self.encoder = ResNetEncoder(FPNS[name], pretrained, weights_path, dilated=False)
        self.fpn = FeaturePyramidNetwork(self.encoder.channels[1:], FPN_CHANNELS)
        self.channels = [FPN_CHANNELS] * 4

    def last_layer(self) -> list[nn.Parameter]:
        """The weights of the FPN's output convolutions (each map's last layer, shared by every task)."""
        return [block[0].weight for block in self.fpn.layer_blocks]

    def forward(self, image: Tensor) -> list[Tensor]:
        """image [B,3,H,W] in [0,1] -> four maps at strides 4, 8, 16, 32 (256 channels)."""
        maps = self.encoder(image)[1:]
        return list(self.fpn({str(k): m for k, m in enumerate(maps)}).values())


def build_backbone(cfg: ModelConfig) -> nn.Module:
    """The multi-scale backbone of cfg.backbone (HRNetV2 or FPN), with `channels` of its four maps."""
    if cfg.backbone in HRNETS:
        return HRNetBackbone(cfg.backbone, cfg.pretrained, cfg.weights_path)
    if cfg.backbone in FPNS:
        return FPNBackbone(cfg.backbone, cfg.pretrained, cfg.weights_path)
    raise ValueError(f"{cfg.backbone!r} is not a multi-scale backbone; choose one of {MULTISCALE_BACKBONES}")


def upsample_concat(maps: Sequence[Tensor]) -> Tensor:
    """Bilinearly upsample every map to the size of the first and concatenate them along channels."""
    size = maps[0].shape[-2:]
    ups = [
        m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.cat(ups, dim=1)


def task_features(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (no bias: BN follows) + BN + ReLU: ATRC's per-task feature head F_n."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConcatHead(nn.Module):
    """The HRNet decoding of the literature (HRNetV2; MTI-Net, ATRC): every map upsampled bilinearly to the
    first's size (stride 4) and concatenated, then 3x3 conv + BN + ReLU to a quarter of the channels."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        self.width = sum(channels) // 4
        self.conv = task_features(sum(channels), self.width)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Four maps (strides 4..32) -> [B, width, H/4, W/4]."""
        return self.conv(upsample_concat(maps))


class PanopticFPNHead(nn.Module):
    """The semantic branch of Panoptic FPN (Kirillov et al. 2019), how MTI-Net decodes its FPN backbones: per
    map, stages of 3x3 conv + GroupNorm(32) + ReLU (+ bilinear x2 upsampling) until stride 4 (one stage at
    stride 4 and 8, two at 16, three at 32), summed; 128 channels."""

    def __init__(self, channels: Sequence[int], width: int = 128):
        super().__init__()
        self.width = width
        branches = []
        for k, c in enumerate(channels):
            stages, inputs = [], c
            for _ in range(max(1, k)):
                stages += [nn.Conv2d(inputs, width, 3, padding=1, bias=False), nn.GroupNorm(32, width)]
                stages += [nn.ReLU(inplace=True)]
                if k > 0:
                    stages.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
                inputs = width
            branches.append(nn.Sequential(*stages))
        self.branches = nn.ModuleList(branches)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        """Four maps (strides 4..32) -> [B, width, H/4, W/4] (the sum of the branches)."""
        size = maps[0].shape[-2:]
        out = [branch(m) for branch, m in zip(self.branches, maps)]
        return torch.stack([o if o.shape[-2:] == size else upsample_to(o, size) for o in out]).sum(0)


def task_head(backbone: str, channels: Sequence[int]) -> ConcatHead | PanopticFPNHead:
    """The per-task decoding of the four maps of `backbone` into stride-4 task features (`.width` channels):
    Panoptic FPN's semantic branch on FPN backbones, the HRNet concatenation head otherwise."""
    return PanopticFPNHead(channels) if backbone in FPNS else ConcatHead(channels)


def upsample_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear upsampling of a prediction to the input size."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SharedBackboneModel(nn.Module):
    """Base of the models on one shared multi-scale backbone (`self.encoder`): its parameter groups and the
    last layer every task shares."""

    encoder: nn.Module

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": backbone parameters, "decoder": every other parameter (heads, exchange, ...)}, and
        "architecture": the architecture weights of a search (modules with `architecture_parameters()`, e.g.
        ATRC's context logits alpha; optim.lr_architecture) when there are any."""
        from uda.models.multitask import _split_params

        groups = _split_params(self, [self.encoder])
        arch = [
            p
            for m in self.modules()
            if hasattr(m, "architecture_parameters")
            for p in m.architecture_parameters()
        ]
        if arch:
            ids = {id(p) for p in arch}
            groups["decoder"] = [p for p in groups["decoder"] if id(p) not in ids]
            groups["architecture"] = arch
        return groups

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """The last layer every task shares (the backbone's last convolution), e.g. for GradNorm."""
        return self.encoder.last_layer()


class MultiScaleModel(SharedBackboneModel):
    """Shared multi-scale backbone, the HRNet head per task, one exchange block on the task features.

    backbone maps -> per task `task_head` (HRNet: upsample to stride 4 + concat, 3x3 conv+BN+ReLU to a quarter
    of the channels; FPN: Panoptic FPN's semantic branch, 128 channels) -> exchange block (kind `exchange`) -> 1x1 conv -> bilinear to the input size (scale 0). When there is
    an exchange block, a 1x1 conv on the task features before it gives the intermediate prediction at scale 2
    (stride 4), deeply supervised as PAD-Net's initial predictions.
    """

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig, exchange: str = "none"):
        super().__init__()
        from uda.models.multitask import _head_bias, _head_scale, _sigmoid_head

        self.tasks = tuple(tasks)
        self.encoder = build_backbone(cfg)  # named as the ResNet models' (STLModel reads it)
        self.features = nn.ModuleDict({t: task_head(cfg.backbone, self.encoder.channels) for t in self.tasks})
        width = self.width = self.features[self.tasks[0]].width
        self.build_exchange(exchange, tasks, cfg)
        self.intermediate = exchange != "none" and self.initial_predictions
        heads = lambda: nn.ModuleDict(  # noqa: E731
            {
                t: output_head(width, n, _sigmoid_head(t, cfg), _head_bias(t, cfg), _head_scale(t, cfg))
                for t, n in tasks.items()
            }
        )
        self.head = heads()
        self.initial_head = heads() if self.intermediate else nn.ModuleDict()

    # Subclasses with their own exchange (ATRC) override these three.
    initial_predictions: ClassVar[bool] = True  # deeply supervised predictions before an exchange block

    def build_exchange(self, exchange: str, tasks: Mapping[str, int], cfg: ModelConfig) -> None:
        """Build the module(s) that exchange information between the task features."""
        from uda.models.exchange import EXCHANGE_BLOCKS

        self.exchange = EXCHANGE_BLOCKS[exchange].from_config(self.tasks, self.width, cfg, FEATURE_SCALE)

    def exchange_features(
        self, x: dict[str, Tensor], maps: Sequence[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, dict]]:
        """Task features (and the backbone maps) -> (exchanged task features, extra outputs {task: {key: out}})."""
        return self.exchange(x), {}

    def forward(self, image: Tensor) -> dict[str, dict[int, Tensor]]:
        """image [B,3,H,W] in [0,1] -> {task: {0: [B,C,H,W]}} (+ {2: [B,C,H/4,W/4]} with an exchange block, and
        what `exchange_features` adds)."""
        maps = self.encoder(image)
        x = {t: self.features[t](maps) for t in self.tasks}
        out: dict[str, dict] = {t: {} for t in self.tasks}
        if self.intermediate:
            for t in self.tasks:
                out[t][FEATURE_SCALE] = self.initial_head[t](x[t])
        x, extra = self.exchange_features(x, maps)
        for t in self.tasks:
            out[t][0] = upsample_to(self.head[t](x[t]), image.shape[-2:])
        for t, per in extra.items():
            out[t].update(per)
        return out
