"""Speed and memory of the models: one training step (forward, multi-task loss, backward, Adam) per arch.

    python tools/benchmark.py [--archs mtl mteb 3ways-padnet padnet stl] [--backbone resnet101]
                              [--size 512 1024] [--batch 2] [--tasks SD] [--steps 10] [--device cuda]
                              [--amp bf16] [--decoder deeplab] [--json out.json] [--check]
    python tools/benchmark.py --params [--backbone resnet101] [--tasks SD] [--json out.json]

Prints ms per step, images per second, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: peak
resident set size of the process) and parameter count. `--check` enforces the targets below and exits
non-zero when one is missed, so a slowdown shows up as a failing command, not as a flaky timed test.
`--params` only counts parameters (no timing; CPU, under a minute): stl and mtl with both task decoders
(3-ways, DeepLab head) and mteb, 3ways-padnet, padnet, split into encoder (backbone) and the rest.

Targets (relative, so they hold on any machine): a model with the mTEB exchange block may take at most 3x
the step time and 1.5x the peak GPU memory of the plain MTL model with the same encoder and decoders. mTEB is
not small in compute: at scale 1 each direction runs a 3x3 extractor and two 3x3 self-attention convolutions
on 128-channel half-resolution maps, comparable to a decoder stage; its attention runs through
scaled_dot_product_attention, so memory stays linear in the number of tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda.cli import TASK_SETS  # noqa: E402
from uda.config import ModelConfig  # noqa: E402
from uda.losses import MultiTaskLoss, default_task_weights  # noqa: E402
from uda.models import build_model  # noqa: E402
from uda.models.multitask import DEEPLAB_ARCHS, intermediate_scales  # noqa: E402

MAX_TIME_RATIO = 3.0
MAX_MEMORY_RATIO = 1.5
CLASSES = 16  # semseg classes of the benchmark models (the paper's 16-class Synthia/Cityscapes set)
# (arch, decoder) pairs whose parameters --params counts.
PARAM_MODELS = [
    ("stl", "3ways"),
    ("stl", "deeplab"),
    ("mtl", "3ways"),
    ("mtl", "deeplab"),
    ("mteb", "3ways"),
    ("3ways-padnet", "3ways"),
    ("padnet", "3ways"),
]


def task_channels(tasks) -> dict[str, int]:
    """Output channels of each benchmark task."""
    return {t: {"semseg": CLASSES, "depth": 1, "normals": 3, "edges": 1}[t] for t in tasks}


def count_params(arch: str, decoder: str, args: argparse.Namespace) -> dict:
    """Parameter counts (total, encoder, rest) of one randomly initialised model."""
    cfg = ModelConfig(arch=arch, decoder=decoder, backbone=args.backbone, pretrained=False)
    groups = build_model(cfg, task_channels(TASK_SETS[args.tasks])).param_groups()
    backbone, rest = (sum(p.numel() for p in groups[g]) for g in ("backbone", "decoder"))
    return {
        "arch": arch,
        "decoder": decoder,
        "params": backbone + rest,
        "backbone": backbone,
        "decoder_params": rest,
    }


def synthetic_batch(tasks, batch: int, size: tuple[int, int], classes: int, device) -> dict:
    """Random inputs and labels of the sample contract's shapes and units."""
    h, w = size
    out = {"image": torch.rand(batch, 3, h, w, device=device)}
    if "semseg" in tasks:
        out["semseg"] = torch.randint(0, classes, (batch, h, w), device=device)
    if "depth" in tasks:
        out["depth"] = torch.rand(batch, 1, h, w, device=device) * 79 + 1
    if "normals" in tasks:
        out["normals"] = torch.nn.functional.normalize(torch.randn(batch, 3, h, w, device=device), dim=1)
    if "edges" in tasks:
        out["edges"] = (torch.rand(batch, 1, h, w, device=device) > 0.9).float()
    return out


def bench(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Time `args.steps` training steps of one architecture after `args.warmup` warm-up steps."""
    tasks = TASK_SETS[args.tasks]
    decoder = args.decoder if arch in DEEPLAB_ARCHS else "3ways"  # the other archs have their own decoder
    cfg = ModelConfig(arch=arch, decoder=decoder, backbone=args.backbone, pretrained=False)
    model = build_model(cfg, task_channels(tasks))
    model.to(device).train()
    criterion = MultiTaskLoss(
        tasks, default_task_weights(tasks), intermediate_scales=intermediate_scales(cfg)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = synthetic_batch(tasks, args.batch, tuple(args.size), CLASSES, device)
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = criterion(model(batch["image"]), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = (time.perf_counter() - start) / args.steps
    return {
        "arch": arch,
        "ms_per_step": seconds * 1000,
        "images_per_s": args.batch / seconds,
        "peak_mib": peak,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def print_params(args: argparse.Namespace) -> list[dict]:
    """Print (and with --json write) the parameter counts of PARAM_MODELS for args.backbone and args.tasks."""
    print(
        f"parameters: backbone={args.backbone} tasks={args.tasks} (semseg {CLASSES} classes) pretrained=False"
    )
    rows = []
    for arch, decoder in PARAM_MODELS:
        row = count_params(arch, decoder, args)
        rows.append(row)
        print(
            f"{arch:>13} {decoder:>7}: {row['params']:>11,d} params ({row['params'] / 1e6:6.2f} M)  "
            f"encoder {row['backbone'] / 1e6:6.2f} M  rest {row['decoder_params'] / 1e6:6.2f} M",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, "params": rows}, indent=2)
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["mtl", "mteb", "3ways-padnet", "padnet", "stl"])
    parser.add_argument(
        "--decoder",
        default="3ways",
        choices=["3ways", "deeplab"],
        help="task decoder of stl and mtl (the other archs have their own); default 3ways",
    )
    parser.add_argument(
        "--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"]
    )
    parser.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tasks", default="SD", choices=sorted(TASK_SETS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--amp", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--check", action="store_true", help="fail when mTEB's overhead over MTL exceeds the target"
    )
    parser.add_argument(
        "--params",
        action="store_true",
        help="only print the parameter counts of stl/mtl (both decoders), mteb, 3ways-padnet and padnet",
    )
    args = parser.parse_args(argv)
    if args.params:
        return print_params(args)
    device = torch.device(args.device)
    print(
        f"device={device} backbone={args.backbone} size={args.size} batch={args.batch} tasks={args.tasks} "
        f"amp={args.amp} decoder(stl, mtl)={args.decoder}"
    )
    rows = []
    for arch in args.archs:
        row = bench(arch, args, device)
        rows.append(row)
        print(
            f"{arch:>13}: {row['ms_per_step']:9.1f} ms/step  {row['images_per_s']:7.2f} img/s  "
            f"peak {row['peak_mib']:9.1f} MiB  {row['params_m']:6.1f} M params",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(
            json.dumps({"settings": vars(args) | {"json": str(args.json)}, "results": rows}, indent=2)
        )
    if args.check:
        by = {r["arch"]: r for r in rows}
        if not {"mtl", "mteb"} <= set(by):
            raise SystemExit("--check needs --archs to include mtl and mteb")
        time_ratio = by["mteb"]["ms_per_step"] / by["mtl"]["ms_per_step"]
        print(f"mTEB / MTL step time: {time_ratio:.3f} (target <= {MAX_TIME_RATIO})")
        failed = time_ratio > MAX_TIME_RATIO
        if device.type == "cuda":
            mem_ratio = by["mteb"]["peak_mib"] / by["mtl"]["peak_mib"]
            print(f"mTEB / MTL peak memory: {mem_ratio:.3f} (target <= {MAX_MEMORY_RATIO})")
            failed |= mem_ratio > MAX_MEMORY_RATIO
        if failed:
            raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
