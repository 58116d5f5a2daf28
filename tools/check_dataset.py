"""Check that a dataset folder has the layout and file formats the readers expect.

Loads every sample of the chosen splits with the dataset reader itself (same decoding, same checks) and
prints one line per problem: missing folder, image without label or depth, unknown class ids, wrong bit
depth, unreadable or truncated file, size mismatch, empty split. A sample with several problems reports
its first. Without problems it prints the sample count of each split. Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from tqdm import tqdm

from uda import TASKS
from uda.data.decode import DataError
from uda.data.labels import DATASETS
from uda.data.readers import build_dataset

# The tasks with ground-truth files (normals elsewhere are derived from depth, edges from labels).
FILE_TASKS = {
    "synthia": ("semseg", "depth"),
    "cityscapes": ("semseg", "depth"),
    "vkitti2": ("semseg", "depth"),
    "nyudv2": ("semseg", "depth", "normals", "edges"),
}


def check(
    dataset: str,
    root: Path,
    splits: list[str],
    tasks: list[str],
    label_set: str | None = None,
    frames: tuple[int, ...] = (),
    variation: str = "clone",
    limit: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, int], list[str]]:
    """Sample counts per split and the problems found (one line each)."""
    counts: dict[str, int] = {}
    problems: list[str] = []
    for split in splits:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # VKITTI2 says that scene ends lack frames; not a problem here
                ds = build_dataset(dataset, split, tasks, label_set, root, frames=frames, variation=variation)
        except (DataError, ValueError, FileNotFoundError) as e:
            problems.append(f"[{split}] {e}")
            continue
        n = len(ds) if limit is None else min(limit, len(ds))
        counts[split] = n
        for i in tqdm(
            range(n), desc=f"{dataset} {split}", unit="sample", disable=not progress, file=sys.stderr
        ):
            try:
                ds.load(i)
            except DataError as e:
                problems.append(f"[{split}] {e}")
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python tools/check_dataset.py cityscapes --root /data/cityscapes --split train val\n"
        "  python tools/check_dataset.py synthia --root datasets/synthia --tasks semseg --limit 100",
    )
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--root", type=Path, help="the dataset folder (default datasets/<dataset>)")
    parser.add_argument(
        "--split", nargs="+", default=["train", "val"], help="splits to check (default train val)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        help="tasks whose files to check (default: those with ground-truth files for the dataset)",
    )
    parser.add_argument(
        "--label-set", help="label set for the class-id check (default: the dataset's main set)"
    )
    parser.add_argument(
        "--frames", type=int, nargs="*", default=[], help="also check these frame offsets, e.g. -1 1"
    )
    parser.add_argument("--variation", default="clone", help="VKITTI2 variation folder (default clone)")
    parser.add_argument("--limit", type=int, help="check at most this many samples per split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    tasks = args.tasks or list(FILE_TASKS[args.dataset])
    counts, problems = check(
        args.dataset,
        args.root,
        args.split,
        tasks,
        args.label_set,
        tuple(args.frames),
        args.variation,
        args.limit,
        progress=not args.quiet,
    )
    for line in problems:
        print(line)
    for split, n in counts.items():
        print(f"{args.dataset} {split}: {n} samples checked ({', '.join(tasks)})")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
