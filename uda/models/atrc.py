"""ATRC: adaptive task-relational context (Bruggemann, Kanakis, Obukhov, Georgoulis, Van Gool; ICCV 2021).

The ATRC module refines the task features F_T of every target task T with one context pooling (CP) block per
source task S (S = T included: self-attention on the diagonal). A CP block attends from the target's queries
q = f_q(F_T) to keys and values of the source, k = f_k(F_S), v = f_v(F_S), over one of five contexts:

- "global": linearised attention (Katharopoulos et al.) with phi(x) = x, Eq. 3,
  v'_i = sum_j (q_i . k_j) v_j / sum_j (q_i . k_j), computed in O(L) as (q (k^T v)) / (q (k^T 1));
  the last layers of f_q and f_k end in softplus instead of ReLU (positive kernel, numerically stable);
- "local": softmax(q k^T / sqrt(d)) v restricted to the 9x9 neighbourhood of each target pixel, Eq. 4;
  neighbours outside the image are excluded from the softmax (ATRC's code uses CUDA kernels; here a loop over
  the 81 offsets, whose memory is linear in the pixels: [B,81,H,W] logits, no [B,d,81,H,W] unfold);
- "tlabel" / "slabel": label context, Eq. 5: prototypes p = A_hat^T F_S (R tokens of C channels), A_hat the
  spatial softmax (over the L pixels) of the auxiliary prediction A of T ("tlabel") or of S ("slabel") with R
  regions; k and v are computed from the prototypes; softmax(q k^T / sqrt(d)) v;
- "none": no connection (a CP block of the fixed architecture is left out; `CPBlock` returns zeros for it, so
  a later supernet can mix it with the others).

Facts from the authors' code (brdav/atrc, `relationalcontext.py`, `attention.py`), followed here:
- task feature width C = (concatenated backbone channels) / 4 (67 on HRNetV2-W18-small), attention width
  d = C / 2 (33); a CP block outputs d channels (no per-block output projection);
- f_q, f_k: 1x1 conv-BN-ReLU, then 1x1 conv-BN-ReLU (global: 1x1 conv-BN, then softplus); f_v: one 1x1
  conv-BN-ReLU; the label contexts apply f_k, f_v to the prototypes (BN over the batch's R tokens);
- per target: concat the CP outputs of its non-"none" sources (N*d channels), a 1x1 conv-BN fusion (no
  activation) back to C whose BN weight and bias start at ZERO (the fused term is exactly 0 at initialisation),
  concat with F_T (2C), 1x1 conv-BN-ReLU to C, Dropout2d(0.05); a target with no source skips the fusion and
  takes the 1x1 conv-BN-ReLU C -> C;
- auxiliary heads (only for the tasks a label context needs: targets of a "tlabel" block, sources of an
  "slabel" block): 1x1 conv-BN-ReLU (in -> in channels) then 1x1 conv -> R_task, on the DETACHED backbone input
  (no gradient from the aux heads into the backbone; the CP blocks do send gradient into the aux heads);
- label spaces R_task: semseg its classes, depth 40 log-scale bins, normals 40 clusters, edges 2.
Choices where the code differs or is silent:
- the spatial softmax of A runs at the feature resolution (stride 4); the code upsamples A to the input size
  for its loss only, and here the aux loss resizes the labels (nearest) to A's resolution instead;
- the global context is computed in float32, with autocast off (sums over every pixel, which overflow float16;
  clamped denominator 1e-12 as the code).

Context-type search (ATRC §3.3; model.atrc_contexts=search, recipes/atrc_search.py): every CP block holds the
five candidates and architecture logits alpha [targets, sources, 5] (p_alpha = softmax(alpha), zeros = uniform at
initialisation). In training the block returns the convex combination of its candidates' outputs ("none" = zeros)
with Gumbel-softmax weights, Eq. 7, softmax((alpha + G) / lambda), G ~ Gumbel(0, 1), lambda =
model.atrc_search_temperature (default 1.0; the seed gives no value); in evaluation the noise-free
softmax(alpha / lambda). alpha sits in the model's "architecture" parameter group: single-level optimisation,
updated in the same backward pass as the weights at optim.lr_architecture (default optim.lr_decoder; the same
schedule). A block whose choice is fixed
(`frozen`, a persistent buffer [targets, sources], -1 = still searching, else the index in CONTEXTS; saved with
the model in every checkpoint) uses only that context. Every task has an auxiliary head (label contexts are
candidates of every block). The entropy regulariser and the freezing are the `context_search` objective's
(uda.objectives.context_search); the fusion of a target takes every source (d channels each, zeros for "none"),
so the searched architecture is retrained from scratch from its JSON (`chosen_contexts`, `write_contexts`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.hardware import autocast_off
from uda.models.multiscale import MultiScaleModel, upsample_concat

CONTEXTS = ("global", "local", "tlabel", "slabel", "none")
SEARCH = "search"  # model.atrc_contexts=search: the supernet of the context-type search
LOCAL_WINDOW = 9  # the local context's neighbourhood (9x9)
DROPOUT = 0.05  # Dropout2d after the bottleneck (authors' code)
EDGE_REGIONS = 2  # edges' auxiliary label space: edge / no edge
DEPTH_BINS = 40  # the authors' depth and normals label spaces
NORMAL_CLUSTERS = 40
IGNORE = 255


def conv_bn(in_channels: int, out_channels: int, act: nn.Module | None) -> nn.Sequential:
    """1x1 conv (no bias: BN follows) + BN (+ the activation)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    return nn.Sequential(*layers, *([act] if act is not None else []))


def _projection(in_channels: int, channels: int, softplus: bool = False) -> nn.Sequential:
    """f_q / f_k: conv-BN-ReLU, conv-BN-ReLU (softplus=True: conv-BN then softplus)."""
    last = nn.Softplus() if softplus else nn.ReLU(inplace=True)
    return nn.Sequential(
        conv_bn(in_channels, channels, nn.ReLU(inplace=True)), conv_bn(channels, channels, last)
    )


class _Context(nn.Module):
    """q/k/v projections shared by every context kind (f_v: one conv-BN-ReLU)."""

    def __init__(self, in_channels: int, channels: int, softplus: bool = False):
        super().__init__()
        self.query = _projection(in_channels, channels, softplus)
        self.key = _projection(in_channels, channels, softplus)
        self.value = conv_bn(in_channels, channels, nn.ReLU(inplace=True))


class GlobalContext(_Context):
    """Linearised attention over every pixel of the source, phi(x) = x on softplus projections."""

    EPS = 1e-12

    def __init__(self, in_channels: int, channels: int):
        super().__init__(in_channels, channels, softplus=True)

    def forward(self, target: Tensor, source: Tensor, target_aux=None, source_aux=None) -> Tensor:
        """target, source [B,C,H,W] -> [B,d,H,W]."""
        q = self.query(target).flatten(2).float()  # [B,d,L]
        k = self.key(source).flatten(2).float()
        v = self.value(source).flatten(2).float()  # [B,m,L]
        # Autocast would run these products in half precision even on float32 inputs: the sums over every
        # pixel overflow float16 (65504) at real resolutions (128 x 256 pixels at stride 4 of 512 x 1024).
        with autocast_off(q.device):
            kv = v @ k.transpose(1, 2)  # [B,m,d] = sum_j v_j k_j^T
            numerator = kv @ q  # [B,m,L]
            denominator = k.sum(2, keepdim=True).transpose(1, 2) @ q  # [B,1,L] = q_i . sum_j k_j
            out = numerator / denominator.clamp_min(self.EPS)
        return out.view(target.shape[0], -1, *target.shape[-2:]).to(target.dtype)


def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int = LOCAL_WINDOW) -> Tensor:
    """softmax(q_i . k_j / sqrt(d)) over the window x window neighbours j of each pixel i (inside the image),
    weights on v. q, k [B,d,H,W], v [B,m,H,W] -> [B,m,H,W]; memory O(window^2 * B * H * W)."""
    b, d, h, w = q.shape
    r = window // 2
    kp = F.pad(k, (r, r, r, r))
    vp = F.pad(v, (r, r, r, r))
    inside = F.pad(torch.ones(1, 1, h, w, dtype=torch.bool, device=q.device), (r, r, r, r))
    offsets = [(dy, dx) for dy in range(window) for dx in range(window)]
    logits = torch.stack(
        [(q * kp[:, :, dy : dy + h, dx : dx + w]).sum(1) for dy, dx in offsets], dim=1
    ) / math.sqrt(d)  # [B,K,H,W]
    valid = torch.stack([inside[0, 0, dy : dy + h, dx : dx + w] for dy, dx in offsets])  # [K,H,W]
    weights = torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=1).to(v.dtype)
    out = torch.zeros_like(v)
    for n, (dy, dx) in enumerate(offsets):
        out = out + weights[:, n : n + 1] * vp[:, :, dy : dy + h, dx : dx + w]
    return out


class LocalContext(_Context):
    """Softmax attention inside the 9x9 neighbourhood of each target pixel."""

    def __init__(self, in_channels: int, channels: int, window: int = LOCAL_WINDOW):
        super().__init__(in_channels, channels)
        self.window = window

    def forward(self, target: Tensor, source: Tensor, target_aux=None, source_aux=None) -> Tensor:
        """target, source [B,C,H,W] -> [B,d,H,W]."""
        return local_attention(self.query(target), self.key(source), self.value(source), self.window)


def spatial_softmax(aux: Tensor) -> Tensor:
    """Auxiliary logits [B,R,h,w] -> A_hat [B,R,L]: a softmax over the L pixels for every region."""
    return torch.softmax(aux.flatten(2).float(), dim=2)


def prototypes(prob: Tensor, features: Tensor) -> Tensor:
    """p = A_hat^T F: A_hat [B,R,L] (spatial softmax), features [B,C,H,W] -> prototypes [B,C,R]."""
    return features.flatten(2).float() @ prob.transpose(1, 2)


class LabelContext(_Context):
    """Attention over R label-region prototypes of the source; regions from T's ("tlabel") or S's ("slabel")
    auxiliary prediction."""

    def __init__(self, in_channels: int, channels: int, kind: str):
        super().__init__(in_channels, channels)
        if kind not in ("tlabel", "slabel"):
            raise ValueError(f"label context kind must be tlabel or slabel, got {kind!r}")
        self.kind = kind

    def forward(self, target: Tensor, source: Tensor, target_aux: Tensor, source_aux: Tensor) -> Tensor:
        """target, source [B,C,H,W]; *_aux: A_hat [B,R,L] of T and S -> [B,d,H,W]."""
        prob = target_aux if self.kind == "tlabel" else source_aux
        tokens = prototypes(prob, source).to(source.dtype).unsqueeze(-1)  # [B,C,R,1]
        k = self.key(tokens).flatten(2)  # [B,d,R]
        v = self.value(tokens).flatten(2)  # [B,m,R]
        q = self.query(target).flatten(2)  # [B,d,L]
        attn = torch.softmax((q.transpose(1, 2) @ k).float() / math.sqrt(k.shape[1]), dim=-1)  # [B,L,R]
        out = v @ attn.to(v.dtype).transpose(1, 2)  # [B,m,L]
        return out.view(target.shape[0], -1, *target.shape[-2:])


def build_context(kind: str, in_channels: int, channels: int) -> nn.Module | None:
    """The module of one context kind (None for "none")."""
    if kind == "global":
        return GlobalContext(in_channels, channels)
    if kind == "local":
        return LocalContext(in_channels, channels)
    if kind in ("tlabel", "slabel"):
        return LabelContext(in_channels, channels, kind)
    if kind == "none":
        return None
    raise ValueError(f"unknown ATRC context {kind!r}; choose one of {', '.join(CONTEXTS)}")


class CPBlock(nn.Module):
    """Context pooling block of one (target, source) pair, holding the modules of its candidate contexts in
    `contexts` (ModuleDict keyed by context name; "none" has no module). The fixed architecture holds one
    candidate; a supernet would hold all five and mix `forward(..., context=c)` over c."""

    def __init__(self, in_channels: int, channels: int, candidates: Sequence[str]):
        super().__init__()
        self.channels = channels
        self.candidates = tuple(candidates)
        self.contexts = nn.ModuleDict()
        for kind in self.candidates:
            module = build_context(kind, in_channels, channels)
            if module is not None:
                self.contexts[kind] = module

    def forward(
        self,
        target: Tensor,
        source: Tensor,
        target_aux: Tensor | None = None,
        source_aux: Tensor | None = None,
        context: str | None = None,
    ) -> Tensor:
        """The CP output [B,d,H,W] of `context` (default: the only candidate); zeros for "none"."""
        context = context or self.candidates[0]
        if context == "none":
            return target.new_zeros(target.shape[0], self.channels, *target.shape[-2:])
        return self.contexts[context](target, source, target_aux, source_aux)


def label_tasks(tasks: Sequence[str], contexts: Mapping[str, Mapping[str, str]]) -> tuple[str, ...]:
    """The tasks whose auxiliary prediction a label context needs (targets of tlabel, sources of slabel)."""
    need = {t for t in tasks for s in tasks if contexts[t][s] == "tlabel"}
    need |= {s for t in tasks for s in tasks if contexts[t][s] == "slabel"}
    return tuple(t for t in tasks if t in need)


def gumbel_softmax_weights(logits: Tensor, temperature: float, noise: bool = True) -> Tensor:
    """ATRC Eq. 7: softmax((logits + G) / temperature) over the last dimension, G ~ Gumbel(0, 1) (noise=False:
    G = 0). Computed in float32; the weights of each row sum to one and tend to one-hot as temperature -> 0."""
    if temperature <= 0:
        raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {temperature}")
    x = logits.float()
    if noise:
        u = torch.rand_like(x).clamp_min(torch.finfo(x.dtype).tiny)
        x = x - torch.log(-torch.log(u))
    return torch.softmax(x / temperature, dim=-1)


def context_entropy(logits: Tensor) -> Tensor:
    """H(p_alpha) in nats over the last dimension, p_alpha = softmax(logits) (float32)."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


class ATRCModule(nn.Module):
    """CP blocks for every (target, source) pair, fused per target (see the module docstring).

    forward({task: F [B,C,H,W]}, {task: A_hat [B,R,L]}) -> {task: refined [B,C,H,W]}.
    contexts=None: the search supernet (every block holds the five candidates, mixed by architecture weights).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        contexts: Mapping[str, Mapping[str, str]] | None,
        channels: int,
        temperature: float = 1.0,
    ):
        super().__init__()
        self.tasks = tuple(tasks)
        if contexts is None:
            self._build_search(channels, temperature)
            return
        self.search = False
        self.contexts = {t: {s: contexts[t][s] for s in self.tasks} for t in self.tasks}
        inter = channels // 2
        self.cp = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        self.bottleneck = nn.ModuleDict()
        for t in self.tasks:
            sources = [s for s in self.tasks if self.contexts[t][s] != "none"]
            self.cp[t] = nn.ModuleDict({s: CPBlock(channels, inter, (self.contexts[t][s],)) for s in sources})
            if sources:
                fuse = conv_bn(inter * len(sources), channels, None)
                nn.init.zeros_(fuse[1].weight)  # zero-initialised: the fused term is 0 at initialisation
                nn.init.zeros_(fuse[1].bias)
                self.fuse[t] = fuse
            width = 2 * channels if sources else channels
            self.bottleneck[t] = nn.Sequential(
                conv_bn(width, channels, nn.ReLU(inplace=True)), nn.Dropout2d(DROPOUT)
            )

    def _build_search(self, channels: int, temperature: float) -> None:
        """The supernet: five candidates per block, alpha logits, the frozen-choice buffer."""
        if temperature <= 0:
            raise ValueError(f"model.atrc_search_temperature={temperature}: must be > 0")
        self.search = True
        self.temperature = float(temperature)
        self.contexts = None
        inter = channels // 2
        n = len(self.tasks)
        self.cp = nn.ModuleDict()
        self.fuse = nn.ModuleDict()
        self.bottleneck = nn.ModuleDict()
        for t in self.tasks:
            self.cp[t] = nn.ModuleDict({s: CPBlock(channels, inter, CONTEXTS) for s in self.tasks})
            fuse = conv_bn(inter * n, channels, None)
            nn.init.zeros_(fuse[1].weight)
            nn.init.zeros_(fuse[1].bias)
            self.fuse[t] = fuse
            self.bottleneck[t] = nn.Sequential(
                conv_bn(2 * channels, channels, nn.ReLU(inplace=True)), nn.Dropout2d(DROPOUT)
            )
        self.alpha = nn.Parameter(torch.zeros(n, n, len(CONTEXTS)))  # [target, source, context]
        self.register_buffer("frozen", torch.full((n, n), -1, dtype=torch.long))  # persistent

    # ------------------------------------------------------------------ search state

    def architecture_parameters(self) -> list[nn.Parameter]:
        """The search's architecture weights (alpha; trained at optim.lr_architecture), none when fixed."""
        return [self.alpha] if self.search else []

    def block_entropy(self) -> Tensor:
        """H(p_alpha) [targets, sources] in nats (with gradient to alpha)."""
        return context_entropy(self.alpha)

    @torch.no_grad()
    def freeze(self, threshold: float) -> list[tuple[str, str, str]]:
        """Fix every searching block whose H(p_alpha) < threshold at its argmax; the (target, source, context)
        frozen now."""
        searching = self.frozen < 0
        low = searching & (self.block_entropy() < threshold)
        choice = self.alpha.argmax(-1)
        self.frozen.copy_(torch.where(low, choice, self.frozen))
        idx = low.nonzero().tolist()
        return [(self.tasks[i], self.tasks[j], CONTEXTS[int(choice[i, j])]) for i, j in idx]

    @torch.no_grad()
    def chosen_contexts(self) -> dict[str, dict[str, str]]:
        """{target: {source: context}}: the frozen choice, else the argmax of alpha."""
        choice = torch.where(self.frozen >= 0, self.frozen, self.alpha.argmax(-1)).tolist()
        return {
            t: {s: CONTEXTS[choice[i][j]] for j, s in enumerate(self.tasks)} for i, t in enumerate(self.tasks)
        }

    def _search_term(
        self, features: Mapping[str, Tensor], probs: Mapping[str, Tensor], task: str, weights: Tensor, frozen
    ) -> Tensor:
        """The fused CP term of target `task` in the supernet: per source the frozen context, or the mixture of
        the candidates with `weights` [S,5] of this target; with several processes (DDP) the parameters a frozen
        block leaves unused enter the graph with weight 0 (every parameter gets a gradient)."""
        i = self.tasks.index(task)
        ddp = self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        outs = []
        for j, s in enumerate(self.tasks):
            block = self.cp[task][s]
            args = (features[task], features[s], probs.get(task), probs.get(s))
            chosen = frozen[i][j]
            if chosen >= 0:
                out = block(*args, context=CONTEXTS[chosen])
                if ddp:
                    unused = [
                        p for c, m in block.contexts.items() if c != CONTEXTS[chosen] for p in m.parameters()
                    ]
                    out = out + sum((p.sum() for p in unused), self.alpha[i, j].sum()) * 0.0
            else:
                w = weights[j].to(features[task].dtype)
                parts = [w[k] * block(*args, context=c) for k, c in enumerate(CONTEXTS) if c != "none"]
                out = parts[0]
                for part in parts[1:]:
                    out = out + part
            outs.append(out)
        return self.fuse[task](torch.cat(outs, dim=1))

    def fused(self, features: Mapping[str, Tensor], probs: Mapping[str, Tensor], task: str) -> Tensor | None:
        """The fused CP term of target `task` [B,C,H,W] (None when it has no source)."""
        if self.search:
            weights = gumbel_softmax_weights(self.alpha, self.temperature, noise=self.training)
            return self._search_term(
                features, probs, task, weights[self.tasks.index(task)], self.frozen.tolist()
            )
        if task not in self.fuse:
            return None
        outs = [
            self.cp[task][s](features[task], features[s], probs.get(task), probs.get(s))
            for s in self.cp[task]
        ]
        return self.fuse[task](torch.cat(outs, dim=1))

    def forward(self, features: Mapping[str, Tensor], probs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """{task: F_T} and the spatial softmaxes of the aux predictions -> {task: refined features}."""
        out = {}
        if self.search:  # one Gumbel sample and one read of the frozen choices per forward
            weights = gumbel_softmax_weights(self.alpha, self.temperature, noise=self.training)
            frozen = self.frozen.tolist()
        for i, t in enumerate(self.tasks):
            if self.search:
                term = self._search_term(features, probs, t, weights[i], frozen)
            else:
                term = self.fused(features, probs, t)
            x = features[t] if term is None else torch.cat([features[t], term], dim=1)
            out[t] = self.bottleneck[t](x)
        return out


def aux_head(in_channels: int, regions: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU (in -> in) + 1x1 conv (with bias) -> R logits: an auxiliary prediction A."""
    return nn.Sequential(
        conv_bn(in_channels, in_channels, nn.ReLU(inplace=True)), nn.Conv2d(in_channels, regions, 1)
    )


class ATRCHead(nn.Module):
    """The ATRC module and the auxiliary heads it needs.

    forward({task: F [B,C,H,W]}, backbone input [B,Cin,H,W]) -> ({task: refined [B,C,H,W]}, {task: A logits
    [B,R,H,W]}); the aux heads see the backbone input detached.
    """

    def __init__(self, tasks: Sequence[str], channels: int, in_channels: int, cfg, num_classes: int | None):
        super().__init__()
        self.tasks = tuple(tasks)
        if cfg.atrc_contexts == SEARCH:  # the supernet: label contexts are candidates of every block
            self.module = ATRCModule(self.tasks, None, channels, cfg.atrc_search_temperature)
            need = self.tasks
        else:
            contexts = resolve_contexts(cfg.atrc_contexts, self.tasks)
            self.module = ATRCModule(self.tasks, contexts, channels)
            need = label_tasks(self.tasks, contexts)
        self.aux = nn.ModuleDict({t: aux_head(in_channels, aux_regions(t, cfg, num_classes)) for t in need})
        if "normals" in self.aux:
            # The normals' label regions travel with the weights: training, resume and evaluation use the
            # centroids the model was built with, whatever happens to model.normal_clusters' file later.
            self.register_buffer("normal_centroids", normal_centroids(cfg))

    def forward(
        self, features: Mapping[str, Tensor], fused: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        detached = fused.detach()  # no gradient from the aux heads into the backbone
        aux = {t: head(detached) for t, head in self.aux.items()}
        probs = {t: spatial_softmax(a) for t, a in aux.items()}
        return self.module(features, probs), aux


# --------------------------------------------------------------------------- contexts from the config


def resolve_contexts(spec: str, tasks: Sequence[str]) -> dict[str, dict[str, str]]:
    """model.atrc_contexts -> {target: {source: context}}: one context name for every CP block (the fixed-context
    baselines), or a JSON file {"<target>": {"<source>": "<context>"}} naming every pair of `tasks` (a searched
    architecture). A bad file raises a one-line ValueError naming it."""
    tasks = tuple(tasks)
    if spec in CONTEXTS:
        return {t: {s: spec for s in tasks} for t in tasks}
    path = Path(spec)
    where = f"model.atrc_contexts={spec}"
    if spec == SEARCH:
        raise ValueError(
            f"{where} is the search supernet (ATRCModule(tasks, None, ...)), not a fixed architecture"
        )
    if not path.is_file():
        raise ValueError(f"{where}: neither a context ({', '.join(CONTEXTS)}) nor an existing JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: cannot read it as JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f'{where}: expected {{"<target>": {{"<source>": "<context>"}}}} objects')
    for label, keys in [("targets", set(data)), *((f"sources of {t}", set(data[t])) for t in data)]:
        if keys != set(tasks):
            extra, missing = sorted(keys - set(tasks)), sorted(set(tasks) - keys)
            raise ValueError(
                f"{where}: {label} must be the tasks {list(tasks)} (unknown {extra}, missing {missing})"
            )
    bad = [f"{t}->{s}: {data[t][s]!r}" for t in tasks for s in tasks if data[t][s] not in CONTEXTS]
    if bad:
        raise ValueError(f"{where}: unknown contexts {', '.join(bad)}; choose among {', '.join(CONTEXTS)}")
    return {t: {s: data[t][s] for s in tasks} for t in tasks}


# --------------------------------------------------------------------------- auxiliary label spaces


def fibonacci_sphere(k: int) -> Tensor:
    """k nearly uniform unit directions [k,3] (the Fibonacci lattice; deterministic)."""
    i = torch.arange(k, dtype=torch.float64) + 0.5
    z = 1.0 - 2.0 * i / k
    r = (1.0 - z * z).clamp_min(0).sqrt()
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], dim=1).float()


def normal_centroids(cfg) -> Tensor:
    """The normals' label regions [R,3] (unit rows): model.normal_clusters (a JSON list of 3-vectors, as written
    by uda-normal-clusters), or, without one, model.atrc_normal_clusters Fibonacci-sphere directions."""
    path = cfg.normal_clusters
    if path is None:
        return fibonacci_sphere(cfg.atrc_normal_clusters)
    try:
        data = json.loads(Path(path).read_text())
        centroids = torch.tensor(data["centroids"] if isinstance(data, dict) else data, dtype=torch.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"model.normal_clusters={path}: cannot read centroids ({' '.join(str(exc).split())})"
        ) from None
    if centroids.dim() != 2 or centroids.shape[1] != 3 or len(centroids) < 1:
        raise ValueError(f"model.normal_clusters={path}: expected a list of [x, y, z] centroids")
    return F.normalize(centroids, dim=1)


def aux_regions(task: str, cfg, num_classes: int | None) -> int:
    """R_task: semseg its classes, parts the part classes, depth model.atrc_depth_bins, normals the centroids,
    edges and saliency 2 (binary)."""
    if task == "semseg":
        if num_classes is None:
            raise ValueError("the semseg label context needs the number of classes")
        return num_classes
    if task == "depth":
        return cfg.atrc_depth_bins
    if task == "normals":
        return len(normal_centroids(cfg))
    if task in ("edges", "saliency"):
        return EDGE_REGIONS
    if task == "parts":
        from uda.tasks import num_parts

        return num_parts()
    raise ValueError(f"no auxiliary label space for task {task!r}")


def depth_bins(depth: Tensor, bins: int, min_depth: float, max_depth: float) -> Tensor:
    """Depth in metres [...] -> log-scale bin ids [...] (long): bin b covers [min * q^b, min * q^(b+1)) with
    q = (max/min)^(1/bins); depths beyond the range go to the end bins; 0 (no measurement) -> 255."""
    lo, hi = math.log(min_depth), math.log(max_depth)
    scaled = (depth.clamp_min(min_depth).log() - lo) / (hi - lo) * bins
    ids = scaled.floor().clamp(0, bins - 1).long()
    return torch.where(depth > 0, ids, torch.full_like(ids, IGNORE))


def normal_labels(normals: Tensor, centroids: Tensor) -> Tensor:
    """Normals [B,3,H,W] -> the nearest centroid on the sphere (largest cosine) [B,H,W]; unknown normals
    (|n| <= 0.5, the dataset's 0) -> 255."""
    cos = torch.einsum("bchw,rc->brhw", F.normalize(normals.float(), dim=1), centroids.to(normals.device))
    ids = cos.argmax(1)
    return torch.where(normals.norm(dim=1) > 0.5, ids, torch.full_like(ids, IGNORE))


# --------------------------------------------------------------------------- the model

AUX_KEY = "aux"  # outputs[task]["aux"]: the auxiliary logits [B,R,h,w] of a task a label context needs


class ATRCModel(MultiScaleModel):
    """ATRC on a multi-scale backbone (arch "atrc"): `MultiScaleModel` (backbone maps upsampled to stride 4 and
    concatenated, per task a 3x3 conv-BN-ReLU to a quarter of the channels, a 1x1 prediction, bilinear to the
    input size) with the ATRC module as its exchange, on the task features and the concatenated backbone maps.
    No pre-module (intermediate) prediction, as the authors' code. forward -> {task: {0: [B,C,H,W]}} plus
    {"aux": [B,R,H/4,W/4]} for the tasks whose auxiliary prediction a label context uses.
    """

    initial_predictions = False

    def __init__(self, tasks: Mapping[str, int], cfg):
        super().__init__(tasks, cfg, exchange="atrc")

    def build_exchange(self, exchange: str, tasks: Mapping[str, int], cfg) -> None:
        self.atrc = ATRCHead(self.tasks, self.width, sum(self.encoder.channels), cfg, tasks.get("semseg"))

    def exchange_features(self, x, maps):
        x, aux = self.atrc(x, upsample_concat(maps))
        return x, {t: {AUX_KEY: a} for t, a in aux.items()}


def search_modules(model: nn.Module) -> list[ATRCModule]:
    """The ATRC modules of `model` in search mode (model.atrc_contexts=search)."""
    return [m for m in model.modules() if isinstance(m, ATRCModule) and m.search]


def write_contexts(contexts: Mapping[str, Mapping[str, str]], path: str | Path) -> Path:
    """Write {target: {source: context}} as the JSON model.atrc_contexts=<path> reads, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({t: dict(per) for t, per in contexts.items()}, indent=2) + "\n")
    tmp.replace(path)
    return path
