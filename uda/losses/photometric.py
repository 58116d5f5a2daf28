"""Self-supervised depth from video: photometric error, minimum reprojection with auto-masking, smoothness.

Written from the published formulas of Monodepth2 (Godard et al., ICCV 2019, §3 and §3.3) and SSIM (Wang et
al., 2004); see seeds-digest §1.9. Images are float in [0, 1]; depth is metres; poses follow
``uda.geometry`` (``T_target_to_source`` maps target-camera points into the source camera).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.geometry import disparity_to_depth, warp_frame
from uda.hardware import autocast_off

# SSIM stabilisers for a dynamic range L = 1: C1 = (0.01 L)^2, C2 = (0.03 L)^2.
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def _box3(x: Tensor) -> Tensor:
    """3x3 box-window mean of [B,C,H,W] with reflection padding (same size out)."""
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), kernel_size=3, stride=1)


def ssim_dissimilarity(x: Tensor, y: Tensor) -> Tensor:
    """(1 - SSIM(x, y)) / 2 clamped to [0, 1], per pixel and channel [B,C,H,W]; images [B,C,H,W] in [0, 1].

    SSIM uses local statistics over a 3x3 box window (uniform weights, biased variances E[x^2] - mu^2)
    with reflection padding, C1 = 0.01^2 and C2 = 0.03^2 and no extra epsilon.
    """
    # Not kornia.metrics.ssim: its window is a Gaussian with sigma 1.5 whatever the size (3 taps weigh
    # 0.284/0.351/0.284, not 1/3 each) and it adds eps to the denominator, so it is not the published
    # 3x3 box-window SSIM. The box filter with reflection padding is two torch ops.
    mu_x, mu_y = _box3(x), _box3(y)
    sigma_x = _box3(x * x) - mu_x * mu_x
    sigma_y = _box3(y * y) - mu_y * mu_y
    sigma_xy = _box3(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * sigma_xy + SSIM_C2)
    denominator = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (sigma_x + sigma_y + SSIM_C2)
    return ((1 - numerator / denominator) / 2).clamp(0.0, 1.0)


def photometric_error(pred: Tensor, target: Tensor, alpha: float = 0.85) -> Tensor:
    """Per-pixel error [B,1,H,W] = alpha (1 - SSIM)/2 + (1 - alpha) |pred - target|, both channel-averaged."""
    l1 = (pred - target).abs().mean(dim=1, keepdim=True)
    ssim = ssim_dissimilarity(pred, target).mean(dim=1, keepdim=True)
    return alpha * ssim + (1 - alpha) * l1


def min_reprojection(
    target: Tensor,
    warped_sources: Sequence[Tensor],
    sources: Sequence[Tensor],
    automask: bool = True,
    noise: float = 1e-5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel minimum over sources of the reprojection error [B,1,H,W], the auto-mask [B,1,H,W] bool, and
    Monodepth2's per-pixel loss value [B,1,H,W]: the minimum where the mask keeps the pixel, else the (detached)
    identity error that won, so its mean is the mean of the minimum over identity and reprojection errors.

    ``warped_sources[i]`` is ``sources[i]`` warped onto the target view; all are [B,3,H,W] in [0, 1]. The
    returned loss is the minimum over the warped sources only. The mask is True where the pixel is trained:
    with ``automask``, the identity errors pe(target, source) of the unwarped sources, plus Gaussian noise of
    std ``noise`` drawn from ``generator`` (torch's global RNG when None) to break ties, join the minimum, and
    a pixel whose minimum is an identity error (static scene, camera standing still, object moving with the
    camera) is masked out (False). Without ``automask`` the mask is all True.
    """
    if len(warped_sources) == 0 or len(warped_sources) != len(sources):
        raise ValueError(
            f"need as many warped as unwarped sources (>0), got {len(warped_sources)}/{len(sources)}"
        )
    reprojection = torch.cat([photometric_error(w, target) for w in warped_sources], dim=1)
    loss = reprojection.min(dim=1, keepdim=True).values
    if not automask:
        return loss, torch.ones_like(loss, dtype=torch.bool), loss
    with torch.no_grad():
        # The identity errors depend on no parameter; they only decide which pixels are kept.
        identity = torch.cat([photometric_error(s, target) for s in sources], dim=1)
        identity = identity + noise * torch.randn(
            identity.shape, generator=generator, device=identity.device, dtype=identity.dtype
        )
        floor = identity.min(dim=1, keepdim=True).values
        keep = loss.detach() < floor
    return loss, keep, torch.where(keep, loss, floor)


def smoothness_loss(disp: Tensor, image: Tensor) -> Tensor:
    """Edge-aware smoothness (scalar) of disparity [B,1,H,W] against image [B,3,H,W] of the same size.

    mean |dx d*| exp(-|dx I|) + mean |dy d*| exp(-|dy I|) with d* = d / mean(d) per image (scale-free, so
    shrinking the disparity cannot lower it) and image gradients averaged over channels.
    """
    disp = disp / (disp.mean(dim=(2, 3), keepdim=True) + 1e-7)
    grad_disp_x = (disp[..., :, 1:] - disp[..., :, :-1]).abs()
    grad_disp_y = (disp[..., 1:, :] - disp[..., :-1, :]).abs()
    grad_img_x = (image[..., :, 1:] - image[..., :, :-1]).abs().mean(dim=1, keepdim=True)
    grad_img_y = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=1, keepdim=True)
    return (grad_disp_x * torch.exp(-grad_img_x)).mean() + (grad_disp_y * torch.exp(-grad_img_y)).mean()


class PhotometricLoss(nn.Module):
    """Monodepth2's self-supervised depth loss over scales: min reprojection + auto-masking + smoothness.

    Each scale's sigmoid disparity is upsampled bilinearly to the input size before warping ("full-res
    multi-scale"), turned into metres with ``disparity_to_depth(min_depth, max_depth)``, and every source
    frame is warped onto the target with its pose. The photometric term is Monodepth2's: the per-pixel minimum
    over reprojection and identity errors averaged over all pixels (auto-masked pixels add their identity
    error, without gradient); the smoothness term, weighted
    ``smoothness_weight / 2^s``, acts on the scale's own disparity against the target resized to it. The
    loss is the mean over scales. Pixels warped from outside a source view are not masked (border
    padding, as published): the minimum over sources usually picks a source that sees them.
    """

    def __init__(
        self,
        scales: Sequence[int] = (0, 1, 2, 3),
        smoothness_weight: float = 1e-3,
        min_depth: float = 0.1,
        max_depth: float = 100.0,
        automask: bool = True,
    ):
        super().__init__()
        self.scales = tuple(scales)
        self.smoothness_weight = smoothness_weight
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.automask = automask

    def forward(
        self,
        disparities: Mapping[int, Tensor],
        target: Tensor,
        sources: Mapping[int, Tensor],
        poses: Mapping[int, Tensor],
        K: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss (scalar) and logs from sigmoid disparities {s: [B,1,H/2^s,W/2^s]}, target [B,3,H,W] in [0,1],
        source frames {offset: [B,3,H,W]}, poses {offset: T_target_to_source [B,4,4]} and K [B,3,3] (pixels
        of the full-size target). Computed in float32 with autocast off, whatever the training precision.
        """
        if set(sources) != set(poses) or not sources:
            raise ValueError(
                f"sources {sorted(sources)} and poses {sorted(poses)} must name the same offsets"
            )
        with autocast_off(target.device):  # warping and SSIM need float32 (see uda.geometry.in_float32)
            return self._loss(
                {s: d.float() for s, d in disparities.items()},
                target.float(),
                {o: f.float() for o, f in sources.items()},
                {o: p.float() for o, p in poses.items()},
                K.float(),
            )

    def _loss(self, disparities, target, sources, poses, K) -> tuple[Tensor, dict[str, float]]:
        offsets = sorted(sources)
        size = target.shape[-2:]
        total = target.new_zeros(())
        # Detached per-scale values, read back with one device sync at the end.
        stats = []
        for scale in self.scales:
            disp = disparities[scale]
            disp_full = F.interpolate(disp, size=size, mode="bilinear", align_corners=False)
            depth = disparity_to_depth(disp_full, self.min_depth, self.max_depth)
            warped = [warp_frame(sources[o], depth, poses[o], K)[0] for o in offsets]
            _, keep, value = min_reprojection(
                target, warped, [sources[o] for o in offsets], automask=self.automask
            )
            keep_f = keep.to(value.dtype)
            # Monodepth2's mean over every pixel of the minimum over identity and reprojection errors: masked
            # pixels add their identity error, which no parameter changes (dividing by the kept pixels instead
            # would raise the term's weight against smoothness as more are masked; counting them 0 would make
            # the value rise as training keeps more pixels).
            photometric = value.mean()

            image = target
            if disp.shape[-2:] != size:
                image = F.interpolate(
                    target, size=disp.shape[-2:], mode="bilinear", align_corners=False, antialias=True
                )
            smoothness = smoothness_loss(disp, image)

            total = total + photometric + self.smoothness_weight / 2**scale * smoothness
            stats.append(torch.stack([photometric, smoothness, 1.0 - keep_f.mean()]).detach())
        n = len(self.scales)
        photometric_mean, smoothness_mean, masked_mean = torch.stack(stats).mean(dim=0).tolist()
        logs = {
            "loss/photometric": photometric_mean,
            # Unweighted smoothness, averaged over scales.
            "loss/smoothness": smoothness_mean,
            # Fraction of pixels the auto-mask removed (an identity error won), averaged over scales.
            "automask_fraction": masked_mean,
        }
        return total / n, logs
