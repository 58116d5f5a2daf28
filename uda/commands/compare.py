"""Compare runs: mean +/- std over seeds of the main metrics, and the multi-task delta against STL runs.

Runs are grouped by their config name (recipe, variant, model); seeds of one group are averaged. Delta_T
(paper Eq. from Vandenhende et al.) is computed per run against the mean of the baseline group: by default
the STL group of the same recipe and variant (STL-UDA for adaptation runs). The metric set is chosen with
--delta (uda.metrics.DELTA_SETS):
  primary  one metric per task, as DenseMTL, MTI-Net and ATRC: semseg/miou, parts/miou, saliency/maxf,
           normals/mean, edges/odsf (edges/f1 when odsF was not evaluated), depth/rmse (with per-image
           evaluation, sqrt of the mean per-image MSE);
  ctal     the same with depth/abs_rel (relative error) for depth, as CTAL;
  all      every headline metric of each task, as XTasC: semseg miou + pixel_acc, depth abs_err + abs_rel,
           normals mean, median and within 11.25/22.5/30, saliency maxf + miou, parts miou, edges.
A baseline run that lacks one of these metrics stops the table with a message naming it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

SHOWN = [
    "semseg/miou",
    "semseg/miou_subset",
    "depth/rmse",
    "depth/abs_rel",
    "normals/mean",
    "edges/f1",
    "edges/odsf",
    "parts/miou",
    "saliency/maxf",
]

# Keys only metrics.json files written before the headline metrics followed the authors' definitions hold;
# their depth/rmse (per image), normals/mean and edges/f1 mean something else.
LEGACY_KEYS = ("depth/rmse_of_mean_mse", "edges/f1_mean_bg_edge")


def is_legacy(metrics: dict) -> bool:
    """Whether a split's metrics predate the authors' definitions of the headline metrics."""
    pooled_normals_only = "normals/mean" in metrics and "normals/mean_pooled" not in metrics
    return pooled_normals_only or any(k in metrics for k in LEGACY_KEYS)


def load_run(path: Path, split: str | None) -> tuple[str, dict, list[str], str]:
    """(group name, metrics of the split, tasks, arch) of one run folder."""
    metrics_file, config_file = path / "metrics.json", path / "config.json"
    for f in (metrics_file, config_file):
        if not f.is_file():
            raise SystemExit(
                f"error: {f} not found; pass finished run folders (they hold config.json and metrics.json)"
            )
    results = json.loads(metrics_file.read_text())["results"]
    cfg = json.loads(config_file.read_text())
    chosen = split or ("target" if "target" in results else next(iter(results)))
    if chosen not in results:
        raise SystemExit(
            f"error: {metrics_file} has no split {chosen!r} (has {', '.join(results)}); use --split"
        )
    return cfg["name"], results[chosen], cfg["tasks"], cfg["model"]["arch"]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uda-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
        "  uda-compare runs/synthia2cityscapes/*-s* --split target --out table.md\n"
        "(in a clone without installing: python tools/compare.py ...)",
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="finished run folders (config.json + metrics.json)"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="which evaluated split (default: target if the run has one, else its first evaluated split)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="group name used as the Delta_T baseline (default: the STL group of the same recipe and variant)",
    )
    parser.add_argument(
        "--tasks",
        default=None,
        help="comma-separated tasks of a partial Delta_T, e.g. semseg,depth for Delta_SD of S-D-N runs "
        "(default: every task of each run)",
    )
    parser.add_argument(
        "--delta",
        choices=("primary", "ctal", "all"),
        default="primary",
        help="metric set of Delta_T: primary (one per task, MTI-Net/ATRC), ctal (depth relative error), "
        "all (every headline metric, XTasC) (default: primary)",
    )
    parser.add_argument(
        "--group-by",
        choices=("name", "folder"),
        default="name",
        help="what makes runs one row (their seeds): the config's name (e.g. synthia-mteb), or the run folder's "
        "name without a trailing -s<seed> (runs of one recipe and arch that differ in other keys, e.g. "
        "runs/atrc-global and runs/atrc-local) (default: name)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the table (Markdown) here (default: print only)"
    )
    return parser


def table(argv: list[str] | None = None) -> str:
    """Parse the command line, print the comparison table (Markdown) and return it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch: after parsing, so --help is fast
    from uda.metrics import DELTA_SETS, MissingBaselineError, delta_keys, multitask_delta

    known = DELTA_SETS[args.delta]
    if args.tasks and not set(args.tasks.split(",")) <= set(known):
        parser.error(f"--tasks {args.tasks}: choose among {', '.join(known)}")

    groups: dict[str, list[dict]] = defaultdict(list)
    info: dict[str, tuple[list[str], str]] = {}
    for run in args.runs:
        name, metrics, tasks, arch = load_run(run, args.split)
        if args.group_by == "folder":
            name = re.sub(r"-s\d+$", "", run.resolve().name)
        if is_legacy(metrics):
            print(
                f"warning: {run}/metrics.json uses the older metric definitions (depth/rmse per image, "
                "normals/mean, edges/f1 differ); re-evaluate it with uda-evaluate before comparing",
                file=sys.stderr,
            )
        groups[name].append(metrics)
        info[name] = (tasks, arch)

    def baseline_for(name: str) -> str | None:
        if args.baseline:
            return args.baseline
        # The group name ends with the arch, which may itself hold a dash (3ways-padnet).
        stem = name.removesuffix("-" + info[name][1])
        candidates = [g for g in groups if info[g][1] == "stl" and g.removesuffix("-stl") == stem]
        return candidates[0] if candidates else None

    columns = [k for k in SHOWN if any(k in m for runs in groups.values() for m in runs)]
    notes: list[str] = []
    lines = ["| run | seeds | " + " | ".join(columns) + " | Δ_T (%) |", "|---" * (len(columns) + 3) + "|"]
    for name, runs in sorted(groups.items()):
        cells = [
            mean_std([m[k] for m in runs if k in m]) if any(k in m for m in runs) else "–" for k in columns
        ]
        base = baseline_for(name)
        delta = "–"
        if base is not None and base in groups:
            # Tasks predicted in the front end only (MTI-Net's auxiliary tasks) have no metric to compare.
            evaluated = [t for t in info[name][0] if any(k.startswith(f"{t}/") for k in runs[0])]
            tasks = args.tasks.split(",") if args.tasks else [t for t in evaluated if t in known]
            keys = delta_keys(tasks, runs[0], args.delta)
            reference = {
                k: statistics.mean(m[k] for m in groups[base])
                for k in keys
                if all(k in m for m in groups[base])
            }
            try:
                delta = mean_std([multitask_delta(m, reference, keys, baseline_name=base) for m in runs])
            except MissingBaselineError as err:
                raise SystemExit(f"error: {name}: {err}") from None
        elif base is not None:
            notes.append(
                f"no Delta_T for {name}: the baseline group {base!r} is not among the runs; pass its run folders"
            )
        else:
            notes.append(
                f"no Delta_T for {name}: no STL run of the same recipe and variant among the runs; train it "
                "(the recipe with --model stl) and pass its folder, or name a baseline group with --baseline"
            )
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + f" | {delta} |")
    text = "\n".join(lines)
    print(text)
    for note in dict.fromkeys(notes):
        print(f"note: {note}", file=sys.stderr)
    if args.out:
        args.out.write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    """uda-compare: print (and with --out write) the table; a run folder without metrics stops it."""
    table(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
