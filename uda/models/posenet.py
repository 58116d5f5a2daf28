"""Pose network for self-supervised depth: a ResNet on a pair of frames -> relative camera motion.

Convention (used by ``relative_pose`` and the photometric loss): ``PoseNet(frame_a, frame_b)`` with a
before b in time predicts the parameters (axis-angle in radians, translation in metres) of
``T_a_to_b = [R | t]``, the transform that maps camera-a points into camera b: X_b = R X_a + t.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from uda.geometry import pose_vec_to_mat
from uda.models.backbone import (
    _IMAGENET_MEAN,
    _IMAGENET_STD,
    _RESNETS,
    PretrainedWeightsError,
    _imagenet_state_dict,
)

# Scales the raw decoder output so that an untrained net predicts a near-identity motion.
_MOTION_SCALE = 0.01


class PoseNet(nn.Module):
    """ResNet encoder on two stacked RGB frames (6 channels) + a small conv decoder -> (axis_angle, translation).

    Each frame is ImageNet-normalised; the first conv takes both. With ImageNet weights the 3-channel
    kernel is duplicated for the second frame and halved, so a pair of identical frames gives the same
    first-layer response as the pretrained net on one frame. Decoder: 1x1 conv to 256 + ReLU, two 3x3
    convs of 256 + ReLU, 1x1 conv to 6, spatial mean, times 0.01.

    ``forward_motion`` (depth units per frame, >= 0) sets the initial translation of an untrained net to a
    camera moving forward: T_a_to_b has t_z = -forward_motion (a before b; scene points come closer). From
    a flat initial depth and a near-zero motion, the first warps of a driving scene are explained better by
    a sideways image shift than by forward motion, and joint depth/pose training from scratch locks into
    that wrong-signed pose; a forward start avoids it and also sets the initial depth gauge (an
    untrained sigmoid disparity head predicts ~0.2 units, so 0.015 per frame puts a 0.5 m/frame camera at
    ~33 m per unit, where 3-80 m fits the [0.1, 100] output range). 0 keeps Monodepth2's near-identity start.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        weights_path: str | None = None,
        forward_motion: float = 0.0,
    ):
        super().__init__()
        if forward_motion < 0:
            raise ValueError(f"forward_motion={forward_motion} must be >= 0 (depth units per frame)")
        if backbone not in _RESNETS:
            raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(_RESNETS)}")
        net: tv_resnet.ResNet = _RESNETS[backbone][0](weights=None)
        if pretrained or weights_path is not None:
            state = {
                k: v
                for k, v in _imagenet_state_dict(backbone, weights_path).items()
                if not k.startswith("fc.")
            }
            try:
                # strict=False only because the classifier was dropped; any other missing key is an error.
                result = net.load_state_dict(state, strict=False)
                bad = [k for k in result.missing_keys if not k.startswith("fc.")] + list(
                    result.unexpected_keys
                )
                if bad:
                    raise RuntimeError(f"missing or unexpected keys {bad[:4]}")
            except RuntimeError as exc:
                raise PretrainedWeightsError(
                    f"the {backbone} weights do not fit the pose encoder ({str(exc).splitlines()[0]}); "
                    f"is it a torchvision {backbone} ImageNet state dict?"
                ) from None
        conv1 = nn.Conv2d(6, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained or weights_path is not None:
            with torch.no_grad():
                # Halving keeps the response to a pair of identical frames equal to the 3-channel one.
                conv1.weight.copy_(torch.cat([net.conv1.weight, net.conv1.weight], dim=1) / 2)
        else:
            # A fresh init as torchvision's; duplicating a random kernel would make the untrained net
            # blind to the order of the frames.
            nn.init.kaiming_normal_(conv1.weight, mode="fan_out", nonlinearity="relu")
        self.encoder = nn.Sequential(
            conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        channels = net.fc.in_features
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 256, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 6, 1),
        )
        with torch.no_grad():  # outputs: axis-angle (0-2), translation (3-5); z is the optical axis
            self.decoder[-1].bias[5] -= forward_motion / _MOTION_SCALE
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, frame_a: Tensor, frame_b: Tensor) -> tuple[Tensor, Tensor]:
        """Frames [B,3,H,W] in [0,1], a before b -> axis-angle [B,3] (radians) and translation [B,3] (metres)
        of T_a_to_b."""
        x = torch.cat([(frame_a - self.mean) / self.std, (frame_b - self.mean) / self.std], dim=1)
        out = self.decoder(self.encoder(x)).mean(dim=(2, 3)) * _MOTION_SCALE
        return out[:, :3], out[:, 3:]

    def param_groups(self, lr: float) -> list[dict]:
        """One optimiser parameter group at learning rate `lr` (the pose net has its own rate)."""
        return [{"params": list(self.parameters()), "lr": lr, "name": "pose"}]


def relative_pose(
    posenet: PoseNet | Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    target: Tensor,
    source: Tensor,
    offset: int,
) -> Tensor:
    """T_target_to_source [B,4,4] for a source frame `offset` steps from the target (frames [B,3,H,W]).

    One pose-net pass with the frames in temporal order: for offset > 0 the pair is (target, source), whose
    T_a_to_b is T_target_to_source as it is; for offset < 0 the pair is (source, target), whose T_a_to_b is
    T_source_to_target, so it is inverted exactly ([R^T | -R^T t]).
    """
    if offset == 0:
        raise ValueError("offset 0 is the target frame itself; a source frame has offset != 0")
    if offset > 0:
        axis_angle, translation = posenet(target, source)
    else:
        axis_angle, translation = posenet(source, target)
    return pose_vec_to_mat(axis_angle, translation, invert=offset < 0)
