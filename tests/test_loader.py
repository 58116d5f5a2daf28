"""Endless seeded loaders and source/target mixed batches, in one and two processes."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset

from uda.data.loader import EndlessSampler, MixedBatches, ShardedEval, eval_loader, train_loader


class Numbers(Dataset):
    """Sample i: an image filled with i plus a random draw (to see the per-sample seeding)."""

    def __init__(self, n: int, domain: int) -> None:
        self.n, self.domain = n, domain

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.full((3, 4, 4), float(i)),
            "noise": torch.rand(()),
            "domain": self.domain,
            "meta": {"id": str(i)},
        }


def take(stream, steps):
    return [next(stream) for _ in range(steps)]


def test_mixed_batches_counts_and_flags():
    mixed = MixedBatches(train_loader(Numbers(7, 0), 2, seed=1), train_loader(Numbers(5, 1), 3, seed=2))
    for batch in take(mixed, 6):
        assert batch["source"]["image"].shape[0] == 2 and batch["target"]["image"].shape[0] == 3
        assert batch["source"]["domain"].tolist() == [0, 0] and batch["target"]["domain"].tolist() == [
            1,
            1,
            1,
        ]
        assert [m["id"] for m in batch["source"]["meta"]] == [
            str(int(v)) for v in batch["source"]["image"][:, 0, 0, 0]
        ]


def test_every_pass_is_a_permutation_and_reshuffled():
    ids = [int(b["image"][0, 0, 0, 0]) for b in take(train_loader(Numbers(6, 0), 1, seed=3), 18)]
    passes = [ids[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(p) == list(range(6)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1


def test_resume_position_gives_identical_batches_and_augmentation():
    full = take(train_loader(Numbers(5, 0), 2, seed=4), 7)
    resumed = take(train_loader(Numbers(5, 0), 2, seed=4, start_step=4), 3)
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["noise"], b["noise"])
    with_workers = take(train_loader(Numbers(5, 0), 2, seed=4, num_workers=2), 7)
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(full, with_workers))


def test_process_shares_are_disjoint_and_cover_the_global_batch():
    single = iter(EndlessSampler(10, 4, seed=5))
    ranks = [iter(EndlessSampler(10, 2, seed=5, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        glob = [next(single) for _ in range(4)]
        parts = [next(ranks[0]), next(ranks[0]), next(ranks[1]), next(ranks[1])]
        assert glob == parts


def test_sharded_eval_sees_every_sample_once():
    seen = sorted(i for r in range(3) for i in ShardedEval(10, r, 3))
    assert seen == list(range(10))
    assert sum(b["image"].shape[0] for b in eval_loader(Numbers(5, 0), 2, rank=1, world_size=2)) == 2


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mixed = MixedBatches(
        train_loader(Numbers(9, 0), 2, 1, rank, world), train_loader(Numbers(9, 1), 2, 2, rank, world)
    )
    rows = []
    for batch in take(mixed, 3):
        rows.append(
            torch.cat(
                [
                    batch["source"]["image"][:, 0, 0, 0],
                    batch["target"]["image"][:, 0, 0, 0],
                    batch["source"]["domain"].float(),
                    batch["target"]["domain"].float(),
                ]
            )
        )
    mine = torch.stack(rows)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_split_each_global_batch(tmp_path):
    out = str(tmp_path / "g.pt")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    g = torch.load(out)  # [world, steps, 8]: source ids (2), target ids (2), flags
    single = MixedBatches(train_loader(Numbers(9, 0), 4, 1), train_loader(Numbers(9, 1), 4, 2))
    for step, batch in enumerate(take(single, 3)):
        src = torch.cat([g[0, step, 0:2], g[1, step, 0:2]])
        tgt = torch.cat([g[0, step, 2:4], g[1, step, 2:4]])
        assert torch.equal(src, batch["source"]["image"][:, 0, 0, 0])
        assert torch.equal(tgt, batch["target"]["image"][:, 0, 0, 0])
    assert (g[:, :, 4:6] == 0).all() and (g[:, :, 6:8] == 1).all()


def test_loading_a_sample_leaves_the_accelerator_rng_alone(monkeypatch):
    # Only the CPU generator is seeded per sample (and restored): reseeding the GPU's RNG at every batch would
    # make the training step's randomness (dropout, masks drawn on the GPU) depend on num_workers.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    cpu_state = torch.get_rng_state()
    batch = next(train_loader(Numbers(5, 0), 2, seed=4))
    assert reseeded == []
    assert torch.equal(torch.get_rng_state(), cpu_state)
    # Still seeded per sample: each sample's draw is the first of a generator seeded with its sample seed.
    sampler = iter(EndlessSampler(5, 2, seed=4))
    seeds = [next(sampler)[1] for _ in range(2)]
    expected = [torch.rand((), generator=torch.Generator().manual_seed(s)) for s in seeds]
    assert torch.equal(batch["noise"], torch.stack(expected))
