"""Parameters and multiply-adds of each model, optionally next to the numbers ATRC's Table 1 reports.

    uda-model-stats                                     # every arch on hrnetv2-w18-small, NYUD-v2 tasks
    uda-model-stats --archs stl mtl padnet --reference atrc-nyud --markdown stats.md
    uda-model-stats --backbone resnet50 --tasks SD --classes 16 --size 512 1024 --no-macs

Models are built with random weights (no download) and run once in evaluation mode on one random image of
--size. Multiply-adds (GMACs) are torch.utils.flop_counter's flops / 2 for one image: convolutions, matrix
products and attention; elementwise operations, normalisation and interpolation are not counted.

The default size, 416 x 576, stands in for ATRC's NYUD-v2 input: its code feeds 425 x 560 images (NYUD_MT, the
480 x 640 frames with their white border cropped), which timm's HRNet cannot take (its branches need a
multiple of 32); 416 x 576 gives feature maps of (nearly) the same area at strides 4 to 16. There the ATRC
rows with our parameter counts come out 1-2 % below the paper's multiply-adds (the task heads agree, the
backbone counts 2 % less); 480 x 640 gives +26 %, 448 x 576 +6 %, and 448 x 544 (2.4 % more pixels than
425 x 560) lands within 1 % by that offset.

Variant rows (e.g. atrc-local = arch atrc with model.atrc_contexts=local) are ATRC's fixed-context baselines;
plain "atrc" takes the default context (global). "atrc-searched" (ATRC's searched architecture) is counted with
the context search's JSON file given by --atrc-contexts (recipes/atrc_search.py writes <run>/atrc_contexts.json;
its tasks must be --tasks), n/a without one. The ATRC rows count 4.73 M (global, local) and 5.06 M (T-label, S-label: their
auxiliary heads) as the paper.

An arch that cannot be built on the backbone (e.g. 3ways-padnet needs a dilated ResNet) is listed as skipped
with the reason; one whose code is not in this version (an ImportError or an unknown exchange block) as
"n/a (not available)". Usage errors print one line `error: ...` and exit 2; an unexpected failure while
building or running a model is shown in its row and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from uda.config import Arch, Backbone  # standard library only: --help answers before torch is imported

ARCHS: tuple[str, ...] = get_args(Arch)
BACKBONES: tuple[str, ...] = get_args(Backbone)
TASK_LETTERS = {"S": "semseg", "D": "depth", "N": "normals", "E": "edges"}
DEFAULT_SIZE = (416, 576)

# Bruggemann et al., "Exploring Relational Context for Multi-Task Dense Prediction" (ATRC, ICCV 2021), Table 1:
# NYUD-v2, HRNetV2-W18-small backbone, four tasks (semseg 40 classes, depth, normals, edges); each row is
# (Params in M, MAdds in G). Our arch names: the single-task baseline is stl, the multi-task baseline mtl,
# "PAP" pap-net, "PAD-Net C / MTI-Net distillation" padnet on the multi-scale backbone.
REFERENCES: dict[str, dict[str, Any]] = {
    "atrc-nyud": {
        "source": "ATRC (Bruggemann et al., ICCV 2021) Table 1, NYUD-v2, HRNetV2-W18-small",
        "settings": {"backbone": "hrnetv2-w18-small", "tasks": "SDNE", "classes": 40},
        "rows": {
            "stl": (16.09, 40.93),
            "mtl": (4.52, 17.59),
            "cross-stitch": (4.52, 17.59),
            "pap-net": (4.54, 53.04),
            "padnet": (5.50, 32.42),
            # ATRC's fixed-context baselines (every CP block the same context) and the searched ATRC
            "atrc-global": (4.73, 21.43),
            "atrc-local": (4.73, 22.19),
            "atrc-tlabel": (5.06, 25.91),
            "atrc-slabel": (5.06, 25.91),
            "atrc-searched": (5.06, 25.76),
        },
    }
}

# Rows that are an arch with model keys set: name -> (arch, ModelConfig overrides); None = not buildable here.
VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    **{f"atrc-{c}": ("atrc", {"atrc_contexts": c}) for c in ("global", "local", "tlabel", "slabel")},
    "atrc-searched": None,  # needs the context-type search's JSON (model.atrc_contexts=<file>), not built here
}


class UsageError(Exception):
    """A command-line value that cannot be used (one line, exit 2)."""


# --------------------------------------------------------------------------- counting


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Flops of softmax(Q K^T) V for [B,H,Nq,D] queries and [B,H,Nk,D] keys / [B,H,Nk,Dv] values."""
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (d + dv)


def count_macs(forward) -> float:
    """Multiply-adds of one call of `forward` (no grad): FlopCounterMode's flops / 2. Its registry lacks the CPU
    flash-attention kernel that scaled_dot_product_attention takes on CPU, so that one is added here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_attention is not None:
        mapping[cpu_attention] = _attention_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with torch.no_grad(), counter:
        forward()
    return counter.get_total_flops() / 2


def count_params(model) -> dict[str, int]:
    """{"params", "backbone", "rest"}: all parameters, those of the encoder(s) (every model's
    param_groups()["backbone"]), and the others."""
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.param_groups()["backbone"])
    return {"params": total, "backbone": backbone, "rest": total - backbone}


def model_stats(
    arch: str,
    backbone: str,
    tasks: tuple[str, ...],
    classes: int,
    size: tuple[int, int] | None,
    atrc_contexts: str | None = None,
) -> dict[str, Any]:
    """One row: status "ok" with the parameter counts (and GMACs of one image of `size`, unless None),
    "skipped" (not buildable on the backbone), "n/a" (not in this version) or "error", with the reason.
    `arch` may name a VARIANTS row (an arch with model keys set); atrc-searched takes `atrc_contexts` (a
    context search's JSON file)."""
    import torch

    from uda.config import ModelConfig
    from uda.models import build_model
    from uda.tasks import task_channels

    row: dict[str, Any] = {"arch": arch}
    overrides: dict[str, Any] = {}
    if arch in VARIANTS:
        if VARIANTS[arch] is not None:
            arch, overrides = VARIANTS[arch]
        elif atrc_contexts is None:
            return row | {
                "status": "n/a",
                "reason": "not available (pass the context search's JSON file with --atrc-contexts)",
            }
        else:
            arch, overrides = "atrc", {"atrc_contexts": str(atrc_contexts)}
    cfg = ModelConfig(arch=arch, backbone=backbone, pretrained=False, **overrides)
    try:
        model = build_model(cfg, task_channels(tasks, classes))
    except (ImportError, KeyError) as exc:
        return row | {"status": "n/a", "reason": f"not available ({type(exc).__name__}: {one_line(exc)})"}
    except ValueError as exc:
        return row | {"status": "skipped", "reason": one_line(exc)}
    except Exception as exc:  # noqa: BLE001 - reported in the row, the others still run
        return row | {"status": "error", "reason": f"building: {type(exc).__name__}: {one_line(exc)}"}
    row |= {"status": "ok"} | count_params(model)
    if size is not None:
        model.eval()
        image = torch.rand(1, 3, *size)
        try:
            row["gmacs"] = count_macs(lambda: model(image)) / 1e9
        except Exception as exc:  # noqa: BLE001
            row |= {"status": "error", "reason": f"forward at {size[0]}x{size[1]}: {one_line(exc)}"}
    return row


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type where it has none)."""
    return " ".join(str(exc).strip("'\"").split()) or type(exc).__name__


# --------------------------------------------------------------------------- reference and table


def add_reference(row: dict[str, Any], reference: dict[str, Any]) -> None:
    """The reference's params / GMACs of the row's arch and our relative difference to them (%)."""
    ref = reference["rows"].get(row["arch"])
    if ref is None:
        return
    row["ref_params_m"], row["ref_gmacs"] = ref
    if "params" in row:
        row["params_diff_pct"] = 100 * (row["params"] / 1e6 / ref[0] - 1)
    if "gmacs" in row:
        row["gmacs_diff_pct"] = 100 * (row["gmacs"] / ref[1] - 1)


def _num(value: float | None, fmt: str = ".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def markdown(rows: list[dict[str, Any]], with_reference: bool) -> str:
    """The table of the built (and not available) archs, Markdown."""
    head = ["arch", "params (M)", "backbone (M)", "rest (M)", "GMACs"]
    if with_reference:
        head += ["ref params (M)", "Δ params (%)", "ref GMACs", "Δ GMACs (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] == "skipped":
            continue
        if r["status"] == "ok":
            cells = [r["arch"], *(_num(r[k] / 1e6, ".3f") for k in ("params", "backbone", "rest"))]
            cells.append(_num(r.get("gmacs")))
        else:
            label = "n/a (not available)" if r["status"] == "n/a" else "error"
            cells = [r["arch"], label, "", "", ""]
        if with_reference:
            cells += [
                _num(r.get("ref_params_m")),
                _pct(r.get("params_diff_pct")),
                _num(r.get("ref_gmacs")),
                _pct(r.get("gmacs_diff_pct")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(rows: list[dict[str, Any]], backbone: str) -> list[str]:
    """One line per arch not in the table as numbers: skipped, not available, failed."""
    out = []
    for r in rows:
        if r["status"] == "skipped":
            out.append(f"skipped {r['arch']} (cannot be built on {backbone}): {r['reason']}")
        elif r["status"] in ("n/a", "error"):
            out.append(f"{r['status']} {r['arch']}: {r['reason']}")
    return out


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uda-model-stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(in a clone without installing: python tools/model_stats.py ...)",
    )
    p.add_argument(
        "--archs",
        nargs="+",
        default=None,
        metavar="A",
        help=f"models (default: every arch that builds on the backbone, plus the reference's variant rows); "
        f"among {', '.join(ARCHS)}; variants {', '.join(VARIANTS)}",
    )
    p.add_argument(
        "--backbone",
        default="hrnetv2-w18-small",
        metavar="B",
        help=f"encoder (default: hrnetv2-w18-small); among {', '.join(BACKBONES)}",
    )
    p.add_argument(
        "--tasks",
        default="SDNE",
        help="task letters: S semseg, D depth, N normals, E edges (default: SDNE, NYUD-v2's four tasks)",
    )
    p.add_argument("--classes", type=int, default=40, help="semseg classes (default: 40, NYUD-v2)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=list(DEFAULT_SIZE),
        metavar=("H", "W"),
        help="input size of the multiply-add count (default: 416 576, ATRC's NYUD-v2 425x560 on a multiple of "
        "32; HRNet backbones need multiples of 32)",
    )
    p.add_argument(
        "--atrc-contexts",
        type=Path,
        default=None,
        metavar="FILE",
        help="the atrc_contexts.json of a context search (recipes/atrc_search.py): counts the atrc-searched row",
    )
    p.add_argument("--no-macs", action="store_true", help="only count parameters (fast)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and settings here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument(
        "--reference",
        default=None,
        metavar="NAME",
        help=f"add a published reference column and our difference to it; one of {', '.join(REFERENCES)}",
    )
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line (UsageError naming the valid choices)."""
    args = build_parser().parse_args(argv)
    if args.archs is not None:
        unknown = [a for a in args.archs if a not in ARCHS and a not in VARIANTS]
        if unknown:
            raise UsageError(
                f"unknown arch {', '.join(unknown)}; choose among {', '.join(ARCHS)} or the variants "
                f"{', '.join(VARIANTS)}"
            )
        args.archs = list(dict.fromkeys(args.archs))
    if args.backbone not in BACKBONES:
        raise UsageError(f"unknown backbone {args.backbone}; choose one of {', '.join(BACKBONES)}")
    letters = args.tasks.upper()
    if not letters or any(c not in TASK_LETTERS for c in letters) or len(set(letters)) != len(letters):
        raise UsageError(
            f"--tasks {args.tasks}: distinct letters among S (semseg), D (depth), N (normals), E (edges)"
        )
    args.task_names = tuple(TASK_LETTERS[c] for c in letters)
    if args.classes < 1:
        raise UsageError(f"--classes {args.classes}: must be >= 1")
    if min(args.size) < 1:
        raise UsageError(f"--size {args.size[0]} {args.size[1]}: must be >= 1")
    if args.reference is not None and args.reference not in REFERENCES:
        raise UsageError(f"unknown reference {args.reference}; choose one of {', '.join(REFERENCES)}")
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every requested arch's row (with the reference columns where asked), with a progress bar on stderr."""
    from tqdm import tqdm

    size = None if args.no_macs else tuple(args.size)
    reference = REFERENCES[args.reference] if args.reference else None
    variants = [v for v in VARIANTS if reference is not None and v in reference["rows"]]
    archs = args.archs or [*ARCHS, *variants]
    rows = []
    progress = tqdm(archs, desc="models", unit="arch", file=sys.stderr, leave=False)
    for arch in progress:
        progress.set_postfix_str(arch)
        row = model_stats(arch, args.backbone, args.task_names, args.classes, size, args.atrc_contexts)
        if reference is not None:
            add_reference(row, reference)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    """uda-model-stats: print (and write) the table; 2 on a usage error, 1 when a model failed unexpectedly."""
    try:
        args = parse(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import time

    start = time.perf_counter()
    rows = run(args)
    seconds = time.perf_counter() - start
    tasks = ",".join(args.task_names)
    macs = "no multiply-adds" if args.no_macs else f"GMACs of one {args.size[0]}x{args.size[1]} image"
    print(f"backbone {args.backbone}, tasks {tasks}, {args.classes} classes, {macs}; random weights")
    table = markdown(rows, args.reference is not None)
    print(table)
    for line in notes(rows, args.backbone):
        print(line)
    if args.reference:
        reference = REFERENCES[args.reference]
        print(f"reference: {reference['source']} (Params M / MAdds G)")
        wanted = reference["settings"]
        ours = {"backbone": args.backbone, "tasks": args.tasks.upper(), "classes": args.classes}
        differing = [f"{k} {ours[k]} (reference: {v})" for k, v in wanted.items() if ours[k] != v]
        if differing:
            print(f"note: the reference was measured with other settings: {'; '.join(differing)}")
    print(f"({len(rows)} archs in {seconds:.1f} s)")
    settings = {
        "backbone": args.backbone,
        "tasks": list(args.task_names),
        "classes": args.classes,
        "size": None if args.no_macs else list(args.size),
        "reference": args.reference,
    }
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
