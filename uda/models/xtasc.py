"""XTasC-Net (Nakano et al., "Cross-Task Consistency Learning", §IV-A): U-Net multi-task network and TTNets.

`XTasCUNet` is the multi-task part (ResNet encoder, one U-Net decoder per task) and maps an RGB batch
[B,3,H,W] in [0,1] to `{task: {0: prediction [B,C_task,H,W]}}` like the other models of uda.models.
`TransferNet` is a task-transfer network (TTNet): it maps one task's prediction to another task's.
With the readings documented below, XTasCUNet(segmentation 7 + depth 1) plus TransferNet(7->1) and
TransferNet(1->7) has 2.144e7 / 3.155e7 / 4.041e7 parameters for ResNet-18 / 34 / 50 (paper Table V:
2.14e7 / 3.15e7 / 4.04e7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.config import ModelConfig
from uda.models.backbone import ResNetEncoder
from uda.models.decoder import output_head
from uda.models.multitask import Outputs, _head_bias, _sigmoid_head, _split_params

XTASC_TASKS = ("semseg", "depth")
DECODER_CHANNELS = 128  # paper §IV-A: every decoder conv has 128 channels


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """2 x (Conv3x3 + ReLU), spatial size kept."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.ReLU(inplace=True),
    )


class TransferNet(nn.Module):
    """XTasC task-transfer network (TTNet): [B,in_channels,H,W] -> raw [B,out_channels,H,W], any H, W.

    Contracting path: 3 blocks of 2 x (Conv3x3 + ReLU) + 2x2 max-pool (channels[0..2], down to 1/8).
    Expansive path: 3 blocks of 2 x (Conv3x3 + ReLU) + x2 bilinear upsampling with channels[1], channels[0],
    channels[0]; blocks 2 and 3 first concatenate the pooled output of contracting block 2 (1/4) and 1 (1/2),
    U-Net style. Final 1x1 conv to out_channels. Choices where the paper is silent: the concatenated skips
    are the natural reading of "similar to U-Net" and the only reading that reproduces the parameter counts
    of Table V (without them the totals fall 0.5-0.8 % short, with them they are within 0.2 %); bilinear
    upsampling as in the authors' code. Inputs whose H, W are not multiples of 8 are padded at the bottom
    and right by edge replication and the output is cropped back, so predictions stay pixel-aligned.
    """

    def __init__(self, in_channels: int, out_channels: int, channels: Sequence[int] = (64, 128, 256)):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"TransferNet needs 3 contracting channel counts, got {tuple(channels)}")
        c1, c2, c3 = channels
        self.down = nn.ModuleList([_double_conv(in_channels, c1), _double_conv(c1, c2), _double_conv(c2, c3)])
        self.up = nn.ModuleList([_double_conv(c3, c2), _double_conv(c2 + c2, c1), _double_conv(c1 + c1, c1)])
        self.head = nn.Conv2d(c1, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,in_channels,H,W] -> raw [B,out_channels,H,W] (same units as the target task's prediction)."""
        h, w = x.shape[-2:]
        factor = 2 ** len(self.down)
        pad_h, pad_w = -h % factor, -w % factor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for block in self.down:
            x = F.max_pool2d(block(x), 2, 2)
            skips.append(x)
        for index, block in enumerate(self.up):
            if index > 0:
                x = torch.cat([x, skips[-1 - index]], dim=1)
            x = F.interpolate(block(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.head(x)[..., :h, :w]


def UNetResNetEncoder(name: str = "resnet34", pretrained: bool = False, weights_path: str | None = None):
    """torchvision ResNet without dilation or classifier: five maps at strides 2, 4, 8, 16, 32 (see
    ResNetEncoder; ImageNet weights load the same way)."""
    return ResNetEncoder(name, pretrained, weights_path, dilated=False)


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No conv bias: the BatchNorm that follows has its own shift.
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(True),
    ]


class XTasCDecoder(nn.Module):
    """One task's U-Net decoder: 5 blocks of 3 x (Conv3x3 + BN + ReLU) at 128 channels, then the output head.

    Block 1 takes the deepest encoder map (1/32); block k > 1 takes concat(block k-1 output, encoder map at
    the same resolution: 1/16, 1/8, 1/4, 1/2). Each block ends with a bilinear upsampling to the next map's
    size (x2 when H, W are multiples of 32), the last one to the image size.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        out_channels: int,
        sigmoid: bool = False,
        bias: float | None = None,
        channels: int = DECODER_CHANNELS,
    ):
        super().__init__()
        if len(encoder_channels) != 5:
            raise ValueError("the XTasC decoder needs the 5 encoder maps (strides 2..32)")
        ins = [encoder_channels[4]] + [channels + c for c in reversed(encoder_channels[:4])]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *_conv_bn_relu(i, channels),
                *_conv_bn_relu(channels, channels),
                *_conv_bn_relu(channels, channels),
            )
            for i in ins
        )
        self.head = output_head(channels, out_channels, sigmoid, bias)

    def forward(self, feats: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """feats: the five encoder maps; size: output (H, W). Returns [B,out_channels,H,W]."""
        x = feats[4]
        for k, block in enumerate(self.blocks):
            if k > 0:
                x = torch.cat([x, feats[4 - k]], dim=1)
            target = feats[3 - k].shape[-2:] if k < 4 else size
            x = F.interpolate(block(x), size=tuple(target), mode="bilinear", align_corners=False)
        return self.head(x)


class XTasCUNet(nn.Module):
    """XTasC-Net without its TTNets: undilated ResNet encoder shared by all tasks, one U-Net decoder per task.

    tasks: task -> output channels. image [B,3,H,W] in [0,1] -> {task: {0: [B,C_task,H,W]}}; raw outputs,
    except depth with cfg.depth_output == "disparity" (sigmoid, in (0,1)); a raw depth head starts at
    cfg.depth_init.
    """

    def __init__(self, tasks: Mapping[str, int], cfg: ModelConfig):
        super().__init__()
        if not tasks:
            raise ValueError("XTasCUNet needs at least one task")
        self.tasks = tuple(tasks)
        self.encoder = UNetResNetEncoder(cfg.backbone, cfg.pretrained, cfg.weights_path)
        self.decoders = nn.ModuleDict(
            {
                t: XTasCDecoder(self.encoder.channels, n, _sigmoid_head(t, cfg), _head_bias(t, cfg))
                for t, n in tasks.items()
            }
        )

    def forward(self, image: Tensor) -> Outputs:
        """image [B,3,H,W] in [0,1] -> {task: {0: [B,C_task,H,W]}} for any H, W."""
        feats = self.encoder(image)
        size = tuple(image.shape[-2:])
        return {t: {0: self.decoders[t](feats, size)} for t in self.tasks}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """{"backbone": encoder parameters, "decoder": the task decoders}."""
        return _split_params(self, [self.encoder])

    def shared_layer(self, task: str) -> list[nn.Parameter]:
        """The last layer shared by all tasks (weight of layer4's last conv), e.g. for GradNorm."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model predicts {', '.join(self.tasks)}")
        return self.encoder.last_layer()
