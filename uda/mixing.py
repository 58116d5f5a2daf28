"""Cross-domain mixing for self-training: ClassMix (Olsson et al. 2021, as in DACS) and its depth-aware variant
(DepthMix, CorDA: Wang et al. 2021).

A mix mask is bool [B,1,H,W], true where the mixed image takes the SOURCE pixel. Everything that lives on the
pixel grid (image, semseg labels, depth, normals, per-pixel loss weights) follows the mask pixel for pixel;
what describes the camera (the intrinsics K) stays the TARGET's: the mixed image is a target image with source
objects pasted on it, seen through the target camera.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = 255


def class_mix_mask(labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """ClassMix mask [B,1,H,W] (bool) from source class ids [B,H,W]: per image, ceil(n/2) of its n present
    classes (ignore 255 excluded) chosen at random; true on their pixels. Draws from the CPU `generator` (the
    global CPU RNG when None), so the draw does not depend on the device."""
    masks = []
    for label in labels:
        present = torch.unique(label)
        present = present[present != IGNORE_INDEX]
        n = int(present.numel())
        chosen = present[torch.randperm(n, generator=generator)[: (n + 1) // 2].to(present.device)]
        masks.append(torch.isin(label, chosen))
    return torch.stack(masks)[:, None]


def depth_mix_mask(class_mask: Tensor, source_depth: Tensor, target_depth: Tensor) -> Tensor:
    """DepthMix (CorDA): the ClassMix mask kept only where the source pixel is nearer than the target surface,
    source_depth < target_depth (both metres, [B,1,H,W]); a source pixel without a depth measurement (0) is
    never pasted, so no source pixel ever lands behind a nearer target surface."""
    return class_mask & (source_depth > 0) & (source_depth < target_depth)


def mix(mask: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """Per pixel: source where `mask` ([B,1,H,W], broadcast over channels; [B,H,W] tensors take mask[:, 0]),
    target elsewhere."""
    m = mask[:, 0] if source.dim() == 3 else mask
    return torch.where(m, source, target)


def mix_samples(
    mask: Tensor, source: Mapping[str, Any], target: Mapping[str, Any], keys: tuple[str, ...]
) -> dict[str, Any]:
    """The mixed sample dict: each of `keys` (dense [B,C,H,W] or [B,H,W] tensors present in both) mixed by
    `mask`; the intrinsics K and everything else per image are the target's."""
    out = {k: v for k, v in target.items() if k not in keys}
    for k in keys:
        out[k] = mix(mask, source[k], target[k])
    if "K" in target:
        out["K"] = target["K"]
    return out
