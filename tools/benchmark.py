"""Speed, memory and size of the models and of the training pieces, each configuration in its own process.

    python tools/benchmark.py [--benches step exchange adapt selfsup data context odsf]
                              [--archs stl mtl 3ways-padnet mteb padnet] [--tasks SD SDN] [--backbone resnet101] [--decoder 3ways|deeplab]
                              [--size 512 1024] [--batch-size 2] [--warmup 2] [--repeats 10] [--device cuda|cpu]
                              [--mixed-precision no|bf16|fp16] [--channels-last] [--compile] [--memory-budget 0.5] [--fused]
                              [--checkpointing] [--keep-memory] [--baseline] [--variants V ...]
                              [--exchange-size 512 1024] [--data-root datasets/toy] [--data-batches 20]
                              [--threads N] [--rounds 1] [--no-flops] [--peak-tflops T] [--json out.json] [--compare OLD.json] [--check]
    python tools/benchmark.py --compare OLD.json NEW.json        (ratios new/old, nothing is run)
    python tools/benchmark.py --params [--backbone resnet101] [--tasks SD] [--json out.json]

Benches (default: all six; `--check` alone runs `step` only):
  step      the supervised training step of each arch x task set: forward, MultiTaskLoss with the paper's task
            weights, backward, Adam step, on random inputs and labels. Also counts the parameters and the
            multiply-adds of one forward (torch.utils.flop_counter; GMACs = flops / 2; convolutions, matrix
            products and attention only, elementwise ops are not counted).
  exchange  the mTEB exchange block alone (the block the model builds at ModelConfig.exchange_scales[0] = 1:
            decoder_channels[1] = 128 channels at 1/2 of the input resolution) on random features of an
            `--exchange-size` input, forward + backward, batch `--batch-size`.
  adapt     the adaptation step: model update on the supervised loss of a source batch plus the adversarial term
            of a target batch through the output-level patch discriminators (uda.objectives.Adversarial, one
            per task x scale), then the discriminator update. The model forwards 2 x batch images per step.
  selfsup   the self-supervised depth step (uda.objectives.Photometric: PoseNet + photometric loss over the
            sigmoid-disparity outputs at scales 0-3, two source frames), plus the supervised loss of the other
            tasks; forward, backward, one Adam step for model and pose net. Task sets without depth are skipped.
  context   ATRC's local context pooling block (9x9 window) on 67-channel stride-4 task features of 256x256 and
            512x512 inputs, forward + backward: its memory grows linearly with the pixels (4x from one to the other).
  odsf      the boundary benchmark of NYUD-v2 (uda.boundary: 99 thresholds, thinning, one-to-one matching at
            maxDist 0.011) on one synthetic 480x640 edge map and its boundary map per step (a different image
            each step, uda.boundary.synthetic_edge_maps); img/s and the minutes for the 654 test images
            (`minutes_654`, one process). CPU only, whatever --device says.
  data      the training loader on the toy SYNTHIA data (`--data-root`/synthia; generated into a temporary
            folder when missing) with 0, 1 and 2 workers: time per batch and samples per second.

Each configuration runs in a fresh `python tools/benchmark.py --one '<json spec>'` process that prints one
JSON line, so memory figures belong to that configuration alone. `--warmup` untimed steps (at least 2 with
--compile: they include compilation), then `--repeats` timed steps: median, min and max. img/s = batch /
median step time (data: samples / total time of the timed batches, workers prefetching). `--rounds N` runs the
whole list N times in turn (A B C, A B C, ...) and reports medians over the rounds; the time ratios (vs fp32,
vs baseline) are then medians of the per-round ratios, so a drift of a shared machine's speed hits both sides.
With `--baseline` the table adds each step and exchange row's time / step memory relative to the baseline row.

Memory: on CUDA the peak allocated by torch (`max_memory_allocated`, reset after warm-up). On CPU the peak
resident set size of the configuration's process (`peak_rss_mib`, from VmHWM in /proc/self/status) and its
increase over the resident size just before the first step (`step_rss_increase_mib`: activations, gradients,
optimiser state; warm-up included). VmHWM rather than getrusage's ru_maxrss: on Linux a child's ru_maxrss
starts at the parent's peak (it survives fork/exec), so it is also reported (`ru_maxrss_mib`) but not used.
Data-loader worker processes are not counted.

Options of the step bench (`--mixed-precision`, `--channels-last`, `--compile`, `--memory-budget B` (a compiled
variant keeping the share B of the activations, train.compile_memory_budget), `--fused` Adam, `--checkpointing` of
ModelConfig (a one-line error where ModelConfig has no such field), `--keep-memory` (CPU: the memory a step frees
stays in the process instead of being page-faulted in again the next step: train.keep_cpu_memory, which the
trainer does by default on a CPU; every other row runs with the C library's defaults)): each requested option
runs as its own variant next to plain fp32 (and all requested options together when more than one is given); the
table names them fp32, bf16/fp16, cl, compile, budgetB, fused, ckpt, keep ('+'-joined) and shows each variant's
time relative to plain fp32. `--variants V ...` runs exactly the variants named so (e.g. `baseline fp32 cl+keep
bf16+cl+keep`) instead of the option flags. The exchange bench takes the same options except `--fused` (the
block alone has no optimiser).

Model FLOP utilisation (column MFU, `mfu` in the JSON), for the step and exchange rows: a training step costs
about three forwards (the forward, and the backward's two products per layer, for inputs and for weights) of
2 FLOPs per multiply-add, so MFU = 6 x the forward's multiply-adds of the batch / step time / the device's peak.
The peak is `--peak-tflops` when given, else the data-sheet dense peak of known GPUs (H200, H100, A100) in
the row's compute type: bf16 or fp16 under autocast, TF32 in fp32 (cuDNN's convolutions use TensorFloat-32 by
default; fp32 when `torch.backends.cudnn.allow_tf32` is off). Multiply-adds are counted once per arch and shared
by its variants (the baseline's are not counted: its projection has more); none with `--no-flops`.

The JSON (`--json`) holds `machine` (CPU model and flags, threads, GPU, versions, date), `settings` and
`results` (one row per configuration, with its process id). `--compare OLD.json` prints, per configuration
present in both, new/old ratios of median time and memory, flagging those above 1 + `--tolerance`.

`--params` only counts parameters (no timing; CPU, under a minute): stl and mtl with both task decoders
(3-ways, DeepLab head) and mteb, 3ways-padnet, padnet, split into encoder (backbone) and the rest.
`--check` enforces the targets below on the plain step rows and exits non-zero when one is missed, so a
slowdown shows up as a failing command, not as a flaky timed test.

Targets (relative, so they hold on any machine): a model with the mTEB exchange block may take at most 3x
the step time and 1.5x the peak GPU memory of the plain MTL model with the same encoder and decoders. mTEB is
not small in compute: at scale 1 each direction runs a 3x3 extractor and two 3x3 self-attention convolutions
on 128-channel half-resolution maps, comparable to a decoder stage; its attention runs through
scaled_dot_product_attention, so memory stays linear in the number of tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import get_args

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from uda.cli import TASK_SETS  # noqa: E402
from uda.commands.model_stats import count_macs  # noqa: E402
from uda.config import Backbone, ModelConfig  # noqa: E402
from uda.hardware import proc_status_mib  # noqa: E402
from uda.losses import MultiTaskLoss, default_task_weights  # noqa: E402
from uda.models import build_model  # noqa: E402
from uda.models.multitask import DEEPLAB_ARCHS, intermediate_scales  # noqa: E402
from uda.tasks import task_channels  # noqa: E402

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
BENCHES = ("step", "exchange", "adapt", "selfsup", "data", "context", "odsf")
ODSF_SIZE = (480, 640)  # NYUD-v2's images, the 654-image test split
CONTEXT_SIDES = (256, 512)  # the context bench: square inputs, task features at stride 4
DEFAULT_ARCHS = ["stl", "mtl", "3ways-padnet", "mteb", "padnet"]
DATA_WORKERS = (0, 1, 2)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
AMP_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PLAIN = {
    "amp": "no",
    "channels_last": False,
    "compile": False,
    "fused": False,
    "checkpointing": False,
    "keep_memory": False,
}
RESULT_MARK = "BENCH_RESULT "  # prefix of the child's result line on stdout
# Fields that identify a configuration across runs (--compare).
KEY_FIELDS = ("bench", "arch", "tasks", "decoder", "backbone", "size", "batch", "options", "device")
# Dense (no sparsity) peak throughput of GPUs in TFLOP/s by compute type, from NVIDIA's data sheets; the first
# pattern found in torch's device name wins (so the PCIe and NVL H100s before the SXM one). --peak-tflops overrides.
GPU_PEAK_TFLOPS = (
    (r"\bH200\b", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bH100\b", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.7, "fp32": 66.9}),
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


# --------------------------------------------------------------------------- machine and memory facts


def machine_facts(device: torch.device) -> dict:
    """CPU model and vector flags, thread and core counts, GPU, library versions and the date."""
    import torchvision

    from uda.hardware import cpu_flags, cpu_model

    flags = cpu_flags()
    facts = {
        "cpu_model": cpu_model(),
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": None,
        "gpu_memory_gib": None,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts["gpu"], facts["gpu_memory_gib"] = props.name, round(props.total_memory / 2**30, 1)
    return facts


def describe_machine(facts: dict) -> str:
    """One line of the machine facts."""
    flags = " ".join(f for f, on in facts["cpu_flags"].items() if on) or "none of " + "/".join(CPU_FLAGS)
    gpu = f"{facts['gpu']} ({facts['gpu_memory_gib']} GiB)" if facts["gpu"] else "none"
    return (
        f"machine: {facts['cpu_model']} [{flags}], {facts['cpu_count']} CPUs ({facts['cpus_usable']} usable), "
        f"torch threads {facts['torch_threads']}, GPU {gpu}; torch {facts['torch']}, torchvision "
        f"{facts['torchvision']}, python {facts['python']}; {facts['date']}"
    )


def ru_maxrss_mib() -> float:
    """getrusage's peak resident size of this process in MiB (KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    current = proc_status_mib("VmRSS")
    return current if current is not None else ru_maxrss_mib()


def peak_rss_mib() -> float:
    """Peak resident set size of this process's own address space (VmHWM; ru_maxrss where unavailable)."""
    peak = proc_status_mib("VmHWM")
    return peak if peak is not None else ru_maxrss_mib()


# --------------------------------------------------------------------------- model, batch, counting


def model_config(spec: dict, **overrides) -> ModelConfig:
    """The ModelConfig of a spec (stl/mtl take --decoder; the other archs have their own decoder)."""
    decoder = spec["decoder"] if spec["arch"] in DEEPLAB_ARCHS else "3ways"
    if spec.get("checkpointing"):
        overrides["checkpointing"] = True
    return ModelConfig(
        arch=spec["arch"], decoder=decoder, backbone=spec["backbone"], pretrained=False, **overrides
    )


def count_params(arch: str, decoder: str, args: argparse.Namespace) -> dict:
    """Parameter counts (total, encoder, rest) of one randomly initialised model."""
    cfg = ModelConfig(arch=arch, decoder=decoder, backbone=args.backbone, pretrained=False)
    groups = build_model(cfg, task_channels(TASK_SETS[args.tasks[0]], CLASSES)).param_groups()
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


def n_params(*modules) -> int:
    """Number of parameters of the modules."""
    return sum(p.numel() for m in modules for p in m.parameters())


def fused_adam_supported(device: torch.device) -> bool:
    """Whether this torch has a fused Adam kernel for the device type."""
    from torch.utils import _foreach_utils

    devices = getattr(_foreach_utils, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    return device.type in devices


def adam(params, spec: dict, device: torch.device, lr: float = 1e-4) -> torch.optim.Adam:
    """Adam, fused when the spec asks for it (ValueError naming the device where torch has no fused kernel)."""
    if not spec.get("fused"):
        return torch.optim.Adam(params, lr=lr)
    if not fused_adam_supported(device):
        raise ValueError(f"fused Adam is not supported on {device.type} by torch {torch.__version__}")
    return torch.optim.Adam(params, lr=lr, fused=True)


def timed(step, spec: dict, device: torch.device) -> dict:
    """Run `step` warm-up times untimed, then `repeats` timed times; median/min/max and memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rss_before = rss_mib()
    warmup = max(spec["warmup"], 2) if spec.get("compile") else spec["warmup"]
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    peak_rss = peak_rss_mib()
    out = {
        "warmup_done": warmup,
        "times_ms": times,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss,
        "step_rss_increase_mib": peak_rss - rss_before,
        "ru_maxrss_mib": ru_maxrss_mib(),
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out["peak_mib"] = out.get("cuda_peak_mib", peak_rss)
    out["ms_per_step"] = out["ms_median"]
    out["images_per_s"] = spec["batch"] / (out["ms_median"] / 1000)
    return out


# --------------------------------------------------------------------------- the benches (child process)


def bench_step(spec: dict, device: torch.device) -> dict:
    """The supervised training step of one arch x task set with the spec's options."""
    tasks = TASK_SETS[spec["tasks"]]
    cfg = model_config(spec)
    model = build_model(cfg, task_channels(tasks, CLASSES)).to(device).train()
    criterion = MultiTaskLoss(
        tasks, default_task_weights(tasks), intermediate_scales=intermediate_scales(cfg)
    )
    optimizer = adam(model.parameters(), spec, device)
    batch = synthetic_batch(tasks, spec["batch"], tuple(spec["size"]), CLASSES, device)
    if spec.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if spec.get("compile") else model
    dtype = AMP_DTYPES[spec.get("amp", "no")]
    scaler = torch.amp.GradScaler(device.type) if spec.get("amp") == "fp16" else None

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _ = criterion(net(batch["image"]), batch)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

    row = timed(step, spec, device)
    row["params"] = n_params(model)
    if spec.get("flops"):
        row["gmacs"] = count_macs(lambda: model(batch["image"])) / 1e9
    return row


def exchange_features(size: tuple[int, int], scale: int) -> tuple[int, int]:
    """Spatial size of the decoder features at `scale` for an input of `size` (ResNet: each stride-2 stage
    gives ceil(x / 2); scale 4 is the dilated stage at the resolution of scale 3)."""
    h, w = size
    for _ in range(min(scale, 3)):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def bench_exchange(spec: dict, device: torch.device) -> dict:
    """The mTEB block the model builds at its first exchange scale, forward + backward on random features."""
    from uda.models import MTEB

    tasks = TASK_SETS[spec["tasks"]]
    if len(tasks) < 2:
        raise ValueError(f"the exchange block needs >= 2 tasks, --tasks {spec['tasks']} has {len(tasks)}")
    cfg = ModelConfig(arch="mteb", backbone=spec["backbone"], pretrained=False)
    scale = cfg.exchange_scales[0]
    channels = cfg.decoder_channels[scale]
    h, w = exchange_features(tuple(spec["size"]), scale)
    block = MTEB.from_config(tasks, channels, cfg, scale).to(device).train()
    if spec.get("checkpointing"):  # what model.checkpointing does to the block
        from uda.models import XTAM
        from uda.models.checkpointing import enable_checkpointing

        enable_checkpointing(block, (XTAM,))
    layout = torch.channels_last if spec.get("channels_last") else torch.contiguous_format
    block = block.to(memory_format=layout)
    feats = {
        t: torch.randn(spec["batch"], channels, h, w, device=device)
        .contiguous(memory_format=layout)
        .requires_grad_()
        for t in tasks
    }
    net = torch.compile(block) if spec.get("compile") else block
    dtype = AMP_DTYPES[spec.get("amp", "no")]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = net(feats)
        torch.stack([o.float().square().mean() for o in out.values()]).sum().backward()
        block.zero_grad(set_to_none=True)
        for f in feats.values():
            f.grad = None

    row = timed(step, spec, device)
    row.update(scale=scale, features=[spec["batch"], channels, h, w], params=n_params(block))
    if spec.get("flops"):
        row["gmacs"] = count_macs(lambda: block(feats)) / 1e9
    return row


def bench_context(spec: dict, device: torch.device) -> dict:
    """One ATRC context pooling block (`spec["context"]`: local, global, tlabel, slabel) on the stride-4 task
    features of a `spec["size"]` input (67 channels, HRNetV2-W18-small's), forward + backward."""
    from uda.models.atrc import build_context

    h, w = (math.ceil(n / 4) for n in spec["size"])
    channels, regions = 67, 40
    block = build_context(spec["context"], channels, channels // 2).to(device).train()
    target, source = (
        torch.randn(spec["batch"], channels, h, w, device=device, requires_grad=True) for _ in range(2)
    )
    aux = torch.softmax(torch.randn(spec["batch"], regions, h * w, device=device), dim=-1)

    def step() -> None:
        block(target, source, aux, aux).square().mean().backward()
        block.zero_grad(set_to_none=True)
        target.grad = source.grad = None

    row = timed(step, spec, device)
    row.update(features=[spec["batch"], channels, h, w], params=n_params(block))
    return row


def bench_adapt(spec: dict, device: torch.device) -> dict:
    """Model update (supervised source loss + adversarial target term), then the discriminator update."""
    from accelerate import Accelerator

    from uda.config import AdaptConfig, DataConfig, ExperimentConfig
    from uda.objectives.adversarial import Adversarial
    from uda.objectives.base import RunContext, Step
    from uda.tasks import output_space

    tasks = TASK_SETS[spec["tasks"]]
    cfg = model_config(spec)
    exp = ExperimentConfig(
        tasks=tasks, model=cfg, target=DataConfig(dataset="cityscapes"), adapt=AdaptConfig()
    )
    run = RunContext(
        exp, tasks, task_channels(tasks, CLASSES), output_space(exp, CLASSES), intermediate_scales(cfg)
    )
    objective = Adversarial(run, exp.adapt)
    objective.discriminators.to(device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    model = build_model(cfg, task_channels(tasks, CLASSES)).to(device).train()
    criterion = MultiTaskLoss(
        tasks, default_task_weights(tasks), intermediate_scales=intermediate_scales(cfg)
    )
    optimizer = adam(model.parameters(), spec, device)
    source = synthetic_batch(tasks, spec["batch"], tuple(spec["size"]), CLASSES, device)
    target = {"image": torch.rand_like(source["image"])}

    def step() -> None:
        outputs = {"source": model(source["image"]), "target": model(target["image"])}
        state = Step(0, {"source": source, "target": target}, outputs, accelerator)
        supervised, _ = criterion(outputs["source"], source)
        (supervised + objective.loss(state).total).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.update(state)

    row = timed(step, spec, device)
    row.update(
        params=n_params(model),
        disc_params=n_params(objective.discriminators),
        discriminators=sorted(objective.discriminators),
    )
    return row


def intrinsics(batch: int, size: tuple[int, int], device) -> torch.Tensor:
    """Pixel intrinsics [B,3,3] of a Cityscapes-like camera at `size`."""
    h, w = size
    K = torch.tensor([[1.1 * w, 0, w / 2], [0, 2.2 * h, h / 2], [0, 0, 1]], device=device)
    return K.expand(batch, 3, 3).clone()


def bench_selfsup(spec: dict, device: torch.device) -> dict:
    """Self-supervised depth step: photometric objective (pose net + view synthesis) + supervised other tasks."""
    from uda.config import ExperimentConfig, PhotometricConfig
    from uda.objectives.base import RunContext, Step
    from uda.objectives.photometric import Photometric
    from uda.tasks import output_space

    tasks = TASK_SETS[spec["tasks"]]
    if "depth" not in tasks:
        raise ValueError(f"selfsup learns depth; --tasks {spec['tasks']} has no depth")
    multiscale = spec["arch"] != "padnet" and model_config(spec).decoder == "3ways"
    photometric = PhotometricConfig(scales=(0, 1, 2, 3) if multiscale else (0,))
    cfg = model_config(spec, depth_output="disparity", output_scales=photometric.scales)
    exp = ExperimentConfig(tasks=tasks, model=cfg, photometric=photometric)
    run = RunContext(
        exp, tasks, task_channels(tasks, CLASSES), output_space(exp, CLASSES), intermediate_scales(cfg)
    )
    objective = Photometric(run, photometric)
    posenet = objective.posenet.to(device).train()
    model = build_model(cfg, task_channels(tasks, CLASSES)).to(device).train()
    supervised = tuple(t for t in tasks if t != "depth")
    criterion = (
        MultiTaskLoss(
            supervised, default_task_weights(supervised), intermediate_scales=intermediate_scales(cfg)
        )
        if supervised
        else None
    )
    groups = [{"params": list(model.parameters()), "lr": 1e-4}, *objective.param_groups()]
    optimizer = adam(groups, spec, device)
    size = tuple(spec["size"])
    batch = synthetic_batch(supervised, spec["batch"], size, CLASSES, device)
    batch["frames"] = {o: torch.rand_like(batch["image"]) for o in photometric.frames}
    batch["K"] = intrinsics(spec["batch"], size, device)

    def step() -> None:
        outputs = model(batch["image"])
        loss = objective.loss(Step(0, {"source": batch}, {"source": outputs}, None)).total
        if criterion is not None:
            loss = loss + criterion(outputs, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    row = timed(step, spec, device)
    row.update(
        params=n_params(model), pose_params=n_params(posenet), photometric_scales=list(photometric.scales)
    )
    return row


def bench_data(spec: dict, device: torch.device) -> dict:
    """The training loader of the toy SYNTHIA data with spec['workers'] workers: time per batch."""
    from uda.config import DataConfig, ExperimentConfig
    from uda.data.loader import train_loader
    from uda.data.streams import RunData

    tasks = TASK_SETS[spec["tasks"]]
    data = DataConfig(
        dataset="synthia",
        root=spec["data_root"],
        size=tuple(spec["size"]),
        batch_size=spec["batch"],
        num_workers=spec["workers"],
    )
    run_data = RunData(ExperimentConfig(tasks=tasks, data=data), needs=[[], []])
    dataset = run_data.dataset(data, data.train_split, run_data.label_tasks(0), train=True, domain=0)
    batches = train_loader(dataset, spec["batch"], seed=0, num_workers=spec["workers"])
    rss_before = rss_mib()
    for _ in range(max(1, spec["warmup"])):  # the first batch starts the workers
        next(batches)
    times = []
    start = time.perf_counter()
    for _ in range(spec["data_batches"]):
        t0 = time.perf_counter()
        next(batches)
        times.append((time.perf_counter() - t0) * 1000)
    total = time.perf_counter() - start
    peak_rss = peak_rss_mib()
    return {
        "samples": len(dataset),
        "times_ms": times,
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "ms_per_step": statistics.median(times),
        "images_per_s": spec["batch"] * spec["data_batches"] / total,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss,
        "step_rss_increase_mib": peak_rss - rss_before,
        "ru_maxrss_mib": ru_maxrss_mib(),
        "peak_mib": peak_rss,
    }


def bench_odsf(spec: dict, device: torch.device) -> dict:
    """uda.boundary.boundary_counts of one synthetic NYUD-sized image per step (99 thresholds, maxDist 0.011)."""
    from uda.boundary import MAX_DIST, boundary_counts, synthetic_edge_maps

    images = [synthetic_edge_maps(*ODSF_SIZE, seed) for seed in range(spec["warmup"] + spec["repeats"])]
    it = iter(images)

    def step() -> None:
        prob, gt = next(it)
        boundary_counts(prob, gt, MAX_DIST["nyudv2"])

    row = timed(step, spec, torch.device("cpu"))
    row["minutes_654"] = 654 * row["ms_median"] / 60000
    return row


BENCH_FUNCTIONS = {
    "step": bench_step,
    "exchange": bench_exchange,
    "adapt": bench_adapt,
    "selfsup": bench_selfsup,
    "data": bench_data,
    "context": bench_context,
    "odsf": bench_odsf,
}


def use_baseline_attention() -> None:
    """--baseline: xTAM as it was when issue 12 was filed (everything else is today's code). Its correlation
    attention passed q/k/v to scaled_dot_product_attention as transposed views, which sends it to the math
    kernel that holds the N x N matrix (forward and backward), and its projection P ran on the full-resolution
    concatenation [alpha * up(x), self(g)]. Same values as today's xTAM (tested)."""
    import torch.nn.functional as F

    from uda.models.exchange import XTAM

    def correlation(self, f_i: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.attention != "spatial":
            raise ValueError("--baseline reproduces the spatial attention only")
        b, c, h, w = f_i.shape
        tokens = (math.ceil(h / self.downscale), math.ceil(w / self.downscale))
        q = self.query(F.interpolate(f_i, size=tokens, mode="nearest")).flatten(2)
        source = F.adaptive_max_pool2d(g, tokens)
        k, v = self.key(source).flatten(2), self.value(source).flatten(2)
        qt, kt, vt = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt).squeeze(1).transpose(1, 2)
        return F.interpolate(out.reshape(b, c, *tokens), size=(h, w), mode="nearest")

    def forward(self, f_i: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
        g = self.extract(f_j)
        parts = [self.alpha * self.correlation(f_i, g)]
        if self.self_attention is not None:
            parts.append(self.self_attention(g))
        return self.proj(torch.cat(parts, dim=1))

    XTAM.correlation = correlation
    XTAM.forward = forward


def run_one(spec: dict) -> dict:
    """Run one configuration in this process; the spec plus its measurements, pid and threads."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec.get("baseline"):
        use_baseline_attention()
    if spec.get("keep_memory"):
        from uda.hardware import keep_freed_memory

        keep_freed_memory()
    if spec.get("memory_budget"):
        from uda.hardware import set_compile_memory_budget

        set_compile_memory_budget(spec["memory_budget"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    row = dict(spec)
    row.update(BENCH_FUNCTIONS[spec["bench"]](spec, device))
    row.update(pid=os.getpid(), threads=torch.get_num_threads())
    if "params" in row:
        row["params_m"] = row["params"] / 1e6
    return row


def child_main(spec_json: str) -> None:
    """--one: run one spec and print its row as one JSON line (an `error` row when it fails)."""
    spec = json.loads(spec_json)
    try:
        row = run_one(spec)
    except Exception as err:  # reported in the row; the traceback goes to stderr
        traceback.print_exc()
        row = dict(spec, pid=os.getpid(), error=f"{type(err).__name__}: {err}".splitlines()[0])
    print(RESULT_MARK + json.dumps(row), flush=True)


def run_isolated(spec: dict) -> dict:
    """Run one spec in a fresh Python process and return its row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else "no output"
    return dict(spec, pid=None, error=f"process exited with code {proc.returncode}: {reason}")


# --------------------------------------------------------------------------- the parent: specs, table, compare


def options_label(spec: dict) -> str:
    """Short name of a spec's step options: 'fp32' when plain, else '+'-joined bf16/fp16, cl (channels-last),
    compile, fused (Adam), ckpt (activation checkpointing), keep (freed memory kept, CPU)."""
    parts = [spec["amp"]] if spec.get("amp", "no") != "no" else []
    parts += [
        name
        for key, name in (
            ("channels_last", "cl"),
            ("compile", "compile"),
            ("memory_budget", f"budget{spec.get('memory_budget')}"),
            ("fused", "fused"),
            ("checkpointing", "ckpt"),
            ("keep_memory", "keep"),
            ("baseline", "baseline"),
        )
        if spec.get(key)
    ]
    return "+".join(parts) or "fp32"


VARIANT_PARTS = {
    "bf16": {"amp": "bf16"},
    "fp16": {"amp": "fp16"},
    "cl": {"channels_last": True},
    "compile": {"compile": True},
    "fused": {"fused": True},
    "ckpt": {"checkpointing": True},
    "keep": {"keep_memory": True},
    "baseline": {"baseline": True},
}


def parse_variant(label: str) -> dict:
    """The options of a variant named as the table names it: 'fp32', or '+'-joined parts of VARIANT_PARTS and
    budgetB (compile keeping the share B of the activations), e.g. 'cl+keep', 'bf16+cl+compile+budget0.5'."""
    options = dict(PLAIN)
    if label == "fp32":
        return options
    for part in label.split("+"):
        if part in VARIANT_PARTS:
            options |= VARIANT_PARTS[part]
            continue
        try:
            budget = float(part.removeprefix("budget")) if part.startswith("budget") else None
        except ValueError:
            budget = None
        if budget is None or not 0.0 < budget <= 1.0:
            raise ValueError(
                f"--variants {label}: unknown part {part!r}; a variant is fp32 or parts joined by '+' "
                f"({', '.join(VARIANT_PARTS)}, budgetB with B in (0, 1])"
            )
        options |= {"compile": True, "memory_budget": budget}
    return options


def option_variants(args: argparse.Namespace, exclude: tuple[str, ...] = ()) -> list[dict]:
    """The variants of `--variants` as listed, else plain fp32, each requested option alone and, with several,
    all of them together; variants with an option in `exclude` are left out."""
    if args.variants:
        variants = [parse_variant(label) for label in args.variants]
        return [v for v in variants if not any(v.get(key) for key in exclude)]
    chosen = [{"amp": args.amp}] if args.amp != "no" else []
    chosen += [
        {key: True}
        for key in ("channels_last", "compile", "fused", "checkpointing", "keep_memory")
        if getattr(args, key) and key not in exclude
    ]
    if args.memory_budget is not None and "compile" not in exclude:
        chosen.append({"compile": True, "memory_budget": args.memory_budget})
    variants = [dict(PLAIN)] + [PLAIN | c for c in chosen]
    if len(chosen) > 1:
        variants.append(PLAIN | {k: v for c in chosen for k, v in c.items()})
    if args.baseline:
        variants.insert(0, PLAIN | {"baseline": True})
    return variants


def counted_variant(variants: list[dict]) -> dict | None:
    """The variant whose multiply-adds are counted (the others share them): plain fp32 when listed, else the
    first one that is not the baseline (whose full-resolution projection has more)."""
    return next(
        (v for v in variants if v == PLAIN), next((v for v in variants if not v.get("baseline")), None)
    )


def build_specs(args: argparse.Namespace, data_root: str | None) -> list[dict]:
    """The configurations to run, in order."""
    common = {
        "backbone": args.backbone,
        "size": list(args.size),
        "batch": args.batch,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "device": args.device,
        "threads": args.threads,
        "decoder": args.decoder,
    }
    specs = []
    for bench in args.benches:
        if bench == "step":
            for tasks in args.tasks:
                for arch in args.archs:
                    variants = option_variants(args)
                    for variant in variants:
                        flops = (
                            variant is counted_variant(variants) and not args.no_flops
                        )  # options keep the MACs
                        specs.append(
                            common | variant | {"bench": "step", "arch": arch, "tasks": tasks, "flops": flops}
                        )
        elif bench == "exchange":
            # The step's option variants except fused Adam (the block alone has no optimiser).
            exchange_variants = option_variants(args, exclude=("fused",))
            counted = counted_variant(exchange_variants)
            for tasks in (t for t in args.tasks if len(TASK_SETS[t]) >= 2):
                for variant in exchange_variants:
                    specs.append(
                        common
                        | variant
                        | {
                            "bench": "exchange",
                            "arch": "mteb-block",
                            "tasks": tasks,
                            "size": list(args.exchange_size),
                            "flops": not args.no_flops and variant is counted,
                        }
                    )
        elif bench == "context":
            # ATRC's local context at stride 4 of 256x256 and 512x512 inputs: memory linear in the pixels.
            for side in CONTEXT_SIDES:
                specs.append(
                    common
                    | PLAIN
                    | {"bench": "context", "arch": "atrc-local", "tasks": "SD", "context": "local"}
                    | {"size": [side, side], "flops": False}
                )
        elif bench == "odsf":
            specs.append(
                common
                | PLAIN
                | {"bench": "odsf", "arch": "boundary", "tasks": "E", "size": list(ODSF_SIZE), "batch": 1}
                | {"device": "cpu", "flops": False}
            )
        elif bench in ("adapt", "selfsup"):
            for tasks in args.tasks:
                if bench == "selfsup" and "depth" not in TASK_SETS[tasks]:
                    print(f"selfsup: skipping --tasks {tasks} (no depth to learn)")
                    continue
                for arch in args.archs:
                    specs.append(common | PLAIN | {"bench": bench, "arch": arch, "tasks": tasks})
        elif bench == "data" and data_root is not None:
            for workers in DATA_WORKERS:
                specs.append(
                    common
                    | {
                        "bench": "data",
                        "arch": "synthia",
                        "tasks": args.tasks[0],
                        "workers": workers,
                        "data_root": data_root,
                        "data_batches": args.data_batches,
                    }
                )
    for spec in specs:
        spec["decoder"] = spec["decoder"] if spec["arch"] in DEEPLAB_ARCHS else "3ways"
        spec["options"] = f"{spec['workers']} workers" if spec["bench"] == "data" else options_label(spec)
    return specs


def toy_synthia(root: Path, tmp: str) -> str | None:
    """The toy SYNTHIA folder under root, or a small one generated into tmp with tools/make_toy_data.py."""
    if (root / "synthia").is_dir():
        return str(root / "synthia")
    print(f"data: {root / 'synthia'} does not exist; generating 16 toy SYNTHIA frames into {tmp}", flush=True)
    loader = importlib.util.spec_from_file_location("make_toy_data", REPO / "tools" / "make_toy_data.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    try:
        module.main(["--out", tmp, "--frames", "16", "--dataset", "synthia", "--quiet", "--workers", "1"])
    except (SystemExit, Exception) as err:
        print(f"data: skipped, the toy data could not be generated ({err})", flush=True)
        return None
    return str(Path(tmp) / "synthia")


def fmt(value, spec: str = ".1f") -> str:
    """A number formatted, '-' when absent."""
    return "-" if value is None else format(value, spec)


def merge_rounds(rounds: list[dict]) -> dict:
    """One configuration's rows of several rounds as one row: medians over the rounds of the step time and the
    memory figures, the extremes of the timed steps, each round's median in `rounds_ms` (an error row if a
    round failed)."""
    failed = [r for r in rounds if "error" in r]
    if failed or len(rounds) == 1:
        return (failed or rounds)[0]
    row = dict(rounds[0])
    row.update(
        rounds=len(rounds),
        rounds_ms=[r["ms_median"] for r in rounds],
        ms_median=statistics.median(r["ms_median"] for r in rounds),
        ms_min=min(r["ms_min"] for r in rounds),
        ms_max=max(r["ms_max"] for r in rounds),
        pids=[r["pid"] for r in rounds],
    )
    for key in ("peak_rss_mib", "step_rss_increase_mib", "peak_mib", "cuda_peak_mib", "ru_maxrss_mib"):
        if key in row:
            row[key] = statistics.median(r[key] for r in rounds)
    row["ms_per_step"] = row["ms_median"]
    row["images_per_s"] = row["batch"] / (row["ms_median"] / 1000)
    return row


def time_ratio(row: dict, reference: dict) -> float:
    """row's step time over reference's: the median of the per-round ratios when both ran in the same rounds
    (pairing keeps the ratio steady while the machine's speed drifts), else the ratio of the medians."""
    a, b = row.get("rounds_ms"), reference.get("rounds_ms")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b))
    return row["ms_median"] / reference["ms_median"]


def compute_type(row: dict, tf32: bool) -> str:
    """What the row's convolutions and matrix products run in: its autocast type, else tf32 where cuDNN may use
    TensorFloat-32 (torch's default for convolutions, the bulk of these models), else fp32."""
    amp = row.get("amp", "no")
    return amp if amp != "no" else ("tf32" if tf32 else "fp32")


def gpu_peak_tflops(name: str | None, kind: str) -> float | None:
    """The dense peak TFLOP/s of the GPU called `name` in compute type `kind`; None when not in the table."""
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if name and re.search(pattern, name):
            return peaks.get(kind)
    return None


def attach_mfu(rows: list[dict], gpu: str | None, peak_tflops: float | None, tf32: bool) -> None:
    """Add the model FLOP utilisation to every step and exchange row with multiply-adds: a training step costs
    3 forwards (forward, and the backward's two products per layer) of 2 FLOPs per multiply-add, so
    mfu = 6 x GMACs of the batch's forward / step time / peak. The peak is `peak_tflops` when given, else the
    GPU's for the row's compute type (`GPU_PEAK_TFLOPS`); rows without either get none."""
    for r in rows:
        if r["bench"] not in ("step", "exchange") or "error" in r or not r.get("gmacs"):
            continue
        kind = compute_type(r, tf32)
        peak = peak_tflops or (gpu_peak_tflops(gpu, kind) if r.get("device", "").startswith("cuda") else None)
        if peak:
            achieved = 6 * r["gmacs"] * 1e9 / (r["ms_median"] / 1000)
            r.update(
                peak_tflops=peak, peak_kind="given" if peak_tflops else kind, mfu=achieved / (peak * 1e12)
            )


def table(rows: list[dict]) -> str:
    """One line per configuration; the step and exchange rows with their time relative to plain fp32 and, with
    --baseline, their time and step memory relative to the baseline."""
    compared = ("step", "exchange")
    refs = {
        (r["bench"], r["arch"], r["tasks"], r.get("options")): r
        for r in rows
        if r["bench"] in compared and r.get("options") in ("fp32", "baseline") and "error" not in r
    }
    head = (
        f"{'bench':<8} {'arch':<13} {'tasks':<5} {'options':<28} {'ms median [min-max]':>27} {'vs fp32':>7} "
        f"{'img/s':>8} {'peak MiB':>9} {'+step MiB':>9} {'vs baseline':>11} {'GMACs':>8} {'MFU':>6} {'params':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        label = r["options"]
        if r["bench"] in ("exchange", "context") and "features" in r:
            label = f"{r['options']} " + "x".join(map(str, r["features"][1:]))
        start = f"{r['bench']:<8} {r['arch']:<13} {r['tasks']:<5} {label:<28}"
        if "error" in r:
            lines.append(f"{start} ERROR: {r['error']}")
            continue
        spread = f"{r['ms_median']:.1f} [{r['ms_min']:.1f}-{r['ms_max']:.1f}]"
        plain = refs.get((r["bench"], r["arch"], r["tasks"], "fp32"))
        ratio = f"{time_ratio(r, plain):.2f}x" if plain and r is not plain else ""
        params = f"{r['params'] / 1e6:.2f} M" if "params" in r else "-"
        increase = r.get("step_rss_increase_mib") if "cuda_peak_mib" not in r else None
        base = refs.get((r["bench"], r["arch"], r["tasks"], "baseline"))
        versus = ""
        if base and r is not base:
            memory = "peak_mib" if increase is None else "step_rss_increase_mib"
            versus = f"{time_ratio(r, base):.2f}/{r[memory] / base[memory]:.2f}"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"{start} {spread:>27} {ratio:>7} {r['images_per_s']:>8.2f} {r['peak_mib']:>9.1f} "
            f"{fmt(increase):>9} {versus:>11} {fmt(r.get('gmacs'), '.2f'):>8} {mfu:>6} {params:>9}"
        )
    return "\n".join(lines)


def normalised_rows(doc: dict) -> list[dict]:
    """The result rows of a benchmark JSON, with the fields --compare matches on (also for JSONs of the
    single-process version of this tool: settings in `settings`, `ms_per_step`, no `bench`)."""
    settings = doc.get("settings", {})
    rows = []
    for row in doc.get("results", []):
        row = dict(row)
        row.setdefault("bench", "step")
        for key in ("backbone", "size", "batch", "device"):
            row.setdefault(key, settings.get(key))
        tasks = settings.get("tasks")
        row.setdefault("tasks", tasks[0] if isinstance(tasks, list) else tasks)
        decoder = settings.get("decoder", "3ways")
        row.setdefault("decoder", decoder if row.get("arch") in DEEPLAB_ARCHS else "3ways")
        amp = settings.get("amp", "no")
        row.setdefault("options", "fp32" if amp == "no" else amp)
        row.setdefault("ms_median", row.get("ms_per_step"))
        rows.append(row)
    return rows


def row_key(row: dict) -> tuple:
    """What identifies a configuration across runs."""
    return tuple(json.dumps(row.get(k)) for k in KEY_FIELDS)


def compare(old: dict, new: dict, tolerance: float = 0.1) -> list[dict]:
    """Print and return new/old ratios of median time and memory for the configurations in both runs."""
    for key in ("cpu_model", "gpu", "torch", "torch_threads", "cpu_count"):
        a, b = old.get("machine", {}).get(key), new.get("machine", {}).get(key)
        if a != b and "machine" in old and "machine" in new:
            print(f"note: {key} differs: old {a}, new {b}")
    olds = {row_key(r): r for r in normalised_rows(old) if "error" not in r}
    ratios = []
    head = (
        f"{'bench':<8} {'arch':<13} {'tasks':<5} {'options':<22} {'time new/old':>12} {'memory new/old':>14}"
    )
    print(f"new / old (ratios > {1 + tolerance:.2f} flagged with !)\n{head}\n{'-' * len(head)}")
    for row in normalised_rows(new):
        before = olds.get(row_key(row))
        if before is None or "error" in row:
            continue
        time_ratio = row["ms_median"] / before["ms_median"]
        mem_ratio = (
            row["peak_mib"] / before["peak_mib"] if row.get("peak_mib") and before.get("peak_mib") else None
        )
        ratios.append(
            {k: row.get(k) for k in KEY_FIELDS} | {"time_ratio": time_ratio, "memory_ratio": mem_ratio}
        )
        flags = ["!" if r is not None and r > 1 + tolerance else " " for r in (time_ratio, mem_ratio)]
        print(
            f"{row['bench']:<8} {row['arch']:<13} {row['tasks']:<5} {row['options']:<22} "
            f"{time_ratio:>11.3f}{flags[0]} {fmt(mem_ratio, '.3f'):>13}{flags[1]}"
        )
    missing = len(normalised_rows(new)) - len(ratios)
    if missing:
        print(f"({missing} configuration(s) of the new run have no finished match in the old one)")
    return ratios


def print_params(args: argparse.Namespace) -> list[dict]:
    """Print (and with --json write) the parameter counts of PARAM_MODELS for args.backbone and args.tasks."""
    print(
        f"parameters: backbone={args.backbone} tasks={args.tasks[0]} (semseg {CLASSES} classes) pretrained=False"
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
        args.json.write_text(json.dumps({"settings": settings_of(args), "params": rows}, indent=2))
    return rows


def settings_of(args: argparse.Namespace) -> dict:
    """The arguments as JSON values."""
    return {k: v for k, v in json.loads(json.dumps(vars(args), default=str)).items() if k != "one"}


def check(rows: list[dict], device: torch.device, tasks: str) -> None:
    """--check: mTEB's step time (and on CUDA peak memory) relative to MTL within the targets."""
    by = {
        r["arch"]: r
        for r in rows
        if r["bench"] == "step" and r["options"] == "fp32" and r["tasks"] == tasks and "error" not in r
    }
    if not {"mtl", "mteb"} <= set(by):
        raise SystemExit("--check needs the step bench with --archs including mtl and mteb (both finished)")
    ratio = time_ratio(by["mteb"], by["mtl"])
    print(f"mTEB / MTL step time: {ratio:.3f} (target <= {MAX_TIME_RATIO})")
    failed = ratio > MAX_TIME_RATIO
    if device.type == "cuda":
        mem_ratio = by["mteb"]["peak_mib"] / by["mtl"]["peak_mib"]
        print(f"mTEB / MTL peak memory: {mem_ratio:.3f} (target <= {MAX_MEMORY_RATIO})")
        failed |= mem_ratio > MAX_MEMORY_RATIO
    if failed:
        raise SystemExit(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benches", nargs="+", choices=BENCHES, default=None, help="default: all")
    parser.add_argument(
        "--archs",
        nargs="+",
        default=DEFAULT_ARCHS,
        help=f"models of the step bench (default: {' '.join(DEFAULT_ARCHS)})",
    )
    parser.add_argument(
        "--decoder",
        default="3ways",
        choices=["3ways", "deeplab"],
        help="task decoder of stl and mtl (the other archs have their own); default 3ways",
    )
    parser.add_argument(
        "--backbone", default="resnet101", choices=get_args(Backbone), help="encoder (default: resnet101)"
    )
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=[512, 1024],
        metavar=("H", "W"),
        help="input size (default: 512 1024)",
    )
    parser.add_argument(
        "--batch-size", "--batch", dest="batch", type=int, default=2, help="images per step (default: 2)"
    )
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=sorted(TASK_SETS),
        help="task sets; default SD SDN (--params: SD)",
    )
    parser.add_argument("--repeats", "--steps", dest="repeats", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 2 with --compile)")
    parser.add_argument(
        "--mixed-precision",
        "--amp",
        dest="amp",
        default="no",
        choices=["no", "bf16", "fp16"],
        help="autocast of the step bench (default: no, fp32)",
    )
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile(model)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list of configurations this many times in turn (A B C A B C ...); medians over the "
        "rounds, ratios paired by round",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        help="also a compiled variant keeping this share (0, 1] of the activations (train.compile_memory_budget)",
    )
    parser.add_argument("--fused", action="store_true", help="Adam(fused=True)")
    parser.add_argument("--checkpointing", action="store_true", help="ModelConfig(checkpointing=True)")
    parser.add_argument(
        "--keep-memory",
        action="store_true",
        help="CPU: freed memory stays in the process (train.keep_cpu_memory, the trainer's default on a CPU; the "
        "other rows use the C library's defaults)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="V",
        help="run exactly these option variants of the step and exchange benches, named as the table names them "
        "(fp32, bf16, cl+keep, cl+compile+budget0.5+keep, baseline, ...) instead of the option flags",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also run the step and exchange benches with xTAM as it was when issue 12 was filed (attention on "
        "transposed q/k/v: the math kernel holding the N x N matrix; projection at full resolution), the "
        "reference of the memory and time targets",
    )
    parser.add_argument(
        "--exchange-size",
        type=int,
        nargs=2,
        default=[512, 1024],
        metavar=("H", "W"),
        help="input size whose decoder features the exchange bench feeds the block (default: 512 1024)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=REPO / "datasets" / "toy",
        help="folder holding the toy dataset folders of the data bench (default: datasets/toy; generated if missing)",
    )
    parser.add_argument("--data-batches", type=int, default=20, help="timed batches of the data bench")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of each run (default: torch's)"
    )
    parser.add_argument("--no-flops", action="store_true", help="skip counting multiply-adds")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak TFLOP/s for the model FLOP utilisation column (default: the data-sheet peak of "
        "known GPUs for each row's compute type, bf16 / fp16 / tf32; none on CPUs)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cpu (default: cuda when available)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="OLD.json: ratios of this run to it; OLD.json NEW.json: ratios without running",
    )
    parser.add_argument("--tolerance", type=float, default=0.1, help="--compare flags ratios above 1 + this")
    parser.add_argument(
        "--check", action="store_true", help="fail when mTEB's overhead over MTL exceeds the target"
    )
    parser.add_argument(
        "--params",
        action="store_true",
        help="only print the parameter counts of stl/mtl (both decoders), mteb, 3ways-padnet and padnet",
    )
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes OLD.json or OLD.json NEW.json")
    if args.tasks is None:
        args.tasks = ["SD"] if args.params else ["SD", "SDN"]
    if args.benches is None:
        args.benches = ["step"] if args.check else list(BENCHES)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be >= 1")
    if args.variants:
        flags = [
            f
            for f, on in (
                ("--mixed-precision", args.amp != "no"),
                ("--channels-last", args.channels_last),
                ("--compile", args.compile),
                ("--memory-budget", args.memory_budget is not None),
                ("--fused", args.fused),
                ("--checkpointing", args.checkpointing),
                ("--keep-memory", args.keep_memory),
                ("--baseline", args.baseline),
            )
            if on
        ]
        if flags:
            parser.error(
                f"--variants lists the variants itself; drop {' '.join(flags)} (add them to a variant)"
            )
        try:
            checkpointing = any(parse_variant(label)["checkpointing"] for label in args.variants)
        except ValueError as err:
            parser.error(str(err))
    else:
        checkpointing = args.checkpointing
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops {args.peak_tflops}: must be > 0")
    if args.memory_budget is not None and not 0.0 < args.memory_budget <= 1.0:
        parser.error(f"--memory-budget {args.memory_budget}: must lie in (0, 1]")
    if checkpointing and "checkpointing" not in {f.name for f in dataclasses.fields(ModelConfig)}:
        parser.error("--checkpointing: uda.config.ModelConfig has no `checkpointing` field in this version")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.one is not None:
        child_main(args.one)
        return []
    if args.params:
        return print_params(args)
    if args.compare and len(args.compare) == 2:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        return compare(old, new, args.tolerance)
    device = torch.device(args.device)
    facts = machine_facts(device)
    print(describe_machine(facts))
    print(
        f"device={device} backbone={args.backbone} size={args.size} batch={args.batch} tasks={args.tasks} "
        f"decoder(stl, mtl)={args.decoder} warmup={args.warmup} repeats={args.repeats} benches={args.benches} "
        f"threads per run={args.threads or facts['torch_threads']}",
        flush=True,
    )
    if args.fused and not fused_adam_supported(device):
        print(f"note: torch {torch.__version__} has no fused Adam on {device.type}; those rows report it")
    with tempfile.TemporaryDirectory(prefix="benchmark-toy-") as tmp:
        data_root = toy_synthia(args.data_root, tmp) if "data" in args.benches else None
        specs = build_specs(args, data_root)
        runs: list[list[dict]] = [[] for _ in specs]
        for turn in range(args.rounds):  # A B C, A B C, ...: a drift of the machine's speed hits every config
            for index, spec in enumerate(specs, 1):
                start = time.perf_counter()
                row = run_isolated(spec)
                runs[index - 1].append(row)
                result = f"ERROR {row['error']}" if "error" in row else f"{row['ms_median']:.1f} ms median"
                where = f"round {turn + 1}/{args.rounds} " if args.rounds > 1 else ""
                print(
                    f"{where}[{index}/{len(specs)}] {spec['bench']} {spec['arch']} {spec['tasks']} "
                    f"{spec['options']}: {result} (pid {row['pid']}, {time.perf_counter() - start:.1f} s)",
                    flush=True,
                )
        rows = [merge_rounds(rounds) for rounds in runs]
    compared = ("step", "exchange")
    macs = {
        (r["bench"], r["arch"], r["tasks"]): r["gmacs"]
        for r in rows
        if r["bench"] in compared and "gmacs" in r
    }
    for r in rows:  # the options do not change the multiply-adds (the baseline's projection has more)
        if (
            r["bench"] in compared
            and not r.get("baseline")
            and "error" not in r
            and (r["bench"], r["arch"], r["tasks"]) in macs
        ):
            r.setdefault("gmacs", macs[(r["bench"], r["arch"], r["tasks"])])
    attach_mfu(rows, facts["gpu"], args.peak_tflops, torch.backends.cudnn.allow_tf32)
    print()
    print(table(rows))
    doc = {"machine": facts, "settings": settings_of(args), "results": rows}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    if args.compare:
        print()
        compare(json.loads(args.compare[0].read_text()), doc, args.tolerance)
    if args.check:
        check(rows, device, args.tasks[0])
    return rows


if __name__ == "__main__":
    main()
