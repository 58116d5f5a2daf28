"""The dense tasks, each defined once: output channels, supervised losses, predictions in sample units, and
what the task contributes to the other objectives (the map a domain discriminator sees, the representation a
task-transfer network consumes and is compared in).

Objectives and evaluation look a task up in `TASK_DEFS` instead of branching on its name. Self-training asks a
task for its pseudo-label from a teacher's predictions (`pseudo_label`, `flip_back`, `no_label`). How raw network
outputs relate to sample units in a run (the depth parametrisation and the ranges that normalise depth) is
an `OutputSpace`, built once per run by `output_space`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from uda.geometry import D_FAR, depth_to_inverse_normalised, disparity_to_depth, inverse_normalised_to_depth
from uda.losses.adversarial import entropy_map, normalise_depth_for_discriminator
from uda.losses.tasks import (
    IGNORE_INDEX,
    _zero_with_graph,
    depth_loss,
    edges_loss,
    normals_loss,
    parts_loss,
    resize_to,
    saliency_loss,
    semseg_loss,
)

if TYPE_CHECKING:
    from uda.config import SelfTrainingConfig


@dataclass(frozen=True)
class OutputSpace:
    """How a run's raw outputs map to sample units (metres, unit vectors, probabilities).

    depth_output: "inverse" (linear g = d_far / depth) or "disparity" (sigmoid disparity over
    disparity_range metres, Monodepth2); depth_range: the fixed metric range mapped to [0, 1] when depth is
    shown to another network (a domain discriminator, a task-transfer network).
    """

    num_classes: int = 2
    depth_output: str = "inverse"
    d_far: float = D_FAR
    disparity_range: tuple[float, float] = (0.1, 100.0)
    depth_range: tuple[float, float] = (1.0, 100.0)

    def depth_to_inverse_normalised(self, output: Tensor) -> Tensor:
        """A raw depth output as inverse normalised depth g = d_far / depth (the supervised parametrisation)."""
        if self.depth_output == "disparity":
            return self.d_far / disparity_to_depth(output, *self.disparity_range)
        return output

    def depth_metres(self, output: Tensor) -> Tensor:
        """A raw depth output in metres."""
        if self.depth_output == "disparity":
            return disparity_to_depth(output, *self.disparity_range)
        return inverse_normalised_to_depth(output, self.d_far)

    def normalised_depth(self, output: Tensor) -> Tensor:
        """A raw depth output mapped to [0, 1] (near = 1) with the fixed depth_range, or its sigmoid disparity."""
        if self.depth_output == "disparity":
            return output.clamp(0, 1)
        near, far = self.depth_range
        return normalise_depth_for_discriminator(output, self.d_far / far, self.d_far / near)

    def normalised_depth_label(self, depth_m: Tensor) -> Tensor:
        """Depth labels (metres, 0 = none) in the [0, 1] representation of `normalised_depth` (0 where none)."""
        if self.depth_output == "disparity":
            near, far = self.disparity_range
        else:
            near, far = self.depth_range
        inv = depth_to_inverse_normalised(depth_m, 1.0)
        return torch.where(depth_m > 0, ((inv - 1 / far) / (1 / near - 1 / far)).clamp(0, 1), inv)


LossFn = Callable[[Tensor, Tensor, OutputSpace], Tensor]


def l1_inverse_depth(pred: Tensor, depth_m: Tensor, space: OutputSpace) -> Tensor:
    """Mean |g_pred - d_far/depth| over pixels with depth (XTasC's L1 depth loss, on inverse depth)."""
    g = resize_to(space.depth_to_inverse_normalised(pred), depth_m.shape[-2:])
    valid = depth_m > 0
    if not bool(valid.any()):
        return _zero_with_graph(g)
    return (g - depth_to_inverse_normalised(depth_m, space.d_far))[valid].abs().mean()


def quality_weight(logits: Tensor, threshold: float) -> Tensor:
    """Quality weight per image [B]: the share of its pixels whose max softmax probability > threshold (DACS and
    DAFormer take one share over the whole batch; per image, a confident image is not held back by another)."""
    confidence = logits.float().softmax(dim=1).amax(dim=1)
    return (confidence > threshold).float().mean(dim=(1, 2))


def class_balanced_selection(logits: Tensor, portion: float) -> Tensor:
    """CBST's class-balanced selection (Zou et al., ECCV 2018), per batch: for every class c, the pixels predicted
    as c whose max softmax probability is at least the (1 - portion) quantile of the confidences of the pixels
    predicted as c. Returns the kept mask [B,H,W]. A dominant class cannot take the pixels it is least sure of
    (often those of a rarer class that looks like it in the target domain), and every predicted class keeps
    the same share of its pixels."""
    confidence, ids = logits.float().softmax(dim=1).max(dim=1)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for c in ids.unique().tolist():
        of_c = ids == c
        values = confidence[of_c]
        if values.numel() > 16_000_000:  # torch.quantile's input limit: an even subsample
            values = values[:: math.ceil(values.numel() / 16_000_000)]
        cut = torch.quantile(values, 1.0 - portion, interpolation="lower")
        keep |= of_c & (confidence >= cut)
    return keep


class TaskDef:
    """One dense task. Subclasses set `name`, `losses` (name -> loss; the first is the default) and implement
    the maps below."""

    name: ClassVar[str]
    losses: ClassVar[dict[str, LossFn]]

    def channels(self, num_classes: int) -> int:
        """Output channels of the task's head."""
        raise NotImplementedError

    def loss(self, kind: str | None = None) -> LossFn:
        """The supervised loss `kind` (default: the task's first), or ValueError listing the valid ones."""
        if kind is None:
            return next(iter(self.losses.values()))
        if kind not in self.losses:
            raise ValueError(f"{self.name}: unknown loss {kind!r}; choose one of {', '.join(self.losses)}")
        return self.losses[kind]

    def predict(self, output: Tensor, space: OutputSpace) -> Tensor:
        """Raw output -> prediction in sample units (logits, metres, unit normals, edge probability)."""
        raise NotImplementedError

    def domain_map(self, output: Tensor, space: OutputSpace) -> Tensor:
        """What a domain discriminator sees of this output."""
        raise NotImplementedError

    def transfer_input(self, output: Tensor, space: OutputSpace) -> Tensor:
        """The representation a task-transfer network consumes (and is compared in)."""
        raise NotImplementedError

    def consistency_loss(self, transferred: Tensor, direct: Tensor, space: OutputSpace) -> Tensor:
        """Distance of a task-transfer network's raw output to this task's own (detached) prediction."""
        raise NotImplementedError

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        """Distance of a task-transfer network's raw output to this task's labels."""
        raise NotImplementedError

    # Self-training (uda.objectives.self_training): how a teacher's predictions become this task's label.
    pseudo_labelled: ClassVar[bool] = False  # the task has `pseudo_label`
    flip_used: ClassVar[bool] = True  # `pseudo_label` uses the prediction on the mirrored image
    no_label: ClassVar[float] = 0.0  # the label value that means "no label" (depth 0, normals 0)

    def flip_back(self, output: Tensor) -> Tensor:
        """A raw output of the mirrored image, in the image's frame."""
        return output.flip(-1)

    def pseudo_label(
        self, direct: Tensor, flipped: Tensor | None, space: OutputSpace, cfg: SelfTrainingConfig
    ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """The teacher's raw output on the image and on its mirror (flipped back; None unless `flip_used`) ->
        (label in sample units, `no_label` where unreliable; per-pixel weight or None; logs)."""
        raise NotImplementedError


class Segmentation(TaskDef):
    name = "semseg"
    losses = {"ce": lambda pred, label, space: semseg_loss(pred, label)}

    def channels(self, num_classes: int) -> int:
        return num_classes

    def predict(self, output: Tensor, space: OutputSpace) -> Tensor:
        return output

    def domain_map(self, output: Tensor, space: OutputSpace) -> Tensor:
        # ADVENT: the weighted self-information map, one channel per class.
        return entropy_map(output)

    def transfer_input(self, output: Tensor, space: OutputSpace) -> Tensor:
        return output.float().softmax(dim=1)

    def consistency_loss(self, transferred: Tensor, direct: Tensor, space: OutputSpace) -> Tensor:
        # XTasC Eq. 13: soft cross-entropy against the detached class probabilities.
        target = direct.detach().float().softmax(dim=1)
        transferred = resize_to(transferred.float(), target.shape[-2:])
        return -(target * F.log_softmax(transferred, dim=1)).sum(dim=1).mean()

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        return semseg_loss(transferred.float(), label)

    pseudo_labelled = True
    flip_used = False
    no_label = IGNORE_INDEX

    def pseudo_label(self, direct, flipped, space, cfg):
        # The argmax weighted by the image's quality (DACS/DAFormer), or CBST's class-balanced selection.
        ids = direct.argmax(dim=1)
        if cfg.class_portion > 0:
            keep = class_balanced_selection(direct, cfg.class_portion)
            ids = torch.where(keep, ids, torch.full_like(ids, IGNORE_INDEX))
            return ids, keep.float(), {"st/kept": keep.float().mean()}
        q = quality_weight(direct, cfg.threshold)
        return ids, q[:, None, None].expand_as(ids).float(), {"st/quality": q.mean()}


class Depth(TaskDef):
    name = "depth"
    losses = {
        # berHu on g = d_far / depth (DenseMTL §4.1), L1 on g (XTasC Eq. 14).
        "berhu": lambda pred, label, space: depth_loss(
            space.depth_to_inverse_normalised(pred), label, space.d_far
        ),
        "l1": l1_inverse_depth,
    }

    def channels(self, num_classes: int) -> int:
        return 1

    def predict(self, output: Tensor, space: OutputSpace) -> Tensor:
        return space.depth_metres(output)

    def domain_map(self, output: Tensor, space: OutputSpace) -> Tensor:
        return space.normalised_depth(output)

    def transfer_input(self, output: Tensor, space: OutputSpace) -> Tensor:
        return space.normalised_depth(output.float())

    def consistency_loss(self, transferred: Tensor, direct: Tensor, space: OutputSpace) -> Tensor:
        # XTasC Eq. 15: L1 to the detached direct prediction, in the normalised inverse depth of transfer_input.
        target = self.transfer_input(direct.detach(), space)
        return (resize_to(transferred.float(), target.shape[-2:]) - target).abs().mean()

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        transferred = resize_to(transferred.float(), label.shape[-2:])
        valid = label > 0
        if not bool(valid.any()):
            return _zero_with_graph(transferred)
        return (transferred - space.normalised_depth_label(label))[valid].abs().mean()

    pseudo_labelled = True

    def pseudo_label(self, direct, flipped, space, cfg):
        # The mean of the two predictions, kept where they agree within cfg.depth_agreement (relative).
        d1, d2 = space.depth_metres(direct), space.depth_metres(flipped)
        mean = 0.5 * (d1 + d2)
        ok = torch.isfinite(mean) & (mean > 0)
        ok &= (d1 - d2).abs() < cfg.depth_agreement * mean
        return torch.where(ok, mean, torch.zeros_like(mean)), None, {"st/depth_reliable": ok.float().mean()}


class Normals(TaskDef):
    name = "normals"
    losses = {"cosine": lambda pred, label, space: normals_loss(pred, label)}

    def channels(self, num_classes: int) -> int:
        return 3

    def predict(self, output: Tensor, space: OutputSpace) -> Tensor:
        return F.normalize(output, dim=1)

    domain_map = predict
    transfer_input = predict

    def consistency_loss(self, transferred: Tensor, direct: Tensor, space: OutputSpace) -> Tensor:
        target = F.normalize(direct.detach().float(), dim=1)
        cos = (F.normalize(resize_to(transferred.float(), target.shape[-2:]), dim=1) * target).sum(dim=1)
        return (1.0 - cos).mean()

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        return normals_loss(transferred.float(), label)

    pseudo_labelled = True

    def flip_back(self, output: Tensor) -> Tensor:
        # A mirrored image has mirrored normals: the x component changes sign.
        out = output.flip(-1).clone()
        out[:, 0] = -out[:, 0]
        return out

    def pseudo_label(self, direct, flipped, space, cfg):
        # The mean direction, kept where the two predictions are within cfg.normals_agreement degrees.
        n1, n2 = F.normalize(direct, dim=1), F.normalize(flipped, dim=1)
        ok = (n1 * n2).sum(dim=1, keepdim=True) > math.cos(math.radians(cfg.normals_agreement))
        label = torch.where(ok, F.normalize(n1 + n2, dim=1), torch.zeros_like(n1))
        return label, None, {"st/normals_reliable": ok.float().mean()}


class Edges(TaskDef):
    name = "edges"
    losses = {"weighted_bce": lambda pred, label, space: edges_loss(pred, label)}

    def channels(self, num_classes: int) -> int:
        return 1

    def predict(self, output: Tensor, space: OutputSpace) -> Tensor:
        return torch.sigmoid(output)

    domain_map = predict
    transfer_input = predict

    def consistency_loss(self, transferred: Tensor, direct: Tensor, space: OutputSpace) -> Tensor:
        target = torch.sigmoid(direct.detach().float())
        transferred = resize_to(transferred.float(), target.shape[-2:])
        return F.binary_cross_entropy_with_logits(transferred, target)

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        return edges_loss(transferred.float(), label)


# The human-part label set of PASCAL-Context (PASCAL-Part persons grouped as in ASTMT / MTI-Net / ATRC):
# background, head, torso, upper arms, lower arms (with hands), upper legs, lower legs (with feet).
PARTS_LABEL_SET = "human_parts7"


def num_parts() -> int:
    """Part classes of the `parts` task, background included (7: the literature's PASCAL-Context protocol)."""
    from uda.data.labels import get_label_set

    return get_label_set(PARTS_LABEL_SET).num_classes


class Parts(Segmentation):
    """Human-part segmentation (PASCAL-Context): labels int64 [H,W], part ids of PARTS_LABEL_SET (0 =
    background), 255 = ignore (padding, and images without annotated people). The head has num_parts()
    channels whatever the run's semantic classes; everything else is segmentation's (logits, entropy map
    for a discriminator, softmax for a transfer network)."""

    name = "parts"
    losses = {"ce": lambda pred, label, space: parts_loss(pred, label)}

    pseudo_labelled = False  # self-training mixes and weighs by semantic classes; parts have no such label

    def channels(self, num_classes: int) -> int:
        return num_parts()

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        return parts_loss(transferred.float(), label)


class Saliency(Edges):
    """Salient-object segmentation (PASCAL-Context's distilled saliency): labels float32 [1,H,W] in {0,1},
    255 = ignore (padding); one logit; prediction and transfer/discriminator representation: the
    probability sigmoid(logit). A binary map like edges: everything but the loss is edges'."""

    name = "saliency"
    losses = {"balanced_bce": lambda pred, label, space: saliency_loss(pred, label)}

    def alignment_loss(self, transferred: Tensor, label: Tensor, space: OutputSpace) -> Tensor:
        return saliency_loss(transferred.float(), label)


TASK_DEFS: dict[str, TaskDef] = {
    t.name: t for t in (Segmentation(), Depth(), Normals(), Edges(), Parts(), Saliency())
}


def task_channels(tasks: tuple[str, ...], num_classes: int) -> dict[str, int]:
    """Output channels per task: the class count (semseg), 1 (depth), 3 (normals), 1 (edges), the part
    classes of PARTS_LABEL_SET (parts, 7), 1 (saliency)."""
    return {t: TASK_DEFS[t].channels(num_classes) for t in tasks}


def to_predictions(
    outputs: Mapping[str, Mapping[int, Tensor]], scale: int, space: OutputSpace, tasks: Sequence[str] = ()
) -> dict:
    """Network outputs at one scale -> predictions in sample units: logits (semseg, parts), metres, unit normals,
    edge and saliency probabilities.
    Tasks without an output at that scale (MTI-Net's auxiliary tasks have no final prediction) are left out; one
    of `tasks` (those evaluated) without it is a ValueError naming the scales the model has for them."""
    if any(scale not in outputs.get(t, {}) for t in tasks):
        # Left out silently, the task would be reported as all-NaN metrics (or fail later, e.g. median scaling).
        # Scales only: ATRC adds its auxiliary logits under the key "aux" (a str, not comparable with the ints).
        common = set.intersection(*({s for s in outputs.get(t, {}) if isinstance(s, int)} for t in tasks))
        has = ", ".join(map(str, sorted(common))) or "none common to its tasks"
        fix = f"; pass --scale {min(common)} (eval.scale={min(common)} in a recipe)" if common else ""
        raise ValueError(f"the model has no output at scale {scale} (it has {has}){fix}")
    return {t: TASK_DEFS[t].predict(per[scale].float(), space) for t, per in outputs.items() if scale in per}


def evaluated_tasks(cfg) -> tuple[str, ...]:
    """The tasks of an ExperimentConfig that are evaluated: all but those predicted in the front end only
    (model.aux_tasks)."""
    return tuple(t for t in cfg.tasks if t not in cfg.model.aux_tasks)


def output_space(cfg, num_classes: int) -> OutputSpace:
    """The output space of an ExperimentConfig: its depth parametrisation (a sigmoid disparity head spans the
    photometric objective's depth range when depth is self-supervised, 0.1-100 m otherwise)."""
    ph = cfg.photometric
    return OutputSpace(
        num_classes=num_classes,
        depth_output=cfg.model.depth_output,
        d_far=cfg.loss.d_far,
        disparity_range=(ph.min_depth, ph.max_depth) if ph is not None else (0.1, 100.0),
    )
