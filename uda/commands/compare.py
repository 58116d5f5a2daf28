"""Compare runs: mean +/- std over seeds of the main metrics, and the multi-task delta against STL runs.

Runs are grouped by their config name (recipe, variant, model); seeds of one group are averaged (a seed twice
in one group is an error: --group-by folder separates experiments that share a config name). Delta_T
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
Runs of one row, and a row and its baseline, must have been evaluated under the same protocol (split and its
subset, label set, resolution, depth cap, median scaling, aggregation, edge metric: the protocol metrics.json
records); a difference stops the table naming it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
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


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in `path`; anything else stops with one line naming the file and `fix`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # unreadable, or not JSON (e.g. a half-written or damaged file)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(f"error: {path}: not readable as JSON ({reason}); {fix}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path}: not a JSON object; {fix}")
    return data


def run_folder(path: Path, record: dict) -> Path:
    """The run folder whose config.json describes the metrics.json `record` in `path`: the folder itself, or for
    an evaluation folder uda-evaluate wrote (metrics.json and report.md only) its run: the folder above it (the
    default <run>/eval-<dataset>-<split>), else the run of the checkpoint its protocol names (--out elsewhere)."""
    if (path / "config.json").is_file() or (path.parent / "config.json").is_file():
        return path if (path / "config.json").is_file() else path.parent
    protocols = record.get("protocol")
    for used in protocols.values() if isinstance(protocols, dict) else ():
        checkpoint = used.get("checkpoint") if isinstance(used, dict) else None
        if isinstance(checkpoint, str) and (Path(checkpoint).parent.parent / "config.json").is_file():
            return Path(checkpoint).parent.parent  # <run>/checkpoints/step-*
    return path


# The entries of a metrics.json protocol that change the numbers: runs averaged into one row, and a row and its
# Delta_T baseline, must agree on each entry both of them record ("batches" absent: the whole split).
PROTOCOL_KEYS = (
    "dataset",
    "split",
    "label_set",
    "output_scale",
    "ground_truth_resolution",
    "depth_cap_m",
    "median_scaling",
    "aggregation",
    "edge_metric",
    "edge_max_dist",
    "size",
    "resize_to",
    "batches",
)


def protocol_differences(a: dict | None, b: dict | None) -> list[str]:
    """'key: a vs b' for each number-changing protocol entry (PROTOCOL_KEYS) the two protocols record differently;
    none when either has no protocol (older metrics.json)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return []
    defaults = {"batches": "whole split"}
    out = []
    for key in PROTOCOL_KEYS:
        if key in defaults or (key in a and key in b):
            va, vb = a.get(key, defaults.get(key)), b.get(key, defaults.get(key))
            if va != vb:
                out.append(f"{key}: {va} vs {vb}")
    return out


@dataclass
class Run:
    """One run's row material: config name, metrics of the chosen split, tasks, arch, seed, run folder and the
    protocol those metrics were evaluated under (None in older metrics.json)."""

    name: str
    metrics: dict
    tasks: list[str]
    arch: str
    seed: int | None
    folder: Path
    protocol: dict | None = None


def load_run(path: Path, split: str | None) -> Run:
    """One run folder, or an evaluation folder uda-evaluate wrote for a run (its config read from the run)."""
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        raise SystemExit(
            f"error: {metrics_file} not found; pass finished run folders (they hold config.json and "
            "metrics.json) or the eval-* folders uda-evaluate wrote into them"
        )
    again = "re-evaluate the run with uda-evaluate RUN and pass the RUN/eval-* folder it writes"
    record = read_json(metrics_file, again)
    results = record.get("results")
    if not isinstance(results, dict) or not results:
        raise SystemExit(f"error: {metrics_file} has no 'results' (not metrics written by uda); {again}")
    folder = run_folder(path, record)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SystemExit(
            f"error: {config_file} not found, nor a run's config.json above it or at the checkpoint its metrics "
            "name; pass finished run folders or the eval-* folders uda-evaluate wrote into them"
        )
    cfg = read_json(config_file, "the run's config is damaged; pass another run folder")
    chosen = split or ("target" if "target" in results else next(iter(results)))
    if chosen not in results:
        raise SystemExit(
            f"error: {metrics_file} has no split {chosen!r} (has {', '.join(results)}); use --split"
        )
    seed = cfg.get("train", {}).get("seed")
    protocols = record.get("protocol")
    used = protocols.get(chosen) if isinstance(protocols, dict) else None
    return Run(cfg["name"], results[chosen], cfg["tasks"], cfg["model"]["arch"], seed, folder, used)


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
        "runs",
        nargs="+",
        type=Path,
        help="finished run folders (config.json + metrics.json), or evaluation folders uda-evaluate wrote "
        "(RUN/eval-<dataset>-<split>: the run's config is read from RUN)",
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
    members: dict[str, list[tuple[Path, dict | None]]] = defaultdict(list)  # (run argument, protocol)
    info: dict[str, tuple[list[str], str]] = {}
    seeds: dict[tuple[str, int], Path] = {}
    for run in args.runs:
        loaded = load_run(run, args.split)
        name, metrics, seed = loaded.name, loaded.metrics, loaded.seed
        if args.group_by == "folder":
            name = re.sub(r"-s\d+$", "", loaded.folder.resolve().name)
        if is_legacy(metrics):
            print(
                f"warning: {run}/metrics.json uses the older metric definitions (depth/rmse per image, "
                f"normals/mean, edges/f1 differ); re-evaluate it (uda-evaluate {loaded.folder}) and pass the "
                "eval-* folder it writes instead",
                file=sys.stderr,
            )
        if seed is not None and (name, seed) in seeds:
            # Two runs of one seed are not two seeds: different experiments sharing a config name (or one run
            # passed twice), which averaging would pool into one row.
            fix = (
                "give their run folders distinct names"
                if args.group_by == "folder"
                else "pass --group-by folder to make each run folder (its -s<seed> dropped) its own row"
            )
            raise SystemExit(
                f"error: {seeds[name, seed]} and {run} are both {name!r} with train.seed {seed}; {fix}, or "
                "leave one out"
            )
        if seed is not None:
            seeds[name, seed] = run
        first = members[name][0] if members[name] else None
        if first is not None and (differ := protocol_differences(first[1], loaded.protocol)):
            # Averaging numbers of different protocols (e.g. one seed re-evaluated with another flag) is no mean.
            raise SystemExit(
                f"error: {first[0]} and {run} are both {name!r} but were evaluated differently "
                f"({'; '.join(differ)}); evaluate them alike (uda-evaluate with the same flags) or leave one out"
            )
        groups[name].append(metrics)
        members[name].append((run, loaded.protocol))
        info[name] = (loaded.tasks, loaded.arch)

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
            if missing := [t for t in tasks if t not in evaluated]:
                raise SystemExit(
                    f"error: {name}: --tasks {args.tasks} names {', '.join(missing)}, which its runs were not "
                    f"evaluated on (they have {', '.join(evaluated)}); pass --tasks among those"
                )
            if differ := protocol_differences(members[base][0][1], members[name][0][1]):
                # A relative difference between numbers of different protocols measures the protocol, not the model.
                raise SystemExit(
                    f"error: {name}: evaluated differently from its Delta_T baseline {base!r} "
                    f"({'; '.join(differ)}, baseline first); evaluate both alike (uda-evaluate with the same flags)"
                )
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
