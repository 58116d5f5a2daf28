"""Write the fixed 80/20 train/val split files of SYNTHIA RAND_CITYSCAPES or Virtual KITTI 2.

By default the split is made over the full released id list (that is how the shipped split files,
uda/catalogue/<dataset>/splits/, were made); with --data-root, over the ids found on disk.
Cityscapes and NYUDv2 have official splits and need no split files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uda.data.labels import CATALOGUE_DIR
from uda.data.splits import SPLIT_SEED, split_ids, write_split_files

SPLIT_DATASETS = ("synthia", "vkitti2")
# The released datasets: SYNTHIA RAND_CITYSCAPES has frames 0000000..0009399; VKITTI2 (v2.0.3) numbers the
# frames of each scene from 00000.
SYNTHIA_NUM_FRAMES = 9400
VKITTI2_SCENE_FRAMES = {"Scene01": 447, "Scene02": 233, "Scene06": 270, "Scene18": 339, "Scene20": 837}


def known_ids(dataset: str) -> list[str]:
    """The ids of the full released dataset (SYNTHIA '0000000', VKITTI2 'Scene01/00000')."""
    if dataset == "synthia":
        return [f"{i:07d}" for i in range(SYNTHIA_NUM_FRAMES)]
    return [f"{scene}/{i:05d}" for scene, n in VKITTI2_SCENE_FRAMES.items() for i in range(n)]


def ids_on_disk(dataset: str, root: Path, variation: str = "clone") -> list[str]:
    """The ids found in a dataset's own folder (images only)."""
    if dataset == "synthia":
        return sorted(p.stem for p in (root / "RGB").glob("*.png"))
    return sorted(
        f"{p.parts[-6]}/{p.stem.split('_')[1]}"
        for p in root.glob(f"Scene*/{variation}/frames/rgb/Camera_0/rgb_*.jpg")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uda-make-splits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  uda-make-splits --dataset synthia            # the shipped uda/catalogue/synthia/splits/\n"
        "  uda-make-splits --dataset vkitti2 --data-root /data --out /tmp/splits   # ids of /data/vkitti2\n"
        "(in a clone without installing: python tools/make_splits.py ...)",
    )
    parser.add_argument("--dataset", required=True, choices=SPLIT_DATASETS, help="the dataset to split")
    parser.add_argument(
        "--data-root",
        type=Path,
        help="list the ids found on disk under this folder holding the dataset folders (D with D/vkitti2/ "
        "inside; the dataset folder itself is accepted with a note) (default: none, the full released id list)",
    )
    parser.add_argument(
        "--variation",
        default="clone",
        help="VKITTI2 variation folder listed with --data-root (default: clone)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for train.txt / val.txt (default: the shipped uda/catalogue/<dataset>/splits/)",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction of ids in val (default: 0.2)"
    )
    parser.add_argument(
        "--seed", type=int, default=SPLIT_SEED, help=f"permutation seed (default: {SPLIT_SEED})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """uda-make-splits: write train.txt and val.txt; exit status 1 if no ids were found."""
    args = build_parser().parse_args(argv)
    if args.data_root is None:
        ids = known_ids(args.dataset)
    else:
        from uda.data.decode import DataError
        from uda.data.roots import dataset_folder

        try:
            root = dataset_folder(args.data_root, args.dataset)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        ids = ids_on_disk(args.dataset, root, args.variation)
        if not ids:
            print(
                f"error: {root}: no {args.dataset} images found; check the folder layout "
                f"(datasets/{args.dataset}/README.md)",
                file=sys.stderr,
            )
            return 1
    splits = split_ids(ids, args.val_fraction, args.seed)
    out = args.out or CATALOGUE_DIR / args.dataset / "splits"
    write_split_files(out, splits)
    print(f"{out}: train {len(splits['train'])}, val {len(splits['val'])} ids (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
