"""Render the built-in toy datasets (SYNTHIA-, Cityscapes-, VKITTI2-, NYUDv2- and PASCAL-Context-like) in their real
on-disk formats.

Writes DIR/synthia (RGB, GT/LABELS, Depth/Depth, splits), DIR/cityscapes (leftImg8bit, gtFine labelIds,
disparity, camera, leftImg8bit_sequence with the -1/0/+1 frames), DIR/vkitti2 (Scene*/clone/frames,
colors.txt, intrinsic.txt, extrinsic.txt, splits), DIR/nyudv2, DIR/pascal_context (JPEGImages, semseg,
human_parts and pascal-context .mat files, sal_distill, normals_distill, json, ImageSets/Context) and
DIR/toy_info.json. DIR is then a data
root: pass it as --data-root to the recipes and tools. Same seed and sizes give bit-identical files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from uda.data.labels import DATASETS  # the toy data writes every dataset (uda.data.toy.TOY_DATASETS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uda-make-toy-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  uda-make-toy-data --out datasets/toy                    # what the recipes' --toy reads\n"
        "  uda-make-toy-data --out /tmp/toy --frames 8 --height 64 --width 128 --dataset synthia cityscapes\n"
        "(in a clone without installing: python tools/make_toy_data.py ...)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the data root to write (DIR/<dataset>/ for each dataset; an existing toy dataset there is replaced)",
    )
    parser.add_argument("--frames", type=int, default=240, help="labelled frames per dataset (default: 240)")
    parser.add_argument(
        "--height", type=int, default=256, help="Cityscapes (target) image height in pixels (default: 256)"
    )
    parser.add_argument(
        "--width", type=int, default=512, help="Cityscapes (target) image width in pixels (default: 512)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="scene seed; the same seed gives identical files (default: 0)"
    )
    parser.add_argument(
        "--dataset",
        nargs="+",
        choices=DATASETS,
        default=list(DATASETS),
        help=f"datasets to write (default: {' '.join(DATASETS)}; nyudv2 and pascal_context are the street renderer in their layouts)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: one per CPU core)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """uda-make-toy-data: render and write the toy datasets; exit status 2 on a bad option."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from uda.data.toy import make_toy_data
    from uda.data.toy.write import toy_size

    def size(d: str) -> str:
        return "x".join(map(str, toy_size(d, args.height, args.width)))

    try:
        sizes = ", ".join(f"{d} {size(d)}" for d in args.dataset)
        print(f"toy data: {args.frames} labelled frames per dataset ({sizes}) -> {args.out}")
        start = time.perf_counter()
        make_toy_data(
            args.out,
            args.frames,
            args.height,
            args.width,
            args.seed,
            args.dataset,
            args.workers,
            not args.quiet,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
