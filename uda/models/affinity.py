"""Affinity-based exchange blocks: PAP-Net's pattern-affinitive propagation and CTAL (cross-task affinity learning).

Both blocks define dense pixel affinities (HW x HW per task and sample) on the task features, propagate features
with them and blend: out_t = gamma * propagated_t + (1 - gamma) * f_t (model.affinity_gamma, 0.05 for both
papers). At stride 4 of a 288x384 input (72x96 = 6912 positions) one HW x HW matrix is 191 MB in float32.
PAP's softmax affinities have to be formed: it holds the T affinities and, in training, one combined matrix per
target task (model.checkpointing recomputes the latter). CTAL's affinity is linear in Gram matrices, so it is
computed exactly in factored form, in time and memory linear in HW, without any HW x HW matrix.

- `PAPPropagation` (registered as "pap"): Zhang et al., CVPR 2019.
- `CTAL` (registered as "ctal"): Sinodinos & Armanfard (WACV 2025; arXiv 2401.11124, first titled EMA-Net).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.models.exchange import ExchangeBlock

if TYPE_CHECKING:
    from uda.config import ModelConfig


def _check_gamma(gamma: float) -> None:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"model.affinity_gamma must lie in [0, 1] (0.05 in PAP-Net and CTAL), got {gamma}")


class PAPPropagation(ExchangeBlock):
    """PAP-Net pattern-affinitive propagation (Zhang, Cui, Xu, Yan, Sebe, Yang, CVPR 2019) on the task features.

    What the paper fixes: each task learns a pixel affinity matrix from its features ("affinity learning
    layer"); cross-task propagation combines the matrices of all tasks with learned weights, a different
    combination per target task; task-specific propagation diffuses the target's features iteratively with its
    combined matrix, and the diffused features are blended with the input by a factor (0.05, the value CTAL
    takes "like PAP-Net", seeds digest section 2.4).

    What is chosen here (per target task t, sources s, features f_t [B,C,H,W]):
      embedding   e_t = L2-normalise over channels of Conv1x1_t(f_t) (C -> C, with bias);
      affinity    A_t = softmax over source positions j of cos(e_t[i], e_t[j]) / temperature (0.1), so every
                  row sums to one and propagation is a weighted average (it keeps a constant map constant);
      combination Â_t = sum_s w_{t,s} A_s, w_t = softmax(logits_t) over the T sources; the logits start at
                  log(self_weight) for s = t and log((1 - self_weight) / (T - 1)) otherwise (self_weight 0.5:
                  the target's own affinity weighs as much as all other tasks together, like cross-stitch
                  units start near the separate networks); Â_t stays row-stochastic;
      diffusion   f^0 = f_t, f^{k+1} = Â_t f^k for K = model.pap_iterations steps, then
                  out_t = gamma * f^K + (1 - gamma) * f_t (gamma = model.affinity_gamma). The EMA-Net authors'
                  re-implementation blends inside the loop (f^{k+1} = gamma Â f^k + (1 - gamma) f^0); both agree at K = 1.
    Parameters: T (C^2 + C) + T^2, i.e. 0.018 M for four tasks at 67 channels (HRNetV2-W18-small task features):
    about ATRC's Table 1 difference between PAP (4.54 M) and the multi-task baseline (4.52 M), together with the
    intermediate heads MultiScaleModel adds for every exchange block.
    The affinity is computed at the resolution the block is given (no subsampling of positions).
    """

    CHECKPOINT_METHODS = ("propagate",)  # model.checkpointing: recompute each target's combined matrix

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        gamma: float = 0.05,
        iterations: int = 1,
        temperature: float = 0.1,
        self_weight: float = 0.5,
    ):
        super().__init__(tasks, channels)
        self._check_pairs()
        _check_gamma(gamma)
        if iterations < 1:
            raise ValueError(f"model.pap_iterations must be >= 1, got {iterations}")
        if temperature <= 0:
            raise ValueError(f"PAP affinity temperature must be > 0, got {temperature}")
        if not 0.0 < self_weight < 1.0:
            raise ValueError(f"PAP initial self weight must lie in (0, 1), got {self_weight}")
        self.gamma = gamma
        self.iterations = iterations
        self.temperature = temperature
        n = len(self.tasks)
        self.embed = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in self.tasks})
        logits = torch.full((n, n), math.log((1.0 - self_weight) / (n - 1)))
        logits.fill_diagonal_(math.log(self_weight))
        self.mix = nn.Parameter(logits)  # [target, source]

    @classmethod
    def from_config(cls, tasks: Sequence[str], channels: int, cfg: ModelConfig, scale: int) -> PAPPropagation:
        return cls(tasks, channels, gamma=cfg.affinity_gamma, iterations=cfg.pap_iterations)

    def mixing_weights(self) -> Tensor:
        """[T, T] weights w[t, s] of source affinity s for target t (rows sum to one)."""
        return torch.softmax(self.mix, dim=1)

    def affinities(self, *features: Tensor) -> Tensor:
        """Per-task affinities of the features (self.tasks order, each [B,C,H,W]) -> [B,T,HW,HW].

        A[b, t, i, j]: weight of source position j for position i (row-major positions); every row sums to one.
        """
        e = torch.stack(
            [F.normalize(self.embed[t](f).flatten(2), dim=1) for t, f in zip(self.tasks, features)], dim=1
        )  # [B,T,C,HW]
        cosine = torch.matmul(e.transpose(2, 3), e)  # [B,T,HW,HW]; matmul's backward does not need it
        return torch.softmax(cosine.mul_(1.0 / self.temperature), dim=-1)

    def propagate(self, index: int, affinity: Tensor, f: Tensor) -> Tensor:
        """f^K of target task self.tasks[index]: K diffusion steps of f [B,C,H,W] with its combined affinity."""
        b, c, h, w = f.shape
        n = h * w
        weights = self.mixing_weights()[index]  # [T]
        # [T] @ [B,T,HW*HW] -> [B,HW*HW]: one combined matrix, no T-fold temporary.
        combined = torch.matmul(weights.to(affinity.dtype), affinity.flatten(2)).view(b, n, n)
        x = f.flatten(2).transpose(1, 2)  # [B,HW,C]
        for _ in range(self.iterations):
            x = torch.bmm(combined, x)
        return x.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> {task: gamma * diffused + (1 - gamma) * input}."""
        f = [features[t] for t in self.tasks]
        affinity = self.affinities(*f)
        return {
            t: self.gamma * self.propagate(k, affinity, f[k]) + (1.0 - self.gamma) * f[k]
            for k, t in enumerate(self.tasks)
        }


class CTAL(ExchangeBlock):
    """Cross-task affinity learning (Sinodinos & Armanfard; the seed holds only the appendix; structure from
    the released Armanfard-Lab/EMA-Net code, seeds digest section 2.4), per task t with features f_t [B,C,H,W]:

      F̂_t = L2-normalise over channels of Conv1x1_t(f_t)   (C -> max(1, C // 2); released: 256 -> 128)
      A_t = F̂_tᵀ F̂_t                                       (HW x HW cosine affinity)
      M   = Conv_kxk([A_1 .. A_T]) / HW                      (one shared cross-task affinity; k = model.ctal_kernel)
      out_t = gamma * (Conv3x3_t(f_t) propagated by M) + (1 - gamma) * f_t,
      propagated_i = sum_j M[i, j] value_j                   (released: attended = value · Mᵀ)

    The fusion: for every position i, the T affinity maps A_t[i, :] (each an H x W map over positions j) are
    interleaved as T channels and filtered by a k x k convolution (padding k // 2, with bias) to the map M[i, :].
    DESIGN CHANGE: the released code does this with a grouped conv of groups = HW (T*HW -> HW channels), i.e. a
    separate filter per position i, so its weights fix the input resolution. Here ONE k x k conv with T input
    channels -> 1 output channel is shared by all HW positions (as if applied to the maps viewed as
    [B*HW, T, H, W]): T k^2 + 1 parameters, and the block runs at any resolution and channel count (CTAL-MS puts
    it at every scale of MTI-Net).
    Normalisation of M: the released code applies none (attended = value · Mᵀ sums HW terms, so its scale grows
    with the resolution). Here M is divided by HW, a signed weighted mean over the source positions: the same
    function as the released one up to a constant factor at a fixed resolution, and the attended features stay
    on the scale of the input whatever the resolution, so that gamma = 0.05 means the same at every scale.
    Where the released code reduces the features themselves (256 -> 128) before the block and blends the reduced
    ones, the block here keeps C channels: the 1x1 reduction feeds only the affinity, the value is C -> C.
    gamma = 0 gives the input back exactly.

    Computation (exact, no HW x HW matrix): the fusion conv is linear and each A_t is a Gram matrix, so
      M[i, j] = b + sum_t sum_d w[t, d] <F̂_t[i], F̂_t[j + d]> = b + <E[i], G[j]>,
    with E = the F̂_t concatenated over channels ([T C', HW]) and G = each F̂_t filtered channel by channel with
    its k x k kernel w[t] (zero padding, as the conv's zero padding of A_t[i, :]). With M divided by HW (linear)
    the propagation is associative: propagated = ((V / HW) Gᵀ) E + b * mean_j V[:, j], where (V / HW) Gᵀ is
    C x T C'. Time and memory are linear in HW: the block never forms the T affinities nor M (at stride 4 of a
    288x384 input one HW x HW matrix is 191 MB in float32). `fused_affinity` forms M for inspection and tests.
    Parameters: T (C (C // 2) + C // 2 + 9 C^2 + C) + T k^2 + 1 (0.171 M for four tasks at 67 channels, k = 3).
    """

    def __init__(self, tasks: Sequence[str], channels: int, gamma: float = 0.05, kernel: int = 3):
        super().__init__(tasks, channels)
        self._check_pairs()
        _check_gamma(gamma)
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"model.ctal_kernel must be an odd integer >= 1 (CTAL's f = 3), got {kernel}")
        self.gamma = gamma
        self.kernel = kernel
        self.reduced = max(1, channels // 2)
        self.reduce = nn.ModuleDict({t: nn.Conv2d(channels, self.reduced, 1) for t in self.tasks})
        self.fusion = nn.Conv2d(len(self.tasks), 1, kernel, padding=kernel // 2)
        self.value = nn.ModuleDict({t: nn.Conv2d(channels, channels, 3, padding=1) for t in self.tasks})

    @classmethod
    def from_config(cls, tasks: Sequence[str], channels: int, cfg: ModelConfig, scale: int) -> CTAL:
        return cls(tasks, channels, gamma=cfg.affinity_gamma, kernel=cfg.ctal_kernel)

    def factors(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        """(E, G), each [B, T C', HW], of the features (self.tasks order, each [B,C,H,W]): M = b + EᵀG."""
        e = torch.cat(
            [F.normalize(self.reduce[t](f), dim=1) for t, f in zip(self.tasks, features)], dim=1
        )  # [B, T C', H, W]
        # channel (t, c) filtered with w[t]: a depthwise conv whose kernels repeat each task's C' times
        kernels = self.fusion.weight.transpose(0, 1).repeat_interleave(self.reduced, dim=0)  # [T C', 1, k, k]
        g = F.conv2d(e, kernels.to(e.dtype), padding=self.kernel // 2, groups=e.shape[1])
        return e.flatten(2), g.flatten(2)

    def fused_affinity(self, *features: Tensor) -> Tensor:
        """The shared cross-task affinity M (before the 1/HW normalisation) of the features (self.tasks order,
        each [B,C,H,W]) -> [B,HW,HW]; M[b, i, :] is the k x k conv of the T maps A_t[b, i, :] seen as H x W.
        Forms the HW x HW matrix: for inspection and tests (forward does not need it)."""
        e, g = self.factors(*features)
        return torch.bmm(e.transpose(1, 2), g) + self.fusion.bias.to(e.dtype)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> {task: gamma * attended + (1 - gamma) * input}."""
        f = [features[t] for t in self.tasks]
        b, c, h, w = f[0].shape
        e, g = self.factors(*f)  # [B, T C', HW] each
        bias = self.fusion.bias.to(e.dtype)
        out = {}
        for t, x in zip(self.tasks, f):
            value = self.value[t](x).flatten(2) / (h * w)  # [B,C,HW]; 1/HW: a mean over source positions
            # sum_j M[i, j] value_j = (value Gᵀ) E[:, i] + b sum_j value_j
            attended = torch.bmm(torch.bmm(value, g.transpose(1, 2)), e) + bias * value.sum(-1, keepdim=True)
            out[t] = self.gamma * attended.view(b, c, h, w) + (1.0 - self.gamma) * x
        return out
