"""Evaluate a trained run (or one checkpoint) on a dataset split; writes metrics.json, report.md and images.

    python tools/evaluate.py runs/synthia2cityscapes/mteb-s42 --dataset cityscapes --split val \
        [--label-set cityscapes16] [--median-scaling] [--label-resolution] [--size 512 1024] [--out O]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.data.labels import get_label_set  # noqa: E402
from uda.data.loader import eval_loader  # noqa: E402
from uda.data.readers import build_dataset  # noqa: E402
from uda.data.transforms import EvalTransform  # noqa: E402
from uda.evaluate import evaluate, load_trained_model, protocol, write_report  # noqa: E402
from uda.tasks import output_space  # noqa: E402
from uda.visualize import save_prediction_images  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "run", type=Path, help="run folder (its newest checkpoint is used) or checkpoint folder"
    )
    parser.add_argument("--dataset", required=True, choices=["synthia", "cityscapes", "vkitti2", "nyudv2"])
    parser.add_argument("--split", default="val", help="split to evaluate (default: val)")
    parser.add_argument(
        "--data-root", type=Path, default=None, help="the dataset folder (default: datasets/<dataset>)"
    )
    parser.add_argument(
        "--label-set", default=None, help="label set of the ground truth (default: the run's)"
    )
    parser.add_argument(
        "--median-scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-image median scaling of predicted depth (default: the run's eval.median_scaling)",
    )
    parser.add_argument(
        "--label-resolution",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare at the label files' native resolution, predictions upsampled (default: the run's "
        "eval.label_resolution)",
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size (default: the run's working size for that dataset)",
    )
    parser.add_argument(
        "--scale", type=int, default=None, help="output scale to evaluate (default: the run's eval.scale)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <run>/eval-<dataset>-<split>)"
    )
    args = parser.parse_args(argv)

    cfg, model, ckpt = load_trained_model(args.run)
    label_set = args.label_set or (
        cfg.target.label_set if cfg.target and cfg.target.dataset == args.dataset else cfg.data.label_set
    )
    data_cfg = cfg.target if cfg.target is not None and cfg.target.dataset == args.dataset else cfg.data
    size = tuple(args.size) if args.size else data_cfg.size
    root = args.data_root or (data_cfg.root if data_cfg.dataset == args.dataset else None)
    # The run's own protocol (eval section, depth parametrisation and range); a flag overrides one choice.
    flags = {
        "median_scaling": args.median_scaling,
        "label_resolution": args.label_resolution,
        "scale": args.scale,
    }
    eval_cfg = replace(cfg.eval, **{k: v for k, v in flags.items() if v is not None})
    # A source resized before its crop (e.g. VKITTI2 to 1696x512) is evaluated whole at that size, as in training.
    resize_to = None if args.size or data_cfg.dataset != args.dataset else data_cfg.resize_to
    dataset = build_dataset(
        args.dataset,
        args.split,
        tuple(cfg.tasks),
        label_set=label_set,
        root=root,
        transform=EvalTransform(size, keep_label_resolution=eval_cfg.label_resolution, resize_to=resize_to),
        variation=data_cfg.variation,
    )
    labels = get_label_set(label_set)
    out = args.out or Path(args.run) / f"eval-{args.dataset}-{args.split}"
    images: list[str] = []

    def write_images(batch, preds):
        paths = save_prediction_images(
            out / "images", f"{args.dataset}_{args.split}", batch, preds, cfg.tasks, labels
        )
        images.extend(str(p.relative_to(out)) for p in paths)

    results = evaluate(
        model,
        eval_loader(dataset, args.batch_size),
        tuple(cfg.tasks),
        eval_cfg,
        output_space(cfg, labels.num_classes),
        progress=True,
        on_first_batch=write_images,
    )
    name = f"{args.dataset}/{args.split}"
    used = protocol(eval_cfg, args.dataset, args.split, label_set, str(ckpt))
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in used.items()))
    report = write_report(
        out,
        f"{cfg.name} on {name}",
        {name: results},
        {name: used},
        class_names=labels.class_names,
        images=images,
    )
    for key, value in results.items():
        if "/iou/" not in key:
            print(f"{key:>24}: {value:.4f}")
    print(f"wrote {report} and {out / 'metrics.json'}")
    return results


if __name__ == "__main__":
    main()
