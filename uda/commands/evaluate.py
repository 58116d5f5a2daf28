"""Evaluate a trained run (or one of its checkpoints) on a dataset split: metrics.json, report.md, images.

The protocol (dataset, split, label set, input size, depth cap, median scaling, label resolution, output scale)
is the run's own, read from the config saved with its checkpoint; a flag overrides one choice. The protocol
used is printed on one line, each value set by a flag marked "(flag)", and written with the metrics.

    uda-evaluate runs/synthia2cityscapes/mteb-s42                  # the run's target split, the run's protocol
    uda-evaluate RUN --dataset cityscapes --split val --no-median-scaling --data-root /data
    accelerate launch --num_processes 4 -m uda.commands.evaluate RUN   # several processes (GPUs)

Runs on the GPU when there is one (through accelerate); several processes share the split without
duplicating a sample, and their metrics are summed before the ratios are taken, so the numbers equal one
process's. Errors print one line `error: ...` and exit 1 (usage errors 2); --debug or UDA_DEBUG=1 shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# Only the standard library above this line: `--help` and usage errors answer before torch is imported.

DATASETS = ("synthia", "cityscapes", "vkitti2", "nyudv2", "pascal_context")
PRECISIONS = ("auto", "no", "fp16", "bf16")


def positive(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line; every protocol option defaults to the run's own choice (None here)."""
    p = argparse.ArgumentParser(
        prog="uda-evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run", type=Path, help="run folder (its newest complete checkpoint is used) or checkpoint folder"
    )
    g = p.add_argument_group("protocol (each defaults to the run's own; a flag overrides that one choice)")
    g.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="dataset to evaluate on (default: the run's target dataset if it has one, else its data.dataset)",
    )
    g.add_argument(
        "--split",
        default=None,
        help="split (default: the split the run validated on for that dataset, its val_split; else val)",
    )
    g.add_argument(
        "--label-set",
        default=None,
        help="label set of the ground truth (default: the run's label set for that dataset)",
    )
    g.add_argument(
        "--size",
        type=positive,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size; images are resized straight to it (default: the run's working size for that dataset, "
        "and its resize_to where set, e.g. VKITTI2 evaluated whole at 512x1696)",
    )
    g.add_argument(
        "--median-scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="per-image median scaling of predicted depth (default: the run's eval.median_scaling; off on the "
        "source dataset of an adaptation run, as its validation)",
    )
    g.add_argument(
        "--min-depth", type=float, default=None, help="depth cap, metres (default: eval.min_depth)"
    )
    g.add_argument(
        "--max-depth", type=float, default=None, help="depth cap, metres (default: eval.max_depth)"
    )
    g.add_argument(
        "--label-resolution",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compare at the label files' native resolution, predictions upsampled (default: the run's "
        "eval.label_resolution)",
    )
    g.add_argument("--scale", type=int, default=None, help="output scale to evaluate (default: eval.scale)")
    g.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding the dataset folders (e.g. datasets/ with datasets/cityscapes/ inside; default: "
        "the dataset folder stored in the run's config, else $UDA_DATA_ROOT or datasets/)",
    )
    r = p.add_argument_group("running (no effect on the numbers beyond floating-point rounding)")
    r.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default=None,
        help="autocast precision (default: the run's train.mixed_precision, as its validation ran; auto = bf16 "
        "on GPUs and CPUs with AMX-BF16, fp16 on older GPUs, else fp32)",
    )
    r.add_argument(
        "--batch-size", type=positive, default=None, help="batch size per process (default: the run's)"
    )
    r.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="data-loading worker processes per process (default: the run's data.num_workers)",
    )
    r.add_argument(
        "--out", type=Path, default=None, help="output folder (default: <run>/eval-<dataset>-<split>)"
    )
    r.add_argument("--no-images", action="store_true", help="do not write prediction images")
    r.add_argument("--debug", action="store_true", help="show the traceback of an error (also UDA_DEBUG=1)")
    return p


def metrics(argv: list[str] | None = None) -> dict:
    """Parse, evaluate and write the report (main process); the metrics, equal on every process. An error
    exits 1 with one line on stderr (a usage error 2)."""
    args = parser().parse_args(argv)
    if args.num_workers is not None and args.num_workers < 0:
        parser().error(f"--num-workers: {args.num_workers} is not >= 0")
    try:
        return run(args)
    except (OSError, ValueError) as exc:  # DataError, ConfigError, damaged or missing checkpoints, paths
        if args.debug or os.environ.get("UDA_DEBUG", "") not in ("", "0"):
            raise
        from uda.cli import fail

        fail(exc, 1)


def main(argv: list[str] | None = None) -> int:
    """uda-evaluate: evaluate and report; the exit code (metrics() returns the numbers)."""
    metrics(argv)
    return 0


def run_data(cfg: Any, dataset: str) -> tuple[Any, int, bool]:
    """(the run's DataConfig for `dataset`, its domain, whether the run knows it): the target's or the data's
    section; for another dataset a section with the run's label set and working size and no stored root."""
    from dataclasses import replace

    from uda.config import DataConfig

    if cfg.target is not None and cfg.target.dataset == dataset:
        return cfg.target, 1, True
    if cfg.data.dataset == dataset:
        return cfg.data, 0, True
    base = cfg.target or cfg.data
    fresh = DataConfig(dataset=dataset, label_set=base.label_set, size=base.size, root=None)
    return (
        replace(fresh, batch_size=base.batch_size, num_workers=base.num_workers),
        1 if cfg.target else 0,
        False,
    )


def resolve(cfg: Any, args: argparse.Namespace) -> tuple[Any, Any, int, set[str]]:
    """(data section, eval section, domain, names of the protocol entries set by a flag): the run's protocol
    for the chosen dataset with each given flag applied."""
    from dataclasses import replace

    from uda.data.roots import dataset_folder

    dataset = args.dataset or (cfg.target or cfg.data).dataset
    data, domain, known = run_data(cfg, dataset)
    flagged: set[str] = set()
    changes: dict[str, Any] = {}
    if args.dataset is not None:
        flagged.add("dataset")
    if args.split is not None:
        changes["val_split"] = args.split
        flagged.add("split")
    if args.label_set is not None:
        changes["label_set"] = args.label_set
        flagged.add("label_set")
    if args.size is not None:
        # A given size is the evaluation size itself: no resize before it.
        changes.update(size=tuple(args.size), resize_to=None)
        flagged |= {"size", "resize_to"}
    if args.data_root is not None:
        changes["root"] = str(dataset_folder(args.data_root, dataset))
        flagged.add("data_root")
    elif data.root is None:
        changes["root"] = str(dataset_folder(None, dataset))
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    if args.num_workers is not None:
        changes["num_workers"] = args.num_workers
    if not known and "val_split" not in changes:
        changes["val_split"] = "val"
    data = replace(data, **changes)

    eval_cfg = cfg.eval
    if cfg.target is not None and domain == 0 and cfg.target.dataset != dataset:
        # The run's validation measured its source without median scaling (its absolute scale is supervised).
        eval_cfg = replace(eval_cfg, median_scaling=False)
    overrides = {
        "median_scaling": (args.median_scaling, "median_scaling"),
        "min_depth": (args.min_depth, "depth_cap_m"),
        "max_depth": (args.max_depth, "depth_cap_m"),
        "label_resolution": (args.label_resolution, "ground_truth_resolution"),
        "scale": (args.scale, "output_scale"),
    }
    for key, (value, entry) in overrides.items():
        if value is not None:
            eval_cfg = replace(eval_cfg, **{key: value})
            flagged.add(entry)
    if not 0 <= eval_cfg.min_depth < eval_cfg.max_depth:
        raise ValueError(
            f"depth cap [{eval_cfg.min_depth}, {eval_cfg.max_depth}] m is empty; "
            "pass --min-depth below --max-depth"
        )
    return data, eval_cfg, domain, flagged


def protocol_line(used: dict[str, Any], flagged: set[str]) -> str:
    """`protocol: key=value, ...` with every value a flag set marked "(flag)"."""
    return "protocol: " + ", ".join(
        f"{k}={v}{' (flag)' if k in flagged else ''}" for k, v in used.items() if k != "set_by_flags"
    )


def run(args: argparse.Namespace) -> dict:
    """Evaluate as `args` say (see main); raises OSError / ValueError with one-line messages."""
    from dataclasses import replace

    from uda.data.labels import get_label_set
    from uda.data.loader import eval_loader
    from uda.data.streams import RunData
    from uda.evaluate import evaluate, find_checkpoint, load_trained_model, protocol, write_report
    from uda.hardware import make_accelerator
    from uda.tasks import evaluated_tasks, output_space
    from uda.visualize import save_prediction_images

    find_checkpoint(args.run)  # a missing run or checkpoint fails before the data is looked at
    cfg, model, ckpt = load_trained_model(args.run)
    data, eval_cfg, domain, flagged = resolve(cfg, args)
    tasks = evaluated_tasks(cfg)  # front-end-only tasks (model.aux_tasks) have no final prediction
    dataset = RunData(cfg, [[], []]).dataset(
        data, data.val_split, tasks, train=False, domain=domain, labels_native=eval_cfg.label_resolution
    )
    if len(dataset) == 0:
        raise ValueError(
            f"{data.root}: split {data.val_split!r} of {data.dataset} is empty; choose another --split"
        )
    labels = get_label_set(data.label_set)
    space = output_space(cfg, get_label_set(cfg.data.label_set).num_classes)
    if "semseg" in tasks and labels.num_classes != space.num_classes:
        raise ValueError(
            f"label set {data.label_set} has {labels.num_classes} classes, the model predicts {space.num_classes} "
            f"({cfg.data.label_set}); pass --label-set with a {space.num_classes}-class set of {data.dataset}"
        )
    out = args.out or Path(args.run) / f"eval-{data.dataset}-{data.val_split}"

    precision = args.mixed_precision or cfg.train.mixed_precision
    if args.mixed_precision is not None:
        flagged.add("mixed_precision")
    # No trackers: an evaluation logs to its report, and needs none of the run's logging packages installed.
    acc = make_accelerator(
        replace(cfg.train, mixed_precision=precision, compile=False, log_with="none"), str(out)
    )
    # Evaluation only: autocast and the device, no DDP wrapper (there is no gradient to synchronise).
    model = acc.prepare_model(model, evaluation_mode=True)
    # Each process reads its own share of the split (no padding, so no sample counts twice); the metric
    # sums are reduced across processes at the end, as in the training loop's validation.
    loader = eval_loader(dataset, data.batch_size, acc.process_index, acc.num_processes, data.num_workers)

    used = protocol(eval_cfg, data.dataset, data.val_split, data.label_set, str(ckpt))
    used.update(
        size=list(data.size),
        resize_to=list(data.resize_to) if data.resize_to else None,
        fit=data.fit,
        data_root=data.root,
        mixed_precision=acc.mixed_precision,
        processes=acc.num_processes,
    )
    used["set_by_flags"] = sorted(flagged)
    if acc.is_main_process:
        print(protocol_line(used, flagged), flush=True)

    images: list[str] = []

    def write_images(batch, preds) -> None:
        if acc.is_main_process and not args.no_images:
            paths = save_prediction_images(
                out / "images", f"{data.dataset}_{data.val_split}", batch, preds, tasks, labels
            )
            images.extend(str(p.relative_to(out)) for p in paths)

    results = evaluate(
        model,
        loader,
        tasks,
        eval_cfg,
        space,
        reduce=(lambda s: acc.reduce(s, "sum")) if acc.num_processes > 1 else None,
        device=acc.device,
        progress=acc.is_main_process,
        on_first_batch=write_images,
        domain=domain,
        dataset=data.dataset,
    )
    if acc.is_main_process:
        name = f"{data.dataset}/{data.val_split}"
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
    acc.wait_for_everyone()
    return results


if __name__ == "__main__":
    sys.exit(main())
