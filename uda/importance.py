"""Permutation feature importance of a model's blocks (ATRC §4.4, after Breiman's permutation importance).

The importance of a block is the drop in multi-task performance when its output is shuffled over the dataset:
for image i the block emits what it computes for image pi(i) (pi a random permutation of the split), every
other block and every input stays image i's. The drop is -Delta_m of the shuffled model against the intact
one (percent, one metric per task; positive = the model relies on the block), averaged over several
permutations. The shuffled output is obtained exactly, without storing a split's worth of features: each
batch is run once on the permuted images with the block's output captured, then on its own images with that
output substituted (two forward passes per batch and block).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from uda.metrics import multitask_delta


class OutputSwap:
    """Forward hooks on named blocks: `capture` records every block's output, `swap(key)` makes block `key`
    return the captured one instead of its own (shapes must agree); otherwise the blocks run untouched."""

    def __init__(self, blocks: Mapping[Hashable, nn.Module]) -> None:
        self.mode: str | None = None
        self.key: Hashable | None = None
        self.captured: dict[Hashable, Tensor] = {}
        self.handles = [block.register_forward_hook(self._hook(key)) for key, block in blocks.items()]

    def _hook(self, key: Hashable) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            if self.mode == "capture":
                self.captured[key] = output
            elif self.mode == "swap" and key == self.key:
                if key not in self.captured or self.captured[key].shape != output.shape:
                    raise RuntimeError(f"block {key}: no captured output of shape {tuple(output.shape)}")
                return self.captured[key]
            return None

        return hook

    def remove(self) -> None:
        """Detach the hooks (the blocks behave as before)."""
        for handle in self.handles:
            handle.remove()


def random_permutation(n: int, seed: int) -> list[int]:
    """A permutation of range(n) from `seed` (Python's RNG: the global torch RNG is left alone)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def shuffled_batches(
    model: nn.Module,
    swap: OutputSwap,
    key: Hashable,
    loader: Callable[[Dataset], DataLoader],
    dataset: Dataset,
    permutation: Sequence[int],
    device: torch.device | str,
) -> Iterator[Mapping[str, Any]]:
    """The split's batches, each preceded by a forward pass of the model on the permuted images that captures
    the blocks' outputs, with block `key` set to emit the captured output in the caller's next forward (the
    evaluation's). Runs inside the caller's no-grad evaluation loop."""
    from uda.data.loader import move_to

    for batch, permuted in zip(loader(dataset), loader(Subset(dataset, list(permutation)))):
        swap.mode = "capture"
        model(move_to(permuted["image"], device))
        swap.mode, swap.key = "swap", key
        yield batch
        swap.mode = None


def permutation_importance(
    model: nn.Module,
    blocks: Mapping[Hashable, nn.Module],
    dataset: Dataset,
    evaluate: Callable[[Any], dict[str, float]],
    loader: Callable[[Dataset], DataLoader],
    repeats: int = 3,
    seed: int = 0,
    keys: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Importance of every block of `blocks` (name -> module inside `model`).

    `evaluate(batches)` returns flat metrics for an iterable of batches (e.g. uda.evaluate.evaluate with the
    run's protocol); `loader(dataset)` batches a dataset in order. Returns {"intact": metrics, "keys": the
    metrics of Delta_m, "blocks": {name: {"drops": [percent per permutation], "mean", "std"}}}: drop = -Delta_m
    of the shuffled model vs the intact one over `keys` (default: each task's primary metric).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: need at least one permutation")
    if len(dataset) < 2:
        raise ValueError(f"the split has {len(dataset)} image(s); shuffling needs at least 2")
    swap = OutputSwap(blocks)
    try:
        intact = evaluate(loader(dataset))
        result: dict[str, Any] = {"intact": intact, "blocks": {}}
        for key in blocks:
            drops = []
            for r in range(repeats):
                if progress is not None:
                    progress(f"block {key}: permutation {r + 1}/{repeats}")
                permutation = random_permutation(len(dataset), seed + r)
                shuffled = evaluate(shuffled_batches(model, swap, key, loader, dataset, permutation, device))
                drops.append(-multitask_delta(shuffled, intact, keys))
            mean = sum(drops) / len(drops)
            std = math.sqrt(sum((d - mean) ** 2 for d in drops) / (len(drops) - 1)) if len(drops) > 1 else 0.0
            result["blocks"][key] = {"drops": drops, "mean": mean, "std": std}
        result["keys"] = list(keys) if keys is not None else None
        return result
    finally:
        swap.remove()


__all__ = ["OutputSwap", "permutation_importance", "random_permutation", "shuffled_batches"]
