"""Task decoders: the "3-ways" decoder (ASPP, four upsampling stages with skips, side heads) and the DeepLab head.

The 3-ways decoder runs stage by stage (`stage(s, x, skips)`) so that the multi-task model can insert an
exchange block after any stage; `head(s, x)` turns stage-s features into the task prediction at scale s.
The DeepLab head (`DeepLabDecoder`) maps the deepest encoder map straight to a full-resolution prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

ASPP_RATES = (6, 12, 18)  # 3-ways decoder
DEEPLAB_RATES = (12, 24, 36)  # DeepLab head of the MTL survey (Vandenhende et al., TPAMI 2021)
DEEPLAB_CHANNELS = 256


class ConvBlock(nn.Sequential):
    """3x3 conv with reflection padding (no border artefacts in dense maps) + ELU, no normalisation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.ReflectionPad2d(1), nn.Conv2d(in_channels, out_channels, 3), nn.ELU(inplace=True))


class ScaledConv(nn.Conv2d):
    """A 1x1 conv whose output is multiplied by a fixed `scale`: a raw head whose targets are far from unit size
    (inverse normalised depth, tens to hundreds) on unit-size features moves its output `scale` times further per
    Adam step (Adam's steps do not grow with the gradient)."""

    def __init__(self, in_channels: int, out_channels: int, scale: float):
        super().__init__(in_channels, out_channels, 1)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) * self.scale


def output_head(
    in_channels: int, out_channels: int, sigmoid: bool, bias: float | None = None, scale: float | None = None
) -> nn.Module:
    """Side output: 1x1 conv (raw output), or 3x3 reflection-padded conv + sigmoid (disparity).

    `bias` sets the initial output of a raw head (e.g. a plausible inverse depth instead of 0 = infinitely far);
    `scale` multiplies a raw head's output by a constant (`ScaledConv`).
    """
    if sigmoid:
        return nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(in_channels, out_channels, 3), nn.Sigmoid())
    conv = (
        nn.Conv2d(in_channels, out_channels, 1)
        if scale is None
        else ScaledConv(in_channels, out_channels, scale)
    )
    if bias is not None:
        nn.init.constant_(conv.bias, bias / (scale or 1.0))
    return conv


class TaskDecoder(nn.Module):
    """One task's decoder. Stage s yields `channels[s]` channels at 1/2^s of the input (s = 4 ... 0).

    encoder_channels: channels of the five encoder maps (strides 2, 4, 8, 16, 16).
    head_scales: scales that get a side output head; sigmoid: disparity heads instead of raw 1x1 convs;
    bias: initial output of raw heads (see `output_head`).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int],
        out_channels: int,
        channels: Sequence[int] = (64, 128, 128, 256, 256),
        head_scales: Sequence[int] = (0,),
        sigmoid: bool = False,
        bias: float | None = None,
    ):
        super().__init__()
        if len(encoder_channels) != 5 or len(channels) != 5:
            raise ValueError("the decoder needs 5 encoder maps and 5 decoder channel counts (scales 0..4)")
        self.channels = tuple(channels)
        first, second = [], []
        for s in range(5):
            if s == 4:
                first.append(ASPP(encoder_channels[4], ASPP_RATES, channels[4]))
            else:
                first.append(ConvBlock(channels[s + 1], channels[s]))
            skip = encoder_channels[s - 1] if s > 0 else 0
            second.append(ConvBlock(channels[s] + skip, channels[s]))
        self.first = nn.ModuleList(first)
        self.second = nn.ModuleList(second)
        self.heads = nn.ModuleDict(
            {str(s): output_head(channels[s], out_channels, sigmoid, bias) for s in head_scales}
        )

    def stage(
        self, s: int, x: Tensor, skips: Sequence[Tensor], size: tuple[int, int] | None = None
    ) -> Tensor:
        """Run stage s on x (the deepest encoder map for s=4, else stage s+1's output).

        skips: the five encoder maps; stage s > 0 concatenates skips[s-1]. size: output size of stage 0
        (the input image size; default twice x's size). Returns [B, channels[s], ~H/2^s, ~W/2^s].
        """
        x = self.first[s](x)
        if s > 0:
            skip = skips[s - 1]
            # Upsample to the skip's exact size (odd input sizes); no-op at the dilated stage 4.
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.cat([x, skip], dim=1)
        else:
            x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.second[s](x)

    def head(self, s: int, x: Tensor) -> Tensor:
        """Prediction at scale s from stage-s features."""
        return self.heads[str(s)](x)


class DeepLabDecoder(nn.Sequential):
    """DeepLab-v3 head of the MTL survey: [B,C_in,h,w] deepest map -> [B,out_channels,H,W] at `size`.

    ASPP (torchvision's: 1x1 + three 3x3 atrous at rates 12/24/36 + image pooling, 256 ch, 1x1 projection +
    BN + ReLU + Dropout 0.5), Conv3x3 + BN + ReLU, then `output_head` at 1/16 of the input, upsampled
    bilinearly to `size`. Laid out as torchvision's `DeepLabHead` (same module indices, so its state dict
    fits), except that the last layer comes from `output_head`: with sigmoid=True (disparity) it is a 3x3
    reflection-padded conv + sigmoid instead of the 1x1 conv, which needs the deepest map to be >= 2 px a side.
    In training a forward needs >= 2 images (the image-pooling branch's BatchNorm sees one value per image).
    """

    def __init__(self, in_channels: int, out_channels: int, sigmoid: bool = False, bias: float | None = None):
        super().__init__(
            ASPP(in_channels, DEEPLAB_RATES, DEEPLAB_CHANNELS),
            nn.Conv2d(DEEPLAB_CHANNELS, DEEPLAB_CHANNELS, 3, padding=1, bias=False),
            nn.BatchNorm2d(DEEPLAB_CHANNELS),
            nn.ReLU(),
            output_head(DEEPLAB_CHANNELS, out_channels, sigmoid, bias),
        )

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """x: deepest encoder map (output stride 16). size: output (H, W), the input image size (default 16x x).

        Returns the prediction [B, out_channels, H, W], bilinearly upsampled from 1/16 resolution.
        """
        for layer in self:
            x = layer(x)
        # Bilinear (not nearest) as the survey's code: a smooth x16 upsampling of the coarse prediction.
        return F.interpolate(
            x, size=size, scale_factor=None if size else 16.0, mode="bilinear", align_corners=False
        )
