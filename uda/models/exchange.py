"""Cross-task exchange blocks: {task: feature [B,C,H,W]} -> {task: feature [B,C,H,W]}.

- `XTAM`: directional cross-task attention module (target task i, source task j) of DenseMTL, usable on its
  own features: `XTAM(C)(f_i, f_j) -> f_{j->i}`. The paper's bidirectional xTAM for a pair (i, j) is two
  instances: one computing f_{j->i}, one computing f_{i->j}.
- `MTEB`: multi-task exchange block (one XTAM per ordered task pair, fused into each task's features).
- `PADNetDistillation`: PAD-Net's multi-modal distillation.
- `CrossStitchExchange`: cross-stitch units (Misra et al.) mixing the task features.
- `IdentityExchange`: no exchange (plain multi-task learning).

A new block is one `ExchangeBlock` subclass registered in `EXCHANGE_BLOCKS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from uda.config import ModelConfig

ATTENTIONS = ("spatial", "channel", "both")
FUSIONS = ("add", "prod", "concat")


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv (no bias: BN follows) + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SpatialGate(nn.Module):
    """PAD-Net style self-attention F_f(x) * sigmoid(F_m(x)); F_f, F_m are 3x3 convs without bias."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.feature = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.mask = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [B,Cin,H,W] -> [B,Cout,H,W]."""
        return self.feature(x) * torch.sigmoid(self.mask(x))


def downscale_at(downscale: int, scale: int) -> int:
    """Token downscale of an xTAM at decoder scale `scale`, given the factor `downscale` at scale 1.

    The attention tokens keep the same absolute resolution (1/(2*downscale) of the input) at every scale,
    as the reference's per-stage table does ({4: 1, 3: 1, 2: 2, 1: 4, 0: 8} for downscale 4).
    """
    return max(1, (2 * downscale) >> scale)


class XTAM(nn.Module):
    """Directional cross-task attention xTAM_{j->i}: features of source task j refined for target task i.

    forward(f_i, f_j) with f_i, f_j [B,C,H,W] (any H, W) -> f_{j->i} [B,C,H,W]:
      g     = ReLU(Conv3x3(f_j))                                    (extractor)
      xtask = up(attention(P_q(down(f_i)), P_k(pool(g)), P_v(pool(g))))   (correlation-guided attention)
      self  = F_f(g) * sigmoid(F_m(g))                              (self-attention, C/2 channels)
      f_{j->i} = P([alpha * xtask, self])                           (P: 1x1 conv + BN + ReLU to C)
    down = nearest, pool = max pooling, both to ceil(H/s) x ceil(W/s) tokens; up = nearest to H x W; P_* are
    1x1 conv + BN + ReLU (d = C). alpha [1,C,1,1] starts at zero, so at initialisation the block is pure
    self-attention and the correlation branch only receives gradient through alpha.
    Not in the paper's text, as the authors' released code: the extractor g (both branches read g, not f_j), P
    (concatenation back to C channels), BN + ReLU in P_*, and the source pooled by s like the target (Sec. 3.1
    writes a downscale by s^2 for the source; the released code pools by s).

    attention:
      "spatial": softmax over source positions of Q K^T / sqrt(C) (tokens = positions; the paper's Eq. 1-2).
      "channel": cross-task channel attention (DANet/MTI-Net practice): tokens = channels, each a vector of
                 the N pooled positions; A = softmax over source channels of Q^T K / sqrt(N), A [C,C];
                 out_c = sum_c' A[c,c'] V_c'. Same projections, no extra parameters.
      "both":    the sum of the spatial and the channel outputs (shared projections), then alpha.
    self_attention=False drops the self branch (App. A.2): f_{j->i} = P(alpha * xtask), with alpha starting at
    one. At zero that block could never learn: its only input would be exactly 0, so P's BatchNorm gives 0, the
    ReLU's gradient at 0 is 0, and no parameter of the xTAM (alpha included) nor of mTEB's fusion would ever get
    a gradient (mTEB would stay the identity). The paper's reason for zero (start from self-attention alone)
    has no self-attention to start from here.
    """

    def __init__(
        self, channels: int, downscale: int = 4, attention: str = "spatial", self_attention: bool = True
    ):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown xTAM attention {attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if downscale < 1:
            raise ValueError(f"xTAM downscale must be >= 1, got {downscale}")
        self.downscale = downscale
        self.attention = attention
        self.extract = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
        self.query = conv_bn_relu(channels, channels)
        self.key = conv_bn_relu(channels, channels)
        self.value = conv_bn_relu(channels, channels)
        self.alpha = nn.Parameter(torch.full((1, channels, 1, 1), 0.0 if self_attention else 1.0))
        self.self_attention = SpatialGate(channels, channels // 2) if self_attention else None
        self.proj = conv_bn_relu(channels + (channels // 2 if self_attention else 0), channels)

    def correlation(self, f_i: Tensor, g: Tensor) -> Tensor:
        """Correlation-guided attention (before alpha): target f_i, extracted source g -> [B,C,H,W]."""
        return F.interpolate(self.correlation_tokens(f_i, g), size=f_i.shape[-2:], mode="nearest")

    def correlation_tokens(self, f_i: Tensor, g: Tensor) -> Tensor:
        """The correlation-guided attention at token resolution [B,C,ceil(H/s),ceil(W/s)], before upsampling."""
        b, c, h, w = f_i.shape
        tokens = (math.ceil(h / self.downscale), math.ceil(w / self.downscale))
        q = self.query(F.interpolate(f_i, size=tokens, mode="nearest")).flatten(2)  # [B,C,N]
        source = F.adaptive_max_pool2d(g, tokens)
        k, v = self.key(source).flatten(2), self.value(source).flatten(2)
        out = torch.zeros_like(q)
        if self.attention in ("spatial", "both"):
            # tokens are positions: [B,1,N,C]; the default scale 1/sqrt(C) is the paper's 1/sqrt(d).
            # Contiguous [B,1,N,C] lets torch pick a fused kernel (flash / memory-efficient) that never holds the
            # N x N matrix, forward and backward; transposed views fall back to the explicit math kernel.
            qt, kt, vt = (t.transpose(1, 2).contiguous().unsqueeze(1) for t in (q, k, v))
            out = out + F.scaled_dot_product_attention(qt, kt, vt).squeeze(1).transpose(1, 2)
        if self.attention in ("channel", "both"):
            # tokens are channels: [B,1,C,N]; scale 1/sqrt(N).
            out = out + F.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            ).squeeze(1)
        return out.view(b, c, *tokens)

    def forward(self, f_i: Tensor, f_j: Tensor) -> Tensor:
        """f_i: target task features, f_j: source task features, both [B,C,H,W] -> f_{j->i} [B,C,H,W]."""
        if f_i.shape != f_j.shape:
            raise ValueError(
                f"xTAM needs features of equal shape, got {tuple(f_i.shape)} and {tuple(f_j.shape)}"
            )
        g = self.extract(f_j)
        # P(cat[alpha * up(x), s]) = ReLU(BN(up(W_x (alpha * x)) + W_s s)): P's 1x1 convolution is linear and
        # per pixel, so it commutes with the nearest upsampling of the correlation branch x. Its share W_x runs
        # at token resolution (1/downscale^2 of the pixels), and neither the upsampled branch nor the
        # concatenation is ever held at full resolution (less memory and time; same values, tested).
        conv, bn, relu = self.proj
        c = self.alpha.shape[1]
        x = F.conv2d(self.alpha * self.correlation_tokens(f_i, g), conv.weight[:, :c])
        pre = F.interpolate(x, size=f_i.shape[-2:], mode="nearest")
        if self.self_attention is not None:
            pre = pre + F.conv2d(self.self_attention(g), conv.weight[:, c:])
        return relu(bn(pre))


class ExchangeBlock(nn.Module):
    """Base of exchange blocks: built as Block(tasks, channels, **options); forward({task: [B,C,H,W]})."""

    def __init__(self, tasks: Sequence[str], channels: int):
        super().__init__()
        self.tasks = tuple(tasks)
        self.channels = channels

    @classmethod
    def from_config(cls, tasks: Sequence[str], channels: int, cfg: ModelConfig, scale: int) -> ExchangeBlock:
        """The block for decoder scale `scale` with the options of `cfg` (option-free blocks ignore it)."""
        return cls(tasks, channels)

    def _check_pairs(self) -> None:
        if len(self.tasks) < 2:
            raise ValueError(
                f"{type(self).__name__} exchanges between tasks and needs >= 2, got {self.tasks}"
            )


def _pair(source: str, target: str) -> str:
    return f"{source}_to_{target}"


class IdentityExchange(ExchangeBlock):
    """No exchange: plain multi-task learning."""

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> the same tensors."""
        return dict(features)


_FUSE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"add": torch.add, "prod": torch.mul}


class MTEB(ExchangeBlock):
    """Multi-task exchange block: f~_i = f_i (+) F_i([f_{j->i} for j != i]), one XTAM per ordered pair.

    F_i: 1x1 conv + BN + ReLU from (n-1)C to C. fusion "add" (paper): f_i + F_i(...); "prod": f_i * F_i(...);
    "concat": F_i([f_i, f_{j->i}...]) from nC to C, no residual. Other options go to every XTAM.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        channels: int,
        downscale: int = 4,
        fusion: str = "add",
        attention: str = "spatial",
        self_attention: bool = True,
    ):
        super().__init__(tasks, channels)
        self._check_pairs()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown mTEB fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")
        self.fusion = fusion
        n = len(self.tasks)
        self.xtam = nn.ModuleDict(
            {
                _pair(j, i): XTAM(channels, downscale, attention, self_attention)
                for i in self.tasks
                for j in self.tasks
                if i != j
            }
        )
        inputs = n * channels if fusion == "concat" else (n - 1) * channels
        self.post = nn.ModuleDict({i: conv_bn_relu(inputs, channels) for i in self.tasks})

    @classmethod
    def from_config(cls, tasks: Sequence[str], channels: int, cfg: ModelConfig, scale: int) -> MTEB:
        return cls(
            tasks,
            channels,
            downscale=downscale_at(cfg.downscale, scale),
            fusion=cfg.fusion,
            attention=cfg.attention,
            self_attention=cfg.self_attention,
        )

    CHECKPOINT_METHODS = ("refine",)  # model.checkpointing: keep one output per task, rerun the rest

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> refined {task: [B,C,H,W]}."""
        return {i: self.refine(i, *(features[t] for t in self.tasks)) for i in self.tasks}

    def refine(self, i: str, *features: Tensor) -> Tensor:
        """f~_i from the features of every task (in self.tasks order)."""
        f = dict(zip(self.tasks, features))
        directional = [self.xtam[_pair(j, i)](f[i], f[j]) for j in self.tasks if j != i]
        if self.fusion == "concat":
            return self.post[i](torch.cat([f[i], *directional], dim=1))
        fused = directional[0] if len(directional) == 1 else torch.cat(directional, dim=1)
        return _FUSE[self.fusion](f[i], self.post[i](fused))


class PADNetDistillation(ExchangeBlock):
    """PAD-Net multi-modal distillation: out_t = f_t + sum_{a != t} F_f(f_a) * sigmoid(F_m(f_a)) (C -> C).

    `targets` (default: every task) are the tasks distilled into; the others only send messages and come out
    unchanged (MTI-Net's auxiliary tasks, which have no final prediction)."""

    def __init__(self, tasks: Sequence[str], channels: int, targets: Sequence[str] | None = None):
        super().__init__(tasks, channels)
        self._check_pairs()
        self.targets = self.tasks if targets is None else tuple(t for t in self.tasks if t in targets)
        self.gates = nn.ModuleDict(
            {_pair(a, t): SpatialGate(channels, channels) for t in self.targets for a in self.tasks if a != t}
        )

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> distilled {task: [B,C,H,W]}."""
        out = dict(features)
        for t in self.targets:
            messages = [self.gates[_pair(a, t)](features[a]) for a in self.tasks if a != t]
            out[t] = features[t] + torch.stack(messages).sum(0)
        return {t: out[t] for t in self.tasks}


class CrossStitchUnit(nn.Module):
    """Cross-stitch unit (Misra et al., CVPR 2016): per channel c, x~_t = sum_s alpha[t, s, c] * x_s.

    alpha starts at `self_weight` on the diagonal and (1 - self_weight) / (T - 1) elsewhere (the paper's best
    initialisation is 0.9 / 0.1 for two tasks; 1.0 gives exactly the separate networks). Per-channel weights
    follow the paper's channel-wise variant; it leaves open whether alpha is constrained (here: free).
    """

    def __init__(self, tasks: int, channels: int, self_weight: float = 0.9):
        super().__init__()
        other = (1.0 - self_weight) / max(1, tasks - 1)
        alpha = torch.full((tasks, tasks, channels), other)
        alpha[torch.arange(tasks), torch.arange(tasks)] = self_weight
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """T maps [B,C,H,W] -> T mixed maps [B,C,H,W]."""
        return [sum(a[:, None, None] * x for a, x in zip(self.alpha[t], xs)) for t in range(len(xs))]


class CrossStitchExchange(ExchangeBlock):
    """Cross-stitch units as an exchange block: one unit mixing the task features (per channel), as ATRC's
    controlled comparison places them on a shared backbone (the same parameters as plain multi-task learning).
    The self weight is model.cross_stitch_init."""

    def __init__(self, tasks: Sequence[str], channels: int, self_weight: float = 0.9):
        super().__init__(tasks, channels)
        self._check_pairs()
        self.unit = CrossStitchUnit(len(self.tasks), channels, self_weight)

    @classmethod
    def from_config(
        cls, tasks: Sequence[str], channels: int, cfg: ModelConfig, scale: int
    ) -> CrossStitchExchange:
        return cls(tasks, channels, cfg.cross_stitch_init)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: [B,C,H,W]} -> mixed {task: [B,C,H,W]}."""
        return dict(zip(self.tasks, self.unit([features[t] for t in self.tasks])))


from uda.models.affinity import CTAL, PAPPropagation  # noqa: E402 - they subclass ExchangeBlock above

EXCHANGE_BLOCKS: dict[str, type[ExchangeBlock]] = {
    "none": IdentityExchange,
    "mteb": MTEB,
    "padnet": PADNetDistillation,
    "cross-stitch": CrossStitchExchange,
    "pap": PAPPropagation,
    "ctal": CTAL,
}


def build_exchange(kind: str, tasks: Sequence[str], channels: int, **options: object) -> ExchangeBlock:
    """The registered exchange block `kind` for `tasks` with `channels` channels."""
    if kind not in EXCHANGE_BLOCKS:
        raise ValueError(f"unknown exchange block {kind!r}; choose one of {', '.join(EXCHANGE_BLOCKS)}")
    return EXCHANGE_BLOCKS[kind](tasks, channels, **options)
