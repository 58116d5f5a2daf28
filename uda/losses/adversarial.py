"""Output-level adversarial alignment helpers (DenseMTL §4.5, ADVENT-style): discriminator inputs, labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Paper Eq. 7/8: the discriminator labels source outputs 1 and target outputs 0; the generator pushes
# target outputs towards 1. (The released code used the flipped pair src=0/tgt=1, which is equivalent.)
SOURCE_LABEL = 1.0
TARGET_LABEL = 0.0


def entropy_map(logits: Tensor) -> Tensor:
    """Weighted self-information -p log p / log C of softmax(logits) [B,C,H,W], per class channel. Unitless.

    Each channel lies in [0, 1/(e log C)]; the sum over channels is the normalised entropy, in [0, 1],
    equal to 0 for a one-hot prediction and to 1 for a uniform one (paper Eq. 10, ADVENT).
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError("entropy_map needs at least 2 classes")
    # log_softmax is exact where softmax underflows to 0, so p*log p is 0 there instead of 0*(-inf) = nan.
    log_p = F.log_softmax(logits, dim=1)
    return -log_p.exp() * log_p / math.log(num_classes)


def normalise_depth_for_discriminator(pred_g: Tensor, g_min: float, g_max: float) -> Tensor:
    """Map predicted inverse normalised depth g [B,1,H,W] to [0, 1] with a fixed source range of g."""
    # The released code used the current source batch's GT range, so the same prediction was mapped
    # differently from batch to batch; a fixed range over the source dataset keeps the scale stable.
    if not g_max > g_min:
        raise ValueError(f"need g_max > g_min, got {g_min}, {g_max}")
    return ((F.relu(pred_g) - g_min) / (g_max - g_min)).clamp(0.0, 1.0)


def bce_with_domain(logits: Tensor, is_source: bool) -> Tensor:
    """Mean BCE of discriminator logits against the constant domain label (source 1, target 0)."""
    label = SOURCE_LABEL if is_source else TARGET_LABEL
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))
