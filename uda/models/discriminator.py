"""Patch discriminator for output-level adversarial domain adaptation."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


class PatchDiscriminator(nn.Module):
    """Five 4x4 stride-2 convs (ndf, 2ndf, 4ndf, 8ndf, 1), LeakyReLU(0.2) between; optional spectral norm.

    Input [B,in_channels,H,W] -> patch logits [B,1,~H/32,~W/32] (e.g. 64x128 -> 2x4). No augmentation here:
    the random flip of its input (adapt.flip_inputs, as in the authors' code) belongs to the objective.
    """

    def __init__(self, in_channels: int, ndf: int = 64, spectral_norm: bool = False):
        super().__init__()
        widths = [in_channels, ndf, ndf * 2, ndf * 4, ndf * 8, 1]
        layers: list[nn.Module] = []
        for index, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
            layers.append(_spectral_norm(conv) if spectral_norm else conv)
            if index < len(widths) - 2:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,in_channels,H,W] -> logits [B,1,H/32,W/32]."""
        return self.net(x)
