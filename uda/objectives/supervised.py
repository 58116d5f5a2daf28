"""The supervised multi-task objective: each task's loss on the labelled (source) samples, DenseMTL Eq. 6."""

from __future__ import annotations

import functools
from collections.abc import Mapping

from uda.config import LossConfig
from uda.losses import MultiTaskLoss
from uda.objectives.base import Objective, ObjectiveError, RunContext, Step, Terms
from uda.tasks import TASK_DEFS


class Supervised(Objective):
    """Per-task losses of the final and intermediate predictions against the source labels.

    The terms are attributed to their tasks, so the run's task weighting (`loss.weighting`) combines them;
    the loss of a task is chosen with `loss.functions` (e.g. depth:l1), its default is the paper's.
    """

    section = "loss"

    def __init__(self, run: RunContext, cfg: LossConfig) -> None:
        super().__init__(run, cfg)
        unknown = sorted(set(cfg.functions) - set(run.tasks))
        if unknown:
            raise ObjectiveError(f"loss.functions names tasks {unknown} this run does not have {run.tasks}")
        try:
            chosen = {t: TASK_DEFS[t].loss(cfg.functions.get(t)) for t in run.tasks}
        except ValueError as exc:
            raise ObjectiveError(f"loss.functions: {exc}") from None
        fns = {t: functools.partial(fn, space=run.space) for t, fn in chosen.items()}
        # Weights are the task weighting's business; the criterion only computes the terms.
        self.criterion = MultiTaskLoss(
            run.tasks,
            {t: 1.0 for t in run.tasks},
            d_far=run.space.d_far,
            intermediate_scales=run.intermediate_scales,
            loss_fns=fns,
            intermediate=cfg.intermediate,
        )

    def weighted_tasks(self, unlabelled: Mapping[int, frozenset[str]]) -> frozenset[str]:
        return frozenset(self.run.tasks) - unlabelled[0]  # the labelled tasks of the source stream

    def loss(self, step: Step) -> Terms:
        terms, zero, logs = self.criterion.task_terms(step.outputs["source"], step.batch["source"])
        # The zero keeps every output in the graph (see MultiTaskLoss).
        return Terms(tasks=terms, total=zero, logs=logs)
