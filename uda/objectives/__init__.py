"""Training objectives the loop composes: supervised task losses, adversarial alignment, photometric
self-supervised depth, cross-task consistency, ATRC's label-context supervision and context-type search,
self-training with an EMA teacher. Each is one module with its config section; adding one is a new module, its
section in `uda.config` and a line in `OBJECTIVES`."""

from __future__ import annotations

from uda.objectives.adversarial import Adversarial
from uda.objectives.base import (
    DOMAINS,
    Objective,
    ObjectiveError,
    RunContext,
    Step,
    StreamNeeds,
    Terms,
    attach_prepared,
    attach_prepared_joint,
)
from uda.objectives.consistency import Consistency
from uda.objectives.context_search import ContextSearch
from uda.objectives.label_context import LabelContext
from uda.objectives.photometric import Photometric
from uda.objectives.self_training import SelfTraining
from uda.objectives.supervised import Supervised

# Composition order: networks are built (seeded initialisation) and loss terms summed in this order.
OBJECTIVES: tuple[type[Objective], ...] = (
    Supervised,
    LabelContext,
    ContextSearch,
    Photometric,
    Adversarial,
    Consistency,
    SelfTraining,
)


def build_objectives(run: RunContext) -> list[Objective]:
    """The objectives whose config section is set (a section that needs a target is skipped without one)."""
    objectives = []
    for cls in OBJECTIVES:
        section = getattr(run.cfg, cls.section)
        if section is None or (getattr(section, "NEEDS_TARGET", False) and not run.has_target):
            continue
        objectives.append(cls(run, section))
    return objectives


__all__ = [
    "DOMAINS",
    "OBJECTIVES",
    "Adversarial",
    "Consistency",
    "ContextSearch",
    "LabelContext",
    "Objective",
    "ObjectiveError",
    "Photometric",
    "RunContext",
    "SelfTraining",
    "Step",
    "StreamNeeds",
    "Supervised",
    "Terms",
    "attach_prepared",
    "attach_prepared_joint",
    "build_objectives",
]
