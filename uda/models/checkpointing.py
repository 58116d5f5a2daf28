"""Activation checkpointing of a model's heavy blocks, with BatchNorm statistics updated once per step.

torch.utils.checkpoint reruns a block's forward during the backward pass; a BatchNorm in training mode would
then move its running statistics a second time. Here the rerun sees momentum 0 (statistics unchanged, the
same batch statistics normalise), so a checkpointed step equals a plain one in outputs, gradients and buffers.
The state dict keeps its keys: the blocks are not wrapped, their forward is.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


class FrozenBatchNormStatistics:
    """BatchNorms of `module` normalise with the batch but leave running statistics and counters unchanged.

    Reusable: torch.utils.checkpoint enters one recomputation context per backward pass through the block, and
    a graph kept with retain_graph=True (GradNorm's per-task gradients, then the model's backward) is
    recomputed once per pass."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.saved: list[list[tuple]] = []  # a stack: one entry per open context

    def __enter__(self) -> None:
        self.saved.append([(m.momentum, m.num_batches_tracked.clone()) for m in self.norms])
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc) -> None:
        for m, (momentum, count) in zip(self.norms, self.saved.pop()):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def checkpoint_forward(module: nn.Module, method: str = "forward") -> None:
    """Run `module.<method>` under activation checkpointing while it trains with gradients (plain otherwise)."""
    plain = getattr(module, method)

    def run(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return plain(*args, **kwargs)
        contexts = lambda: (nullcontext(), FrozenBatchNormStatistics(module))  # noqa: E731
        return checkpoint(plain, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    setattr(module, method, run)


def enable_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> None:
    """Checkpoint every outermost module of `block_types` in `model` (a block inside a checkpointed one is not
    checkpointed again), and the methods a module lists in CHECKPOINT_METHODS (e.g. mTEB's per-task refinement:
    only each task's output is kept, the xTAMs and fusion inside are rerun one task at a time)."""
    done: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, block_types) and not any(name.startswith(f"{d}.") for d in done):
            checkpoint_forward(module)
            done.append(name)
        for method in getattr(module, "CHECKPOINT_METHODS", ()):
            checkpoint_forward(module, method)
