"""Check that a dataset folder has the layout and file formats the readers expect.

Loads every sample of the chosen splits with the dataset reader itself (same decoding, same checks) and
prints one line per problem: missing folder, image without label or depth, unknown class ids, wrong bit
depth, unreadable or truncated file, size mismatch, empty split, an id listed twice or in both train and val.
A sample with several problems reports its first. Without problems it prints the sample count of each split.
Exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uda import TASKS
from uda.data.labels import DATASETS, DEFAULT_LABEL_SETS

# The tasks with ground-truth files (normals elsewhere are derived from depth, edges from labels; PASCAL-Context's
# edges come from its context label maps).
FILE_TASKS = {
    "synthia": ("semseg", "depth"),
    "cityscapes": ("semseg", "depth"),
    "vkitti2": ("semseg", "depth"),
    "nyudv2": ("semseg", "depth", "normals", "edges"),
    "pascal_context": ("semseg", "parts", "saliency", "normals", "edges"),
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
    """Sample counts per split and the problems found (one line each); root is the dataset's own folder."""
    import warnings

    from tqdm import tqdm

    from uda.data.decode import DataError
    from uda.data.readers import build_dataset

    counts: dict[str, int] = {}
    problems: list[str] = []
    for split in splits:
        try:
            with warnings.catch_warnings():
                # VKITTI2 says that scene ends lack frames; not a problem here
                warnings.simplefilter("ignore")
                ds = build_dataset(dataset, split, tasks, label_set, root, frames=frames, variation=variation)
        except (DataError, ValueError, FileNotFoundError) as e:
            # train/val sharing ids is one problem, found while reading either: report it once
            if not any(p.endswith(f"] {e}") for p in problems):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uda-check-dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  uda-check-dataset --dataset cityscapes --data-root /data --split train val   # reads /data/cityscapes\n"
        "  uda-check-dataset --dataset synthia --tasks semseg --limit 100              # reads datasets/synthia\n"
        "  uda-check-dataset --dataset pascal_context --data-root /data                # reads /data/pascal_context\n"
        "(in a clone without installing: python tools/check_dataset.py ...)",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset to check")
    parser.add_argument(
        "--data-root",
        type=Path,
        help="the folder holding the dataset folders, e.g. D with D/cityscapes/ inside (the dataset folder "
        "itself is accepted with a note) (default: $UDA_DATA_ROOT if set, else the clone's datasets/, "
        "or ./datasets outside a clone)",
    )
    parser.add_argument(
        "--split", nargs="+", default=["train", "val"], help="splits to check (default: train val)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=TASKS,
        help="tasks whose files to check (default: those with ground-truth files: "
        + "; ".join(f"{d} {' '.join(t)}" for d, t in FILE_TASKS.items())
        + ")",
    )
    parser.add_argument(
        "--label-set",
        help="label set for the class-id check (default: the dataset's main set: "
        + ", ".join(f"{d} {s}" for d, s in DEFAULT_LABEL_SETS.items())
        + ")",
    )
    parser.add_argument(
        "--frames",
        type=int,
        nargs="*",
        default=[],
        help="also check these frame offsets, e.g. -1 1 (default: none)",
    )
    parser.add_argument("--variation", default="clone", help="VKITTI2 variation folder (default: clone)")
    parser.add_argument("--limit", type=int, help="check at most this many samples per split (default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """uda-check-dataset: print the problems (or the sample counts); exit status 1 if anything was found."""
    args = build_parser().parse_args(argv)
    from uda.data.decode import DataError
    from uda.data.roots import dataset_folder

    try:
        root = dataset_folder(args.data_root, args.dataset)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    tasks = args.tasks or list(FILE_TASKS[args.dataset])
    counts, problems = check(
        args.dataset,
        root,
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
