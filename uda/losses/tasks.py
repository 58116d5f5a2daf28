"""Supervised task losses and the multi-scale multi-task objective (DenseMTL Eq. 6).

Units: depth labels are metres (0 = no measurement); the network's depth output is the inverse
normalised depth g = d_far / d, and the depth loss is berHu on g (paper §4.1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda import TASKS
from uda.geometry import D_FAR, depth_to_inverse_normalised

IGNORE_INDEX = 255


def resize_to(pred: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinearly resize a prediction [B,C,h,w] to `size` (H, W) if it differs (align_corners=False)."""
    # One resize rule for every task: predictions go to the label resolution, labels are never resized,
    # so no label is interpolated (the released code used align_corners=True; False matches pixel centres).
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=tuple(size), mode="bilinear", align_corners=False)


def _zero_with_graph(pred: Tensor) -> Tensor:
    # A zero that still depends on `pred`, so backward() and DDP see every parameter used.
    return pred.sum() * 0.0


def semseg_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of logits [B,C,h,w] against class ids [B,H,W]; 255 is ignored. Unitless."""
    logits = resize_to(logits, target.shape[-2:])
    if not bool((target != IGNORE_INDEX).any()):
        return _zero_with_graph(logits)
    return F.cross_entropy(logits, target.long(), ignore_index=IGNORE_INDEX)


def berhu(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Reverse Huber loss averaged over the pixels where `mask` is true; c = 0.2 max|pred - target|."""
    # The released code multiplied the error by the mask and then averaged over ALL pixels, so the loss
    # shrank with the fraction of valid pixels (sparse LiDAR-like GT weighed less). We average over the
    # valid pixels only, which makes the loss independent of how much of the image is unlabelled.
    mask = mask.bool()
    if not bool(mask.any()):
        return _zero_with_graph(pred)
    diff = (pred - target)[mask]
    abs_diff = diff.abs()
    c = 0.2 * abs_diff.max().detach()
    # Clamping c only guards the unused branch when every error is 0 (c = 0); it changes no selected value.
    c_safe = c.clamp_min(torch.finfo(diff.dtype).tiny)
    quadratic = (diff.square() + c.square()) / (2.0 * c_safe)
    return torch.where(abs_diff <= c, abs_diff, quadratic).mean()


def depth_loss(pred_g: Tensor, depth_m: Tensor, d_far: float = D_FAR) -> Tensor:
    """berHu between predicted inverse normalised depth g [B,1,h,w] and d_far/depth [B,1,H,W] (metres)."""
    pred_g = resize_to(pred_g, depth_m.shape[-2:])
    target_g = depth_to_inverse_normalised(depth_m, d_far=d_far)
    return berhu(pred_g, target_g, depth_m > 0)


def normals_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of 1 - cos(pred, target) over pixels with a known normal (|target| > 0.5). Range [0, 2]."""
    pred = resize_to(pred, target.shape[-2:])
    valid = target.norm(dim=1) > 0.5
    if not bool(valid.any()):
        return _zero_with_graph(pred)
    # Raw network outputs have arbitrary length; only the direction is supervised.
    cos = (F.normalize(pred, dim=1, eps=1e-8) * F.normalize(target, dim=1, eps=1e-8)).sum(dim=1)
    return (1.0 - cos)[valid].mean()


def edges_loss(logit: Tensor, target: Tensor, pos_weight: float = 0.95) -> Tensor:
    """Class-weighted BCE of edge logits [B,1,h,w] vs {0,1} [B,1,H,W] (255 = padding, ignored); weight-normalised
    mean."""
    # The released code used a 2-class cross-entropy with class weights [0.05, 0.95]. A softmax over
    # logits (a, b) equals a sigmoid of the single logit b - a, so this is the same loss with one
    # output channel. Like torch's weighted CE we divide by the sum of the weights, not the pixel count.
    logit = resize_to(logit, target.shape[-2:])
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_with_graph(logit)
    target = torch.where(valid, target, torch.zeros_like(target)).to(logit.dtype)
    weight = (target * pos_weight + (1.0 - target) * (1.0 - pos_weight)) * valid
    per_pixel = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    return (weight * per_pixel).sum() / weight.sum()


def parts_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of human-part logits [B,P,h,w] against part ids [B,H,W] (0 = background); 255 is ignored
    (padding, and whole images without annotated people, as in ATRC / MTI-Net). Unitless."""
    return semseg_loss(logits, target)


def saliency_loss(logit: Tensor, target: Tensor) -> Tensor:
    """Balanced BCE of saliency logits [B,1,h,w] vs {0,1} labels [B,1,H,W]; 255 is ignored. Unitless.

    HED-style balance as ATRC's BalancedBinaryCrossEntropyLoss(pos_weight=None) and MTI-Net's
    BalancedCrossEntropyLoss: w = fraction of negatives among the valid pixels of the batch; salient pixels
    weigh w, the others 1 - w; the mean over the valid pixels.
    """
    logit = resize_to(logit, target.shape[-2:])
    valid = target != IGNORE_INDEX
    if not bool(valid.any()):
        return _zero_with_graph(logit)
    label = torch.where(valid, target, torch.zeros_like(target)).to(logit.dtype)
    n_valid = valid.sum()
    w = ((1.0 - label) * valid).sum().detach() / n_valid
    weight = (label * w + (1.0 - label) * (1.0 - w)) * valid
    per_pixel = F.binary_cross_entropy_with_logits(logit, label, reduction="none")
    return (weight * per_pixel).sum() / n_valid


TASK_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "semseg": semseg_loss,
    "depth": depth_loss,
    "normals": normals_loss,
    "edges": edges_loss,
    "parts": parts_loss,
    "saliency": saliency_loss,
}

# Paper §4.1 / App. B.1 Tab. 7: grid-searched on the MTL baseline per task set, reused for every method.
TASK_WEIGHT_PRESETS: dict[tuple[str, ...], dict[str, float]] = {
    ("semseg", "depth"): {"semseg": 50.0, "depth": 1.0},
    ("semseg", "depth", "normals"): {"semseg": 100.0, "depth": 1.0, "normals": 100.0},
    ("semseg", "depth", "normals", "edges"): {"semseg": 100.0, "depth": 1.0, "normals": 100.0, "edges": 50.0},
    # PASCAL-Context (MTI-Net / ATRC configs): semseg 1, parts 2, saliency 5, normals 10, edges 50.
    ("semseg", "parts", "saliency"): {"semseg": 1.0, "parts": 2.0, "saliency": 5.0},
    ("semseg", "normals", "edges", "parts", "saliency"): {
        "semseg": 1.0,
        "parts": 2.0,
        "saliency": 5.0,
        "normals": 10.0,
        "edges": 50.0,
    },
}


def default_task_weights(tasks: Sequence[str]) -> dict[str, float]:
    """Paper task weights for a known task set (any order), else uniform 1.0."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected a subset of {TASKS}")
    key = tuple(t for t in TASKS if t in tasks)
    preset = TASK_WEIGHT_PRESETS.get(key)
    if preset is None:
        return {t: 1.0 for t in tasks}
    return dict(preset)


class MultiTaskLoss(nn.Module):
    """Multi-scale multi-task objective, DenseMTL Eq. 6, on the labelled samples of a batch.

    L = sum_t w_t (L_t^0 + mean_{s in S_t} L_t^s), where scale 0 is the final prediction and S_t the
    configured intermediate scales present in the outputs for task t (Eq. 6 with S shared by all
    tasks when every task has the same scales). The released code averaged the final and intermediate
    terms, i.e. half of Eq. 6 with S = {1}; we implement Eq. 6 as written. Task losses are unitless.
    `loss_fns` replaces the loss of some tasks (pred, label) -> scalar. intermediate="sum" replaces the mean
    over S_t by the sum (MTI-Net's deep supervision: every scale with the final weight).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weights: Mapping[str, float],
        d_far: float = D_FAR,
        intermediate_scales: Sequence[int] = (1,),
        loss_fns: Mapping[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
        intermediate: str = "mean",
    ) -> None:
        super().__init__()
        self.loss_fns: dict[str, Callable[[Tensor, Tensor], Tensor]] = dict(TASK_LOSSES)
        self.loss_fns["depth"] = functools.partial(depth_loss, d_far=d_far)
        self.loss_fns.update(loss_fns or {})
        unknown = [t for t in tasks if t not in self.loss_fns]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; expected a subset of {tuple(TASK_LOSSES)}")
        missing = [t for t in tasks if t not in weights]
        if missing:
            raise KeyError(f"no loss weight for tasks {missing}")
        if any(s <= 0 for s in intermediate_scales):
            raise ValueError(f"intermediate scales must be > 0 (0 is final): {intermediate_scales}")
        self.tasks = tuple(tasks)
        self.weights = {t: float(weights[t]) for t in self.tasks}
        self.intermediate_scales = tuple(intermediate_scales)
        if intermediate not in ("mean", "sum"):
            raise ValueError(f"intermediate must be mean or sum, got {intermediate!r}")
        self.reduce = torch.mean if intermediate == "mean" else torch.sum

    def task_terms(
        self,
        outputs: Mapping[str, Mapping[int, Tensor]],
        batch: Mapping[str, Tensor],
        labelled: Tensor | None = None,
    ) -> tuple[dict[str, list[Tensor]], Tensor, dict[str, Tensor]]:
        """Unweighted terms per task ([L_t^0, mean_s L_t^s] where present), a zero that depends on every output,
        and detached per-(task, scale) losses ("loss/<task>/s<scale>")."""
        index = None
        if labelled is not None and not bool(labelled.all()):
            index = labelled.bool().nonzero(as_tuple=True)[0]

        used = [outputs[t][s] for t in self.tasks if t in outputs for s in outputs[t]]
        if not used:
            raise ValueError(f"outputs hold none of the tasks {self.tasks}")
        # Every output enters the graph (with weight 0 if unsupervised in this batch), so backward reaches
        # the same parameters on every process even when a process holds no labelled sample.
        zero = torch.stack([_zero_with_graph(o) for o in used]).sum()
        terms: dict[str, list[Tensor]] = {}
        logs: dict[str, Tensor] = {}
        if index is not None and index.numel() == 0:
            return terms, zero, logs

        for task in self.tasks:
            if task not in outputs or task not in batch:
                continue
            target = batch[task] if index is None else batch[task][index]
            per_scale: dict[int, Tensor] = {}
            for scale in (0, *self.intermediate_scales):
                if scale in outputs[task]:
                    pred = outputs[task][scale]
                    pred = pred if index is None else pred[index]
                    per_scale[scale] = self.loss_fns[task](pred, target)
                    logs[f"loss/{task}/s{scale}"] = per_scale[scale].detach()
            inter = [per_scale[s] for s in self.intermediate_scales if s in per_scale]
            terms[task] = [per_scale[0]] if 0 in per_scale else []
            if inter:
                terms[task].append(self.reduce(torch.stack(inter)))
        return terms, zero, logs

    def forward(
        self,
        outputs: Mapping[str, Mapping[int, Tensor]],
        batch: Mapping[str, Tensor],
        labelled: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total weighted loss and detached unweighted per-(task, scale) losses ("loss/<task>/s<scale>")."""
        terms, total, logs = self.task_terms(outputs, batch, labelled)
        for task, per_task in terms.items():
            for term in per_task:
                total = total + self.weights[task] * term
        logs["loss/total"] = total.detach()
        return total, logs
