"""Multi-task self-training on the target domain (DACS, DAFormer, CorDA family), for any multi-task model.

Each step:
1. The **teacher**, an exponential moving average of the whole model (encoder, decoders and exchange blocks;
   a deep copy made at `bind`), predicts on the target images and on their horizontal flips (one forward of
   both, in eval mode, without gradients).
2. **Pseudo-labels** per task, each defined by its task (`TaskDef.pseudo_label` in uda.tasks):
   - semseg: the teacher's argmax, every pixel weighted by the image's quality q = share of its pixels whose
     max softmax probability exceeds `threshold` (DACS / DAFormer, tau = 0.968); or, with `class_portion` p > 0,
     CBST's class-balanced selection: per class, the p most confident of the batch's pixels predicted as that
     class, weight 1, the others unlabelled;
   - depth: the mean of the teacher's depth on the image and on the flip (flipped back), kept where the two
     agree, |d - d_flip| / mean < `depth_agreement` (0 = no label elsewhere);
   - normals: the normalised mean of the two predictions (the flipped one flipped back, x negated), kept where
     their angle is below `normals_agreement` degrees.
   Edges are not pseudo-labelled. With `confidence_gate`, depth and normals pseudo-labels are also dropped
   where the teacher's max class probability is at most `threshold` (needs the semseg task). `ignore_top` /
   `ignore_bottom` (shares of the height; DAFormer's psweight_ignore) leave the target's top / bottom rows
   without pseudo-labels (weight 0 for semseg, no label for depth and normals) before mixing.
3. **Mixing** (uda.mixing): `classmix` pastes half of each source image's classes onto the paired target image;
   `depthmix` pastes them only where the source pixel (depth label) is nearer than the teacher's target depth.
   Labels (source labels on pasted pixels, pseudo-labels elsewhere) and the semseg weight (1 on source pixels,
   q elsewhere) follow the mask; the mixed sample keeps the target's intrinsics. `none`: the target image.
4. **Strong augmentation** of the (mixed) image: colour jitter and Gaussian blur per image, by kornia on the
   batched tensor on the device (albumentations, also a dependency, works on one numpy image at a time on
   the CPU; here the images already are a batch on the accelerator). Photometric only: labels stay.
5. The **student** (the model, `Step.model`) predicts on the result (teacher and student with the BatchNorm
   statistics of the target under `train.bn_mode=domain`); its final (scale 0) outputs are trained on
   the mixed labels: semseg by the weighted cross-entropy mean over labelled pixels, the other tasks by their
   run's supervised loss (`loss.functions`). The terms go into `Terms.tasks`, times `weight`: the run's task
   weighting combines them with each task's supervised terms (pseudo-labels are labels of that task).
6. After every applied model step, `update` moves the teacher: theta_T = alpha_t theta_T + (1 - alpha_t) theta_S
   with alpha_t = min(1 - 1/(t + 1), alpha), t the student steps done, 1 at the first update (mean teacher's
   and DAFormer's warm-up: the first update is alpha 0.5; `ema_ramp=false`: alpha). BatchNorm
   statistics (saved floating buffers) follow the same average, so the teacher's statistics lag like its
   weights; integer buffers (num_batches_tracked) and non-persistent constants are copied. With several
   processes the averaged buffers are then averaged over processes (every process holds the same teacher).
   The teacher is a held network (uda.objectives.base): no gradient, no optimiser, no DDP,
   `teacher.safetensors` in every checkpoint.

Options: rare-class sampling of the source stream (uda.data.sampling) and DAFormer's thing-class feature
distance to a frozen ImageNet encoder (`feature_distance`, added to the loss as `fd_weight` x distance).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda.config import SelfTrainingConfig
from uda.losses.tasks import resize_to
from uda.mixing import IGNORE_INDEX, class_mix_mask, depth_mix_mask, mix
from uda.models.domain_bn import bn_domain
from uda.objectives.base import Objective, ObjectiveError, RunContext, Step, StreamNeeds, Terms
from uda.tasks import TASK_DEFS, class_balanced_selection, quality_weight

__all__ = [
    "SelfTraining",
    "class_balanced_selection",
    "quality_weight",
    "strong_augmentation",
    "weighted_cross_entropy",
]

# ------------------------------------------------------------------------------------------------ pseudo-labels


def weighted_cross_entropy(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """sum(weight x CE) / (labelled pixels): DACS's pixel-weighted cross-entropy (ignore 255)."""
    logits = resize_to(logits.float(), label.shape[-2:])
    ce = F.cross_entropy(logits, label.long(), ignore_index=IGNORE_INDEX, reduction="none")
    labelled = (label != IGNORE_INDEX).sum()
    return (ce * weight).sum() / labelled.clamp_min(1)


def strong_augmentation(cfg: SelfTrainingConfig, height: int) -> nn.Module:
    """Colour jitter (strength `jitter`, hue jitter/4, probability `jitter_p`) then Gaussian blur (sigma
    0.15-1.15, kernel the odd size nearest 0.1 x height, probability 0.5), per image, on a batch in [0, 1]."""
    import kornia.augmentation as K

    steps: list[nn.Module] = []
    if cfg.jitter > 0 and cfg.jitter_p > 0:
        j = cfg.jitter
        steps.append(K.ColorJitter(j, j, j, j / 4, p=cfg.jitter_p))
    if cfg.blur:
        k = max(3, math.ceil(0.1 * height) | 1)
        steps.append(K.RandomGaussianBlur((k, k), (0.15, 1.15), p=0.5))
    return nn.Sequential(*steps)


# ------------------------------------------------------------------------------------------------ the objective


class SelfTraining(Objective):
    """EMA teacher -> pseudo-labels on target images -> (mixed, augmented) student training; see the module."""

    section = "self_training"

    def __init__(self, run: RunContext, cfg: SelfTrainingConfig) -> None:
        super().__init__(run, cfg)
        exp = run.cfg
        main = [t for t in run.tasks if t not in exp.model.aux_tasks]
        self.tasks = tuple(t for t in cfg.tasks if t in main and TASK_DEFS[t].pseudo_labelled)
        if not self.tasks:
            raise ObjectiveError(
                f"self_training.tasks={cfg.tasks}: none of them is a pseudo-labelled task of this run "
                f"{tuple(main)}; pseudo-labels exist for {', '.join(t for t, d in TASK_DEFS.items() if d.pseudo_labelled)}"
            )
        if cfg.mix != "none":
            if "semseg" not in run.tasks:
                raise ObjectiveError(
                    f"self_training.mix={cfg.mix} mixes by source classes and needs the semseg task; "
                    "set self_training.mix=none"
                )
            if exp.data.size != exp.target.size or exp.data.batch_size != exp.target.batch_size:
                raise ObjectiveError(
                    f"self_training.mix={cfg.mix} pairs source and target images: data.size/batch_size "
                    f"{exp.data.size}/{exp.data.batch_size} must equal target.size/batch_size "
                    f"{exp.target.size}/{exp.target.batch_size}; set them equal or self_training.mix=none"
                )
        if cfg.mix == "depthmix" and "depth" not in run.tasks:
            raise ObjectiveError(
                "self_training.mix=depthmix orders pixels by depth and needs the depth task; use classmix"
            )
        if cfg.mix == "depthmix" and exp.photometric is not None and exp.photometric.domain == "source":
            raise ObjectiveError(
                "self_training.mix=depthmix orders pixels by the source's depth labels, which photometric.domain="
                "source leaves unread (its depth is learnt from video); use self_training.mix=classmix"
            )
        if cfg.rare_class_sampling and "semseg" not in run.tasks:
            raise ObjectiveError(
                "self_training.rare_class_sampling=true samples by semseg classes; the run has no semseg task"
            )
        if cfg.feature_distance and not (exp.model.pretrained or exp.model.weights_path):
            raise ObjectiveError(
                "self_training.feature_distance=true compares with a frozen ImageNet encoder: set "
                "model.pretrained=true (or model.weights_path=/path/to/weights.pth), or "
                "self_training.feature_distance=false"
            )
        self.loss_fns = {t: TASK_DEFS[t].loss(exp.loss.functions.get(t)) for t in self.tasks if t != "semseg"}
        self.augment = strong_augmentation(cfg, exp.target.size[0])
        self.sampling = None
        if cfg.rare_class_sampling:
            from uda.data.sampling import RareClassSampling

            self.sampling = RareClassSampling(run.space.num_classes, cfg.rcs_temperature, cfg.rcs_min_pixels)
        self.teacher: nn.Module | None = None
        self.student: nn.Module | None = None
        self.imagenet: nn.Module | None = None
        self.thing_ids: Tensor | None = None

    # ------------------------------------------------------------------ networks

    def weighted_tasks(self, unlabelled: Mapping[int, frozenset[str]]) -> frozenset[str]:
        return frozenset(self.tasks)

    def needs(self, domain: int) -> StreamNeeds | None:
        return StreamNeeds(sampling=self.sampling) if domain == 0 else StreamNeeds()

    def bind(self, model: nn.Module) -> None:
        """The teacher: a deep copy of the whole model, frozen and in eval mode (BatchNorm running statistics)."""
        self.student = model
        self.teacher = copy.deepcopy(model)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._pairs = list(zip(self.teacher.parameters(), model.parameters(), strict=True))
        # Saved floating buffers (BatchNorm statistics) are averaged; the rest is copied: integer counters, and
        # non-persistent constants (the ImageNet mean/std), which the checkpoint does not hold and whose
        # average could drift by an ulp from the value a resumed run rebuilds.
        saved = set(self.teacher.state_dict())
        buffers = list(zip(self.teacher.named_buffers(), model.buffers(), strict=True))
        self._float_buffers = [(t, s) for (n, t), s in buffers if t.is_floating_point() and n in saved]
        self._other_buffers = [(t, s) for (n, t), s in buffers if not (t.is_floating_point() and n in saved)]
        if self.cfg.feature_distance:
            self._bind_imagenet(model)

    def _bind_imagenet(self, model: nn.Module) -> None:
        from uda.data.labels import get_label_set
        from uda.models.backbone import ResNetEncoder

        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, ResNetEncoder):
            raise ObjectiveError(
                "self_training.feature_distance=true needs a model with one shared ResNet encoder "
                "(model.arch mtl, mteb, padnet, 3ways-padnet); set self_training.feature_distance=false"
            )
        m = self.run.cfg.model
        device = next(model.parameters()).device
        self.imagenet = (
            ResNetEncoder(m.backbone, True, m.weights_path).to(device).eval().requires_grad_(False)
        )
        names = get_label_set(self.run.cfg.data.label_set).class_names
        ids = [i for i, n in enumerate(names) if n in self.cfg.fd_classes]
        if not ids:
            raise ObjectiveError(
                f"self_training.fd_classes names no class of {self.run.cfg.data.label_set} ({', '.join(names)})"
            )
        self.thing_ids = torch.tensor(ids, device=device)

    def held_networks(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher} if self.teacher is not None else {}

    # ------------------------------------------------------------------ one step

    def alpha_at(self, step: int) -> float:
        """The EMA rate after step `step` (0-based, so t = step + 1 student steps are done): min(1 - 1/(t + 1),
        alpha), or alpha. Mean teacher and DAFormer count the student's steps so: the first update averages the
        initial weights and the student's half and half (alpha 0.5), it does not replace the teacher."""
        if self.cfg.ema_ramp:
            return min(1.0 - 1.0 / (step + 2), self.cfg.alpha)
        return self.cfg.alpha

    @torch.no_grad()
    def pseudo_labels(
        self, image: Tensor
    ) -> tuple[dict[str, tuple[Tensor, Tensor | None]], Tensor | None, dict]:
        """Teacher pseudo-labels of target images [B,3,H,W]: {task: (label, weight)}, the teacher's flip-averaged
        depth in metres (for depth-aware mixing; None without depth) and logs."""
        flip = any(TASK_DEFS[t].flip_used for t in self.tasks) or self.cfg.mix == "depthmix"
        batch = torch.cat([image, image.flip(-1)]) if flip else image
        with bn_domain(self.teacher, 1):  # target images: target statistics with train.bn_mode=domain
            outputs = self.teacher(batch)
        n, size = image.shape[0], image.shape[-2:]
        labels, logs, ordering = {}, {}, None
        for task in self.tasks:
            out = resize_to(outputs[task][0].float(), size)
            spec = TASK_DEFS[task]
            flipped = spec.flip_back(out[n:]) if spec.flip_used else None
            label, weight, task_logs = spec.pseudo_label(out[:n], flipped, self.run.space, self.cfg)
            labels[task] = (label, weight)
            logs.update(task_logs)
        if self.cfg.confidence_gate and "semseg" in outputs:
            # Flip agreement alone passes a near-constant early prediction: keep the geometry labels only where
            # the teacher is also sure of the class.
            logits = resize_to(outputs["semseg"][0].float(), size)[:n]
            sure = logits.softmax(dim=1).amax(dim=1, keepdim=True) > self.cfg.threshold
            for task in self.tasks:
                if task != "semseg":
                    label, weight = labels[task]
                    labels[task] = (
                        torch.where(sure, label, torch.full_like(label, TASK_DEFS[task].no_label)),
                        weight,
                    )
            logs["st/confident"] = sure.float().mean()
        rows = self.ignored_rows(size[0], image.device)
        if rows is not None:
            # DAFormer's psweight_ignore: no pseudo-label in the target's top/bottom rows (before mixing).
            for task, (label, weight) in labels.items():
                if task == "semseg":
                    labels[task] = (label, weight.masked_fill(rows[:, None], 0.0))
                else:
                    labels[task] = (label.masked_fill(rows[:, None], TASK_DEFS[task].no_label), weight)
        if self.cfg.mix == "depthmix":
            out = resize_to(outputs["depth"][0].float(), size)
            ordering = 0.5 * (
                self.run.space.depth_metres(out[:n])
                + self.run.space.depth_metres(TASK_DEFS["depth"].flip_back(out[n:]))
            )
        return labels, ordering, logs

    def ignored_rows(self, height: int, device: torch.device) -> Tensor | None:
        """Bool [H] true on the rows `ignore_top` / `ignore_bottom` (shares of the height, rounded) leave without
        pseudo-labels; None if none."""
        top, bottom = round(self.cfg.ignore_top * height), round(self.cfg.ignore_bottom * height)
        if top == 0 and bottom == 0:
            return None
        index = torch.arange(height, device=device)
        return (index < top) | (index >= height - bottom)

    def mixed_batch(self, step: Step) -> tuple[Tensor, dict[str, Tensor], Tensor | None, dict]:
        """The student's input and labels: (image, {task: label}, semseg pixel weight, logs)."""
        source, target = step.batch["source"], step.batch["target"]
        image = target["image"]
        pseudo, ordering, logs = self.pseudo_labels(image)
        labels = {t: label for t, (label, _) in pseudo.items()}
        weight = pseudo["semseg"][1] if "semseg" in pseudo else None
        if self.cfg.mix != "none":
            mask = class_mix_mask(source["semseg"])
            if self.cfg.mix == "depthmix":
                mask = depth_mix_mask(mask, source["depth"], ordering)
            image = mix(mask, source["image"], image)
            for t in labels:
                src = source.get(t)
                if src is None:  # a task the source stream has no labels of
                    src = torch.full_like(labels[t], TASK_DEFS[t].no_label)
                labels[t] = mix(mask, src.to(labels[t].dtype), labels[t])
            if weight is not None:
                weight = mix(mask, torch.ones_like(weight), weight)
            logs["st/mixed"] = mask.float().mean()
        return image, labels, weight, logs

    def feature_distance(self, source) -> Tensor:
        """DAFormer's FD: mean L2 distance between the student's and the frozen ImageNet encoder's deepest
        features of source images, over feature pixels whose patch is > 75 % thing-class pixels."""
        image = source["image"]
        feats = self.student.encoder(image)[-1]
        with torch.no_grad():
            ref = self.imagenet(image)[-1]
        dist = (feats.float() - ref.float()).norm(dim=1)
        thing = torch.isin(source["semseg"], self.thing_ids).float()[:, None]
        share = F.adaptive_avg_pool2d(thing, dist.shape[-2:])[:, 0]
        mask = share > 0.75
        return dist[mask].mean() if bool(mask.any()) else dist.sum() * 0.0

    def loss(self, step: Step) -> Terms | None:
        if step.index < self.cfg.start_step:
            return None
        image, labels, weight, logs = self.mixed_batch(step)
        with torch.autocast(image.device.type, enabled=False):  # photometric ops in float32
            image = self.augment(image.float())
        fmt = torch.channels_last if self.run.cfg.train.channels_last else torch.contiguous_format
        # Mixed images are target images with pasted source objects: normalised as target images, but (with
        # train.bn_mode=domain) the target's running statistics are measured on target images alone.
        with bn_domain(step.model, 1, track=self.cfg.mix == "none"):
            outputs = step.model(image.to(memory_format=fmt))
        terms: dict[str, list[Tensor]] = {}
        for t in self.tasks:
            pred = outputs[t][0]
            if t == "semseg":
                value = weighted_cross_entropy(pred, labels[t], weight)
            else:
                value = self.loss_fns[t](pred.float(), labels[t], self.run.space)
            terms[t] = [self.cfg.weight * value]
            logs[f"loss/st_{t}"] = value.detach()
        # Every output of the student's forward stays in the graph (DDP expects every used parameter to get one).
        total = sum(o.sum() * 0.0 for per in outputs.values() for o in per.values())
        if self.cfg.feature_distance:
            fd = self.feature_distance(step.batch["source"])
            total = total + self.cfg.fd_weight * fd
            logs["loss/st_fd"] = fd.detach()
        return Terms(tasks=terms, total=total, logs={k: torch.as_tensor(v).detach() for k, v in logs.items()})

    @torch.no_grad()
    def update(self, step: Step) -> dict[str, Tensor]:
        """theta_T = alpha_t theta_T + (1 - alpha_t) theta_S for parameters and floating buffers; integer
        buffers copied; floating buffers then averaged over processes."""
        alpha = self.alpha_at(step.index)
        for pairs in (self._pairs, self._float_buffers):
            if not pairs:
                continue
            teacher, student = [t for t, _ in pairs], [s for _, s in pairs]
            torch._foreach_mul_(teacher, alpha)
            torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - alpha))
        for t, s in self._other_buffers:
            t.copy_(s)
        acc = step.accelerator
        if acc.num_processes > 1 and self._float_buffers:
            for t, _ in self._float_buffers:
                t.copy_(acc.reduce(t.clone(), "mean"))
        return {"st/alpha": torch.tensor(alpha)}
