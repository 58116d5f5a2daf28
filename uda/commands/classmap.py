"""Print how a dataset's class ids map to a label set, or convert a label image with that mapping.

The mappings are the data files uda/catalogue/mappings/<dataset>__<label set>.json (shipped with the
package); dataset ids not listed there become 255 (ignore). Label images are decoded exactly as the dataset
readers decode them (SYNTHIA: 16-bit PNG, id in R; Cityscapes: labelIds PNG; VKITTI2: colour PNG; NYUDv2:
8-bit ids).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from uda.data.labels import DATASETS, available_label_sets, get_class_map


def mapping_table(dataset: str, label_set: str) -> str:
    """The mapping as text: dataset id, dataset class -> train id, train class, colour (one row per dataset id)."""
    cmap = get_class_map(dataset, label_set)
    labels = cmap.label_set
    rows = [f"{dataset} -> {label_set} ({labels.num_classes} classes, 255 = ignore)"]
    rows.append(f"{'id':>4}  {'dataset class':<22} -> {'train':>5}  {'train class':<16} colour")
    for dataset_id, name in zip(cmap.id_table.ids, cmap.id_table.names):
        train = cmap.mapping.get(dataset_id)
        if train is None:
            rows.append(f"{dataset_id:>4}  {name:<22} -> {255:>5}  {'ignore':<16} -")
        else:
            color = tuple(int(c) for c in labels.colors[train])
            rows.append(f"{dataset_id:>4}  {name:<22} -> {train:>5}  {labels.class_names[train]:<16} {color}")
    return "\n".join(rows)


def convert(dataset: str, label_set: str, src: Path, dst: Path, color: bool, colors_txt: Path | None) -> None:
    """Write dst: the train ids of label image src as an 8-bit PNG, or their colours with color=True."""
    import cv2  # the readers (and torch) load only when an image is converted
    import numpy as np

    from uda.data.decode import DataError
    from uda.data.readers import read_label_file

    cmap = get_class_map(dataset, label_set)
    try:
        train = cmap.apply(read_label_file(dataset, src, colors_txt))
    except DataError:
        raise
    except ValueError as e:
        raise DataError(f"{src}: {e}") from None
    out = cmap.label_set.colorize(train)[:, :, ::-1] if color else train
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(dst), np.ascontiguousarray(out)):
        raise DataError(f"{dst}: could not write the image; check the folder and the extension (.png)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uda-classmap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  uda-classmap --dataset synthia --label-set synthia16\n"
        "  uda-classmap --dataset cityscapes          # lists its label sets\n"
        "  uda-classmap --dataset cityscapes --label-set cityscapes16 \\\n"
        "      --convert aachen_000000_000019_gtFine_labelIds.png train_ids.png [--color]\n"
        "(in a clone without installing: python tools/classmap.py ...)",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset whose ids are mapped")
    parser.add_argument(
        "--label-set", help="target label set (default: none, list the label sets this dataset maps to)"
    )
    parser.add_argument(
        "--convert",
        nargs=2,
        type=Path,
        metavar=("IN", "OUT"),
        help="convert label image IN into OUT (PNG) (default: print the mapping instead)",
    )
    parser.add_argument(
        "--color", action="store_true", help="with --convert: write a colour visualisation, ignore = black"
    )
    parser.add_argument(
        "--colors-txt",
        type=Path,
        help="VKITTI2 only: the scene's colors.txt (default: the shipped uda/catalogue/classes/vkitti2.json)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """uda-classmap: print a class mapping or convert a label image; exit status 1 on a data error."""
    args = build_parser().parse_args(argv)
    if args.label_set is None:
        print(f"label sets for {args.dataset}: {', '.join(available_label_sets(args.dataset))}")
        return 0
    from uda.data.decode import DataError

    try:
        if args.convert:
            convert(args.dataset, args.label_set, *args.convert, args.color, args.colors_txt)
            print(f"wrote {args.convert[1]}")
        else:
            print(mapping_table(args.dataset, args.label_set))
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
