"""ResNet encoder with a dilated last stage (output stride 16) returning five feature maps."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

# name -> (torchvision constructor, ImageNet weights enum)
_RESNETS: dict[str, tuple[Callable[..., tv_resnet.ResNet], type[torchvision.models.WeightsEnum]]] = {
    "resnet18": (tv_resnet.resnet18, tv_resnet.ResNet18_Weights),
    "resnet34": (tv_resnet.resnet34, tv_resnet.ResNet34_Weights),
    "resnet50": (tv_resnet.resnet50, tv_resnet.ResNet50_Weights),
    "resnet101": (tv_resnet.resnet101, tv_resnet.ResNet101_Weights),
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights could not be obtained (no network, missing or incompatible local file)."""


def _dilate_basic_layer(layer: nn.Sequential) -> None:
    """Turn a BasicBlock stage into stride 1, dilation 2 in place (torchvision only does this for Bottleneck).

    As torchvision does for Bottleneck, the first 3x3 conv of the stage keeps dilation 1 (it used to be the
    strided one) and every later 3x3 conv is dilated by 2; padding = dilation keeps the spatial size.
    """
    for index, block in enumerate(layer):
        for conv_index, conv in enumerate((block.conv1, block.conv2)):
            dilation = 1 if (index == 0 and conv_index == 0) else 2
            conv.stride = (1, 1)
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1


def _hub_cache_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _imagenet_state_dict(name: str, weights_path: str | None) -> dict[str, Tensor]:
    """The torchvision ImageNet state dict of `name`, from `weights_path` or torchvision's download/cache."""
    if weights_path is not None:
        try:
            return torch.load(weights_path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise PretrainedWeightsError(
                f"cannot read {name} weights from model.weights_path={weights_path} ({exc}); "
                "pass a torchvision ImageNet state dict (.pth) or set model.pretrained=false"
            ) from None
    weights = _RESNETS[name][1].IMAGENET1K_V1
    try:
        # Looked up on torch.hub at call time so tests can simulate an offline machine.
        return torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=True)
    except Exception as exc:  # noqa: BLE001 - any download failure gets the same actionable message
        raise PretrainedWeightsError(
            f"cannot download {name} ImageNet weights ({type(exc).__name__}: {exc}); run without them with "
            f"model.pretrained=false, point to a local copy with model.weights_path=/path/{name}.pth, "
            f"or place the file at {_hub_cache_file(weights.url)}"
        ) from None


class ResNetEncoder(nn.Module):
    """torchvision ResNet, last stage dilated (output stride 16), classifier removed.

    Input: RGB [B,3,H,W] in [0,1] (ImageNet normalisation happens inside). Output: five maps
    [relu(conv1) 1/2, layer1 1/4, layer2 1/8, layer3 1/16, layer4 1/16] with `channels` channels;
    with dilated=False the plain ResNet, whose layer4 is at 1/32 (a U-Net encoder).
    """

    def __init__(
        self,
        name: str = "resnet101",
        pretrained: bool = False,
        weights_path: str | None = None,
        dilated: bool = True,
    ):
        super().__init__()
        if name not in _RESNETS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(_RESNETS)}")
        build = _RESNETS[name][0]
        bottleneck = name in ("resnet50", "resnet101")
        dilate_bottleneck = dilated and bottleneck
        net = build(
            weights=None, replace_stride_with_dilation=[False, False, True] if dilate_bottleneck else None
        )
        if dilated and not bottleneck:
            _dilate_basic_layer(net.layer4)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        expansion = 4 if bottleneck else 1
        self.channels: list[int] = [64] + [c * expansion for c in (64, 128, 256, 512)]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if pretrained or weights_path is not None:
            state = _imagenet_state_dict(name, weights_path)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            try:
                self.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise PretrainedWeightsError(
                    f"the {name} weights do not fit the encoder ({str(exc).splitlines()[0]}); "
                    f"is it a torchvision {name} ImageNet state dict?"
                ) from None

    def last_layer(self) -> list[nn.Parameter]:
        """The weight of the encoder's last convolution (the last layer shared by tasks on this encoder)."""
        return [[m for m in self.layer4.modules() if isinstance(m, nn.Conv2d)][-1].weight]

    def normalise(self, image: Tensor) -> Tensor:
        """RGB in [0,1] -> the ImageNet-normalised input of stage 0."""
        return (image - self.mean) / self.std

    def stage(self, k: int, x: Tensor) -> Tensor:
        """Stage k (0 stem, 1..4 layer1..layer4) on the previous stage's map (stage 0: the normalised image)."""
        if k == 0:
            return self.relu(self.bn1(self.conv1(x)))
        if k == 1:
            return self.layer1(self.maxpool(x))
        return (self.layer2, self.layer3, self.layer4)[k - 2](x)

    def forward(self, image: Tensor) -> list[Tensor]:
        """image [B,3,H,W] in [0,1] -> five feature maps (strides 2, 4, 8, 16, 16; 32 last if not dilated)."""
        maps, x = [], self.normalise(image)
        for k in range(5):
            x = self.stage(k, x)
            maps.append(x)
        return maps
