"""Write the fixed 80/20 train/val split files of SYNTHIA RAND_CITYSCAPES or Virtual KITTI 2.

Cityscapes and NYUDv2 have official splits and need no split files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uda.data.labels import CATALOGUE_DIR
from uda.data.splits import SPLIT_SEED, split_ids, write_split_files

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
    """The ids found in a dataset folder (images only)."""
    if dataset == "synthia":
        return sorted(p.stem for p in (root / "RGB").glob("*.png"))
    return sorted(
        f"{p.parts[-6]}/{p.stem.split('_')[1]}"
        for p in root.glob(f"Scene*/{variation}/frames/rgb/Camera_0/rgb_*.jpg")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  python tools/make_splits.py synthia              # the shipped datasets/synthia/splits/\n"
        "  python tools/make_splits.py vkitti2 --root /data/vkitti2 --out /tmp/splits",
    )
    parser.add_argument("dataset", choices=("synthia", "vkitti2"))
    parser.add_argument(
        "--root", type=Path, help="dataset folder to list ids from (default: the full released id list)"
    )
    parser.add_argument(
        "--variation", default="clone", help="VKITTI2 variation folder listed with --root (default clone)"
    )
    parser.add_argument(
        "--out", type=Path, help="folder for train.txt / val.txt (default datasets/<dataset>/splits)"
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction of ids in val (default 0.2)"
    )
    parser.add_argument(
        "--seed", type=int, default=SPLIT_SEED, help=f"permutation seed (default {SPLIT_SEED})"
    )
    args = parser.parse_args(argv)

    ids = ids_on_disk(args.dataset, args.root, args.variation) if args.root else known_ids(args.dataset)
    if not ids:
        print(
            f"{args.root}: no {args.dataset} images found; check the folder layout (datasets/{args.dataset}/README.md)"
        )
        return 1
    splits = split_ids(ids, args.val_fraction, args.seed)
    out = args.out or CATALOGUE_DIR / args.dataset / "splits"
    write_split_files(out, splits)
    print(f"{out}: train {len(splits['train'])}, val {len(splits['val'])} ids (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
