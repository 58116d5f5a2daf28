"""Permutation feature importance of a trained ATRC model's CP blocks (ATRC §4.4, Fig. 6).

    uda-context-importance runs/nyudv2/atrc                      # the run's validation split, 3 permutations
    uda-context-importance RUN --repeats 5 --split val --data-root /data --out importance/

For each context pooling block (target task T, source task S) the block's output is shuffled over the split
(image i receives the block output of image pi(i); everything else stays image i's), the split is evaluated with
the run's own protocol (as uda-evaluate), and the drop in multi-task performance is recorded: -Delta_m of the
shuffled model against the intact one, in percent, over each task's primary metric. The mean (± std) over
--repeats permutations is the block's importance: how much the fitted model relies on source S when predicting
T. Evaluate on held-out data (the default: the run's validation split). Cost: 2 x blocks x repeats evaluations.

Writes <out>/importance.json (intact metrics, every permutation's drop), <out>/importance.md (the target x
source matrix) and <out>/importance.png (the matrix as a heat map); default <out> = <run>/context-importance.
A run whose model has no fixed CP blocks (another arch, or a search supernet: retrain its atrc_contexts.json
first) is an error. Errors print one line `error: ...` and exit 1 (usage errors 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from uda.commands.evaluate import DATASETS, positive  # standard library only: --help stays fast


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uda-context-importance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(in a clone without installing: python tools/context_importance.py ...)",
    )
    p.add_argument("run", type=Path, help="ATRC run folder (its newest checkpoint) or checkpoint folder")
    p.add_argument("--repeats", type=positive, default=3, help="permutations per block (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first permutation (default: 0)")
    p.add_argument(
        "--dataset", choices=DATASETS, default=None, help="dataset (default: the run's validation dataset)"
    )
    p.add_argument("--split", default=None, help="held-out split (default: the run's validation split)")
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding the dataset folders (default: the run's, else $UDA_DATA_ROOT or datasets/)",
    )
    p.add_argument("--batch-size", type=positive, default=None, help="batch size (default: the run's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/context-importance)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also UDA_DEBUG=1)")
    return p


def protocol_args(args: argparse.Namespace) -> argparse.Namespace:
    """The arguments uda-evaluate's protocol resolution reads: its own defaults (the run's protocol), with our
    dataset, split, data root and batch size where given."""
    from uda.commands.evaluate import parser as evaluate_parser

    resolved = evaluate_parser().parse_args([str(args.run)])
    resolved.dataset, resolved.split, resolved.data_root = args.dataset, args.split, args.data_root
    resolved.batch_size, resolved.num_workers = args.batch_size, 0
    return resolved


def matrix_markdown(tasks: list[str], blocks: dict[str, dict[str, Any]]) -> str:
    """Target (rows) x source (columns) table of mean ± std drops; '-' where the pair has no CP block."""
    lines = ["| target \\ source | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for t in tasks:
        cells = []
        for s in tasks:
            b = blocks.get(f"{t}<-{s}")
            cells.append("-" if b is None else f"{b['mean']:+.2f} ± {b['std']:.2f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heat_map(tasks: list[str], blocks: dict[str, dict[str, Any]], path: Path) -> Path:
    """The mean drops as a heat map PNG (rows targets, columns sources; grey where there is no block)."""
    import cv2
    import numpy as np

    n, cell, margin = len(tasks), 90, 80
    image = np.full((margin + n * cell + 10, margin + n * cell + 10, 3), 255, np.uint8)
    means = [b["mean"] for b in blocks.values()]
    top = max(1e-9, max(abs(m) for m in means)) if means else 1.0
    for i, t in enumerate(tasks):
        for j, s in enumerate(tasks):
            y, x = margin + i * cell, margin + j * cell
            b = blocks.get(f"{t}<-{s}")
            if b is None:
                colour = (200, 200, 200)
            else:
                level = np.uint8(round(255 * max(0.0, b["mean"]) / top))
                colour = tuple(
                    int(c) for c in cv2.applyColorMap(np.array([[level]]), cv2.COLORMAP_VIRIDIS)[0, 0]
                )
            cv2.rectangle(image, (x, y), (x + cell - 2, y + cell - 2), colour, -1)
            if b is not None:
                cv2.putText(
                    image, f"{b['mean']:+.1f}", (x + 8, y + cell // 2 + 5), 0, 0.5, (255, 255, 255), 2
                )
                cv2.putText(image, f"{b['mean']:+.1f}", (x + 8, y + cell // 2 + 5), 0, 0.5, (0, 0, 0), 1)
        cv2.putText(image, tasks[i][:8], (4, margin + i * cell + cell // 2), 0, 0.45, (0, 0, 0), 1)
        cv2.putText(image, tasks[i][:8], (margin + i * cell + 8, margin - 30), 0, 0.45, (0, 0, 0), 1)
    cv2.putText(image, "target \\ source: drop of Delta_m (%)", (4, 20), 0, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), image)
    return path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and write the importances; raises OSError / ValueError with one-line messages."""
    from dataclasses import replace

    import torch

    from uda.commands.evaluate import resolve
    from uda.data.labels import get_label_set
    from uda.data.loader import eval_loader
    from uda.data.streams import RunData
    from uda.evaluate import evaluate, find_checkpoint, load_trained_model
    from uda.importance import permutation_importance
    from uda.models.atrc import ATRCModule
    from uda.tasks import evaluated_tasks, output_space

    find_checkpoint(args.run)
    cfg, model, ckpt = load_trained_model(args.run)
    modules = [m for m in model.modules() if isinstance(m, ATRCModule)]
    if not modules or modules[0].search:
        what = "a context search supernet" if modules else f"model.arch={cfg.model.arch}"
        raise ValueError(
            f"{args.run}: {what} has no fixed CP blocks; run it on an ATRC run (--model atrc or atrc-fpm, "
            "with fixed or searched model.atrc_contexts)"
        )
    module = modules[0]
    blocks = {f"{t}<-{s}": module.cp[t][s] for t in module.cp for s in module.cp[t]}
    if not blocks:
        raise ValueError(
            f"{args.run}: every CP block of this ATRC model is 'none'; there is nothing to shuffle"
        )
    data, eval_cfg, domain, _ = resolve(cfg, protocol_args(args))
    tasks = evaluated_tasks(cfg)
    dataset = RunData(cfg, [[], []]).dataset(
        data, data.val_split, tasks, train=False, domain=domain, labels_native=eval_cfg.label_resolution
    )
    space = output_space(cfg, get_label_set(cfg.data.label_set).num_classes)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    eval_cfg = replace(eval_cfg, subset_classes=())  # Delta_m over the primary metrics alone
    out = args.out or Path(args.run) / "context-importance"

    def measure(batches) -> dict[str, float]:
        return evaluate(model, batches, tasks, eval_cfg, space, device=device)

    result = permutation_importance(
        model,
        blocks,
        dataset,
        measure,
        lambda d: eval_loader(d, data.batch_size),
        repeats=args.repeats,
        seed=args.seed,
        device=device,
        progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
    )
    result.update(
        checkpoint=str(ckpt),
        dataset=data.dataset,
        split=data.val_split,
        images=len(dataset),
        repeats=args.repeats,
        seed=args.seed,
        contexts=module.contexts,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "importance.json").write_text(json.dumps(result, indent=2) + "\n")
    order = list(module.tasks)
    table = matrix_markdown(order, result["blocks"])
    (out / "importance.md").write_text(
        f"# CP block importance: {cfg.name} ({ckpt})\n\nDrop of Delta_m (%) when the block's output is shuffled "
        f"over {data.dataset}/{data.val_split} ({len(dataset)} images), mean ± std over {args.repeats} "
        f"permutations; rows: target task, columns: source task.\n\n{table}\n\n![importance](importance.png)\n"
    )
    heat_map(order, result["blocks"], out / "importance.png")
    print(table)
    print(f"wrote {out / 'importance.md'}, {out / 'importance.json'} and {out / 'importance.png'}")
    return result


def main(argv: list[str] | None = None) -> int:
    """uda-context-importance: the exit code (0 done, 1 error, 2 usage error)."""
    args = parser().parse_args(argv)
    try:
        run(args)
    except (OSError, ValueError) as exc:
        if args.debug or os.environ.get("UDA_DEBUG", "") not in ("", "0"):
            raise
        from uda.cli import fail

        fail(exc, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
