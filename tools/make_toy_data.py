"""Render the built-in toy datasets (SYNTHIA-, Cityscapes- and VKITTI2-like) in their real on-disk formats.

    python tools/make_toy_data.py --out data/toy [--frames 240] [--height 256 --width 512] [--seed 0]
        [--domains synthia cityscapes vkitti2] [--workers K]

Writes DIR/synthia (RGB, GT/LABELS, Depth/Depth, splits), DIR/cityscapes (leftImg8bit, gtFine labelIds,
disparity, camera, leftImg8bit_sequence with the -1/0/+1 frames), DIR/vkitti2 (Scene*/clone/frames,
colors.txt, intrinsic.txt, extrinsic.txt, splits) and DIR/toy_info.json. Same seed and sizes give
bit-identical files.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.data.toy import TOY_DATASETS, domain_size, make_toy_data, nyudv2_size  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (an existing toy dataset there is replaced)"
    )
    parser.add_argument("--frames", type=int, default=240, help="labelled frames per domain (default 240)")
    parser.add_argument(
        "--height", type=int, default=256, help="Cityscapes (target) image height in pixels (default 256)"
    )
    parser.add_argument(
        "--width", type=int, default=512, help="Cityscapes (target) image width in pixels (default 512)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="scene seed; the same seed gives identical files (default 0)"
    )
    parser.add_argument(
        "--domains",
        nargs="+",
        choices=TOY_DATASETS,
        default=list(TOY_DATASETS),
        help="datasets to write (default: all; nyudv2 is the street renderer in the NYUDv2 layout)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: one per CPU core)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    sizes = ", ".join(
        f"{d} {'x'.join(map(str, nyudv2_size(args.height) if d == 'nyudv2' else domain_size(d, args.height, args.width)))}"
        for d in args.domains
    )
    print(f"toy data: {args.frames} labelled frames per domain ({sizes}) -> {args.out}")
    start = time.perf_counter()
    try:
        make_toy_data(
            args.out,
            args.frames,
            args.height,
            args.width,
            args.seed,
            args.domains,
            args.workers,
            not args.quiet,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
