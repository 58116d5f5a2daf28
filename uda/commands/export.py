"""Export a trained model to share: weights-only safetensors plus the model config, loadable in two lines.

    uda-export runs/synthia_mteb exported/synthia_mteb
    python tools/export.py runs/synthia_mteb/checkpoints/step-0040000 exported/synthia_mteb

Then, in Python:

    from uda.models import load_pretrained
    model = load_pretrained("exported/synthia_mteb")   # eval mode; model(images) -> {task: {scale: tensor}}

Only the multi-task model is exported (not the optimiser, discriminators or pose net: the checkpoint folder
keeps those, under their own names).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="uda-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="run folder (its newest complete checkpoint) or a checkpoint folder")
    parser.add_argument("out", help="folder to write model.safetensors and config.json into")
    parser.add_argument(
        "--statistics",
        choices=["target", "source"],
        default="target",
        help="a run with per-domain BatchNorm statistics (train.bn_mode=domain): export the target's (default, "
        "what its target evaluation used) or the source's",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Export; 0 on success, 1 with a one-line error."""
    args = parse_args(argv)  # before importing torch: --help answers at once
    from uda.models.pretrained import export_pretrained

    try:
        out = export_pretrained(args.run, args.out, args.statistics)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"exported {args.run} -> {out}/model.safetensors, {out}/config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
