"""The objective interface: what the training loop composes.

An objective is built from its config section and the run's context. It owns its networks, optimisers and
state; the loop hands it the model once (`bind`), prepares its networks through accelerate, saves and
restores everything with the checkpoint, and at each step asks every objective for its loss terms (`loss`) and, after the model's
optimiser step, lets it run its own update (`update`). The loop knows no objective by name.

Networks come in three kinds:
- `joint_networks`: trained with the model by the model's optimiser (a pose net, task-transfer networks);
  their parameter groups come from `param_groups`.
- `own_networks`: trained by the objective's own optimiser in `update` (discriminators).
- `held_networks`: held and changed by the objective alone, without gradients or an optimiser (an EMA
  teacher, updated in `update`). The loop asks for them after `bind`, moves them to the device and never
  prepares them (no DDP wrapper: nothing to synchronise, every process updates its copy alike). Each is saved
  with every checkpoint as `<name>.safetensors` (hashed and checked like accelerate's files, see
  uda.checkpoint) and restored exactly on resume. Not through accelerate's `register_for_checkpointing`: its
  loader unpickles with weights_only=False, and no checkpoint file may run code when loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from uda.config import ExperimentConfig
from uda.tasks import OutputSpace

Outputs = dict[str, dict[int, Tensor]]
DOMAINS = ("source", "target")  # domain index 0, 1 -> batch key


class ObjectiveError(ValueError):
    """An objective's configuration that cannot work in this run (the message names the key and the fix)."""


@dataclass(frozen=True)
class RunContext:
    """What every objective may know about the run it is built for."""

    cfg: ExperimentConfig
    tasks: tuple[str, ...]
    channels: dict[str, int]  # output channels per task
    space: OutputSpace
    intermediate_scales: tuple[int, ...]  # scales with an intermediate (pre-exchange) prediction

    @property
    def has_target(self) -> bool:
        """Whether the run has a target domain."""
        return self.cfg.target is not None


@dataclass(frozen=True)
class StreamNeeds:
    """What an objective needs from one domain's training stream."""

    frames: tuple[int, ...] = ()  # neighbouring video frames to load with each sample
    unlabelled: frozenset[str] = (
        frozenset()
    )  # tasks whose labels this stream must not load (learnt otherwise)
    # How the stream draws its samples: (dataset, seed) -> (stream position -> dataset index), e.g. rare-class
    # sampling (uda.data.sampling); None = a fresh permutation every pass.
    sampling: Callable[[Any, int], Callable[[int], int]] | None = None


@dataclass
class Step:
    """One training step as objectives see it: the batch and the model's outputs per domain."""

    index: int  # 0-based step
    batch: Mapping[str, Mapping[str, Any]]  # "source" and, when a target stream exists, "target"
    outputs: dict[str, Outputs]  # domain -> outputs of the model update's forward
    accelerator: Accelerator
    model: nn.Module | None = (
        None  # the prepared model, for an objective's own forward passes (e.g. on mixed images)
    )

    @staticmethod
    def merge(steps: list[Step]) -> Step:
        """The micro-batch steps of one iteration (gradient accumulation) as one step over their concatenated
        batches and detached outputs: an objective's own update then sees the iteration's whole batch, as it
        would without accumulation."""
        if len(steps) == 1:
            return steps[0]
        first = steps[0]
        return Step(
            first.index,
            _concat([s.batch for s in steps]),
            _concat(
                [
                    {
                        d: {t: {k: o.detach() for k, o in per.items()} for t, per in out.items()}
                        for d, out in s.outputs.items()
                    }
                    for s in steps
                ]
            ),
            first.accelerator,
            first.model,
        )


def _concat(items: list) -> Any:
    """Concatenate equally structured batches along the batch: tensors by torch.cat, lists joined, dicts per
    key; anything else is taken from the first."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(items) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {k: _concat([item[k] for item in items]) for k in first}
    if isinstance(first, list):
        return [x for item in items for x in item]
    return first


@dataclass
class Terms:
    """An objective's contribution to the model loss.

    `tasks`: unweighted terms attributed to a task, combined by the run's task weighting with that task's
    other terms; `total`: a term added to the model loss as it is (its own weight applied); `logs`: detached
    values to log.
    """

    tasks: dict[str, list[Tensor]] = field(default_factory=dict)
    total: Tensor | None = None
    logs: dict[str, Tensor] = field(default_factory=dict)


class Objective:
    """Base class of the training objectives; every hook has a do-nothing default."""

    section: ClassVar[str]  # the ExperimentConfig section it is built from

    def __init__(self, run: RunContext, cfg: Any) -> None:
        self.run = run
        self.cfg = cfg

    # ------------------------------------------------------------------ what it needs and owns

    def bind(self, model: nn.Module) -> None:
        """Called once by the loop with the model (unwrapped, on its device) after it is built and prepared and
        before the objective's own networks are prepared: an objective that acts on the model's modules (ATRC's
        search) or builds networks from it (an EMA teacher) takes them here."""

    def needs(self, domain: int) -> StreamNeeds | None:
        """What it needs from domain `domain`'s training stream (0 source, 1 target); None = not used."""
        return None

    def joint_networks(self) -> dict[str, nn.Module]:
        """Attribute name -> network trained with the model (replaced by the prepared one)."""
        return {}

    def param_groups(self) -> list[dict]:
        """Optimiser groups ("params", "lr", "name") of the joint networks for the model's optimiser."""
        return []

    def held_networks(self) -> dict[str, nn.Module]:
        """Name -> network changed by the objective alone, without gradients or optimiser (e.g. an EMA teacher;
        asked after `bind`): moved to the device, never prepared, saved as `<name>.safetensors` in every
        checkpoint and restored on resume. Names must differ from the run's other checkpoint files."""
        return {}

    def weighted_tasks(self, unlabelled: Mapping[int, frozenset[str]]) -> frozenset[str]:
        """The tasks it attributes loss terms to (`Terms.tasks`), given the tasks whose labels no objective lets
        domain d's stream load (`unlabelled[d]`): a learnt task weighting balances these tasks."""
        return frozenset()

    def own_networks(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        """Attribute name -> (network, its optimiser) trained in `update` (replaced by the prepared ones; the
        optimiser is stored as `<name>_optimizer`)."""
        return {}

    # ------------------------------------------------------------------ one step

    def set_step(self, step: int) -> None:
        """Set schedules of its own optimisers for `step` (a function of the step alone, for exact resume)."""

    def loss(self, step: Step) -> Terms | None:
        """Its terms of the model loss at this step (None = nothing this step)."""
        return None

    def update(self, step: Step) -> dict[str, Tensor]:
        """Its own update after a finite model step (e.g. the discriminators); returns detached logs."""
        return {}

    # ------------------------------------------------------------------ checkpoint

    def checkpoint_state(self) -> dict:
        """JSON-serialisable state not held by its prepared networks and optimisers."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore `checkpoint_state`."""


def attach_prepared(objective: Objective, prepare) -> None:
    """Replace an objective's own networks and optimisers by their accelerate-prepared versions."""
    for name, (net, opt) in objective.own_networks().items():
        net, opt = prepare(net, opt)
        setattr(objective, name, net)
        setattr(objective, f"{name}_optimizer", opt)


def attach_prepared_joint(objective: Objective, prepare) -> None:
    """Replace an objective's joint networks by their accelerate-prepared versions."""
    for name, net in objective.joint_networks().items():
        setattr(objective, name, prepare(net))
