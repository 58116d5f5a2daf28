"""ATRC's label-context supervision: each task's auxiliary prediction against its discretised labels."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import Tensor

from uda.config import LabelContextConfig
from uda.files import write_text_atomic
from uda.models.atrc import AUX_KEY, IGNORE, ATRCHead, depth_bins, normal_centroids, normal_labels
from uda.objectives.base import Objective, ObjectiveError, RunContext, Step, Terms

AUX_TASKS = ("semseg", "parts", "depth", "normals", "edges", "saliency")
CENTROIDS_FILE = "normal_clusters.json"  # <run>/normal_clusters.json: the centroids the run trained with


def resize_nearest(label: Tensor, size: Sequence[int]) -> Tensor:
    """Labels [B,H,W] or [B,C,H,W] resized by nearest neighbour to `size` (h, w), same rank and dtype."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    x = label if label.dim() == 4 else label.unsqueeze(1)
    out = F.interpolate(x.float(), size=tuple(size), mode="nearest").to(label.dtype)
    return out if label.dim() == 4 else out.squeeze(1)


class LabelContext(Objective):
    """Cross-entropy of outputs[task]["aux"] (logits [B,R,h,w]) against the task's labels discretised into its
    label regions at the aux resolution (labels resized by nearest neighbour first):
    semseg and parts their class ids; depth log-scale bins between label_context.depth_range (model.atrc_depth_bins);
    normals the nearest centroid (model.normal_clusters, or the Fibonacci-sphere default); edges and saliency 0 / 1.
    Invalid pixels are ignored (255 in semseg, parts, edges and saliency; depth 0; normals 0). Each term is attributed to its task (the task
    weighting applies), times label_context.weight; logged as loss/<task>/aux. Tasks without an aux output
    (no label context needs them) contribute nothing.
    """

    section = "label_context"

    def __init__(self, run: RunContext, cfg: LabelContextConfig) -> None:
        super().__init__(run, cfg)
        model = run.cfg.model
        if model.arch not in ("atrc", "atrc-fpm"):
            raise ObjectiveError(
                f"label_context supervises the auxiliary predictions of model.arch atrc or atrc-fpm, not "
                f"{model.arch}; remove the label_context section"
            )
        self.bins = model.atrc_depth_bins
        self.out = Path(run.cfg.out)
        self.centroids = normal_centroids(model) if "normals" in run.tasks else None

    def bind(self, model: torch.nn.Module) -> None:
        """Take the normals' centroids from the model (its buffer, restored with every checkpoint) and keep a
        copy in the run folder (<run>/normal_clusters.json, the format of uda-normal-clusters)."""
        heads = [m for m in model.modules() if isinstance(m, ATRCHead) and hasattr(m, "normal_centroids")]
        if not heads:
            return
        self.centroids = heads[0].normal_centroids
        if PartialState().is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            record = {
                "centroids": [[float(x) for x in c] for c in self.centroids.tolist()],
                "source": self.run.cfg.model.normal_clusters or "fibonacci-sphere",
            }
            write_text_atomic(self.out / CENTROIDS_FILE, json.dumps(record, indent=1) + "\n")

    def labels(self, task: str, label: Tensor, size: Sequence[int]) -> Tensor:
        """A task's labels -> region ids [B,h,w] (long, 255 = ignored) at the aux resolution `size`."""
        label = resize_nearest(label, size)
        if task in ("semseg", "parts"):
            return label.long()
        if task == "depth":
            lo, hi = self.cfg.depth_range
            return depth_bins(label[:, 0], self.bins, lo, hi)
        if task == "normals":
            return normal_labels(label, self.centroids)
        if task in ("edges", "saliency"):
            binary = (label[:, 0] > 0.5).long()
            return torch.where(label[:, 0] == IGNORE, torch.full_like(binary, IGNORE), binary)
        raise ObjectiveError(f"no auxiliary label space for task {task!r}")

    def weighted_tasks(self, unlabelled: Mapping[int, frozenset[str]]) -> frozenset[str]:
        return frozenset(self.run.tasks) - unlabelled[0]  # tasks with source labels (and an aux head)

    def loss(self, step: Step) -> Terms | None:
        outputs, batch = step.outputs["source"], step.batch["source"]
        terms: dict[str, list[Tensor]] = {}
        logs: dict[str, Tensor] = {}
        for task, per in outputs.items():
            if AUX_KEY not in per or task not in batch:
                continue
            logits = per[AUX_KEY]
            target = self.labels(task, batch[task], logits.shape[-2:])
            if bool((target != IGNORE).any()):
                ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
            else:
                ce = logits.sum() * 0.0  # keeps the output in the graph
            terms[task] = [self.cfg.weight * ce]
            logs[f"loss/{task}/aux"] = ce.detach()
        return Terms(tasks=terms, logs=logs) if terms else None


__all__ = ["CENTROIDS_FILE", "LabelContext", "resize_nearest"]
