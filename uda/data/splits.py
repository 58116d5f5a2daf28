"""Fixed train/val split files: made once from a seeded permutation, then read, never shuffled at run time."""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from uda.data.decode import DataError

SPLIT_SEED = 20221122


def split_ids(ids: Iterable[str], val_fraction: float = 0.2, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Split ids into disjoint, sorted 'train' and 'val' lists by a seeded permutation of the sorted ids.

    The result depends only on the set of ids, the fraction and the seed (not on listing order).
    """
    ordered = sorted(set(ids))
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    perm = list(ordered)
    random.Random(seed).shuffle(perm)
    n_val = max(1, round(len(perm) * val_fraction)) if len(perm) > 1 else 0
    val = sorted(perm[:n_val])
    train = sorted(perm[n_val:])
    return {"train": train, "val": val}


def write_split_files(folder: str | Path, splits: dict[str, Sequence[str]]) -> None:
    """Write one '<split>.txt' per split (one id per line) into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in splits.items():
        (folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))


def read_split_file(path: str | Path) -> list[str]:
    """Read a split file; a missing or empty file, or an id listed twice, is an error that names the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: split file not found; run `uda-make-splits` or check --data-root")
    first_line: dict[str, int] = {}  # id -> line number (from 1) where it is first listed
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        id = line.strip()
        if not id or line.startswith("#"):
            continue
        if id in first_line:
            # A repeated id would be drawn twice as often and counted twice by the metrics.
            raise DataError(
                f"{path}: line {number} repeats id {id!r} of line {first_line[id]}; list each id once "
                "(delete the line, or regenerate the file with `uda-make-splits`)"
            )
        first_line[id] = number
    ids = list(first_line)
    if not ids:
        raise DataError(f"{path}: split file is empty; regenerate it with `uda-make-splits`")
    return ids
