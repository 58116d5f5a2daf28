"""Loaders: endless, seeded and resumable training streams, sharded evaluation, and source/target mixed batches.

Every training sample is augmented with a torch RNG seeded from (seed, epoch, position), so the stream of
batches depends only on the seed and the step: a run resumed at step k sees exactly the batches an
uninterrupted run sees, whatever the number of workers. Processes take disjoint slices of each permutation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


class SeededSamples(Dataset):
    """Wraps a dataset; item (index, sample_seed) returns dataset[index] drawn under torch.manual_seed(sample_seed)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = item
        state = torch.get_rng_state()
        # The CPU generator alone: torch.manual_seed would also reseed the accelerator's RNG, which is not
        # restored below, so with num_workers=0 the training step's own randomness (dropout, mixing masks on
        # the GPU) would be reseeded by every batch loaded and differ from a run with workers.
        torch.default_generator.manual_seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


class EndlessSampler(Sampler):
    """Yields (index, sample_seed) forever: a fresh permutation every pass, this process's share of each batch.

    The global batch of step t is positions [t*B*W, (t+1)*B*W) of the endless sequence of permutations
    (B per-process batch size, W processes); process r takes its contiguous B of them. `start_step` skips
    the first steps without loading anything, for resuming.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        draw: Callable[[int], int] | None = None,
    ) -> None:
        if size <= 0:
            raise ValueError("the training split is empty: check the split file and --data-root")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        # position -> index (e.g. rare-class sampling, uda.data.sampling) instead of the permutations
        self.draw = draw

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        global_batch = self.batch_size * self.world_size
        position = self.start_step * global_batch + self.rank * self.batch_size
        epoch, perm = -1, None
        while True:
            for offset in range(self.batch_size):
                pos = position + offset
                if self.draw is not None:
                    yield self.draw(pos), (self.seed * 1000003 + pos) % (2**63 - 1)
                    continue
                if pos // self.size != epoch:
                    epoch = pos // self.size
                    perm = self._permutation(epoch)
                yield int(perm[pos % self.size]), (self.seed * 1000003 + pos) % (2**63 - 1)
            position += global_batch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate sample dicts; `meta` stays a list of dicts (one per sample)."""
    batch = default_collate([{k: v for k, v in s.items() if k != "meta"} for s in samples])
    batch["meta"] = [s.get("meta", {}) for s in samples]
    return batch


def train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    draw: Callable[[int], int] | None = None,
) -> Iterator[dict[str, Any]]:
    """An endless iterator of training batches (this process's share), resumable at `start_step`; `draw`
    (stream position -> dataset index) replaces the per-pass permutations."""
    sampler = EndlessSampler(len(dataset), batch_size, seed, rank, world_size, start_step, draw)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededSamples(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: creating the iterator must not draw from the global RNG (exact resume).
        generator=torch.Generator().manual_seed(seed),
    )
    return iter(loader)


class ShardedEval(Sampler):
    """Indices rank, rank+W, rank+2W, ...: every evaluation sample is seen exactly once across processes."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def eval_loader(
    dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> DataLoader:
    """A finite loader over this process's share of an evaluation split (no padding, no duplicates)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardedEval(len(dataset), rank, world_size),  # type: ignore[arg-type]
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),  # leaves the global RNG (training state) untouched
    )


class MixedBatches:
    """Endless stream of mixed batches {"source": n_source samples, "target": n_target samples}.

    Each domain keeps its own loader, transform and image size; every sub-batch carries its `domain`
    flag (0 source, 1 target). Without a target stream it yields source-only batches (supervised MTL).
    """

    def __init__(
        self, source: Iterator[dict[str, Any]], target: Iterator[dict[str, Any]] | None = None
    ) -> None:
        self.source, self.target = source, target

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> dict[str, dict[str, Any]]:
        batch = {"source": next(self.source)}
        if self.target is not None:
            batch["target"] = next(self.target)
        return batch


def move_to(batch: Any, device: torch.device) -> Any:
    """Recursively move the tensors of a (nested) batch to a device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to(v, device) for v in batch]
    return batch
