"""What the machine can do fast: CPU instruction sets and the mixed precision that pays on a device."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from uda.files import write_text_atomic

# bf16 autocast on CPUs without AMX: on AVX2 alone the convolutions fall to a slow reference kernel (a 2-core
# AMD EPYC: 12-16x the fp32 step, ResNet-18 toy step); there auto keeps fp32 without measuring. With AVX-512 BF16
# the cost depends on the processor (ResNet-101 mTEB S-D step at 256x512, batch 2, tools/benchmark.py step bench:
# 1.36x on a 2-core Intel Xeon, 0.55x on a 2-core AMD EPYC, 0.44x there with channels-last), so auto measures it:
# `bf16_probe_ratio`, once per CPU, torch version and thread count, cached.
BF16_SLOWDOWN_AVX2 = 16
BF16_PAYS = 0.8  # auto takes bf16 on an AVX-512 BF16 CPU where the probe's bf16/fp32 time is at most this
PROBE_FILE = "precision_probe.json"


@functools.cache
def cpu_info() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo ("model name", "flags", ...); empty where the file
    does not exist (e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block ends at the first blank line
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def proc_status_mib(field: str) -> float | None:
    """A memory field (kB) of /proc/self/status (VmRSS, VmHWM, ...) in MiB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags (avx2, avx512_bf16, amx_bf16, ...)."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_model() -> str:
    """The CPU model name, or what the platform says where /proc/cpuinfo has none."""
    return cpu_info().get("model name") or platform.processor()


def _probe_key() -> str:
    flags = " ".join(sorted(f for f in cpu_flags() if "bf16" in f or f.startswith(("amx", "avx512f"))))
    return f"{cpu_model()} [{flags}] torch {torch.__version__} threads {torch.get_num_threads()}"


def _conv_step_times(rounds: int = 5) -> tuple[float, float]:
    """Best times (s) in bf16 autocast and in fp32 of a forward+backward pass of two 3x3 conv + BN + ReLU layers
    (64 channels, 2 x 64 x 64 x 128: the kind of work that is 73 % of a training step). One warm-up pass each
    (oneDNN creates its primitives), then `rounds` alternating pairs, so that a load that comes and goes
    touches both."""
    net = nn.Sequential(
        *[
            m
            for _ in range(2)
            for m in (nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        ]
    )
    x = torch.randn(2, 64, 64, 128, generator=torch.Generator().manual_seed(0))
    best = {True: math.inf, False: math.inf}
    for i in range(rounds + 1):
        for bf16 in (True, False):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = net(x)
            y.float().square().mean().backward()
            if i:
                best[bf16] = min(best[bf16], time.perf_counter() - start)
    return best[True], best[False]


def bf16_probe_ratio() -> float:
    """The bf16-autocast / fp32 time of a convolution training step on this CPU (`_conv_step_times`; under a
    second with AVX-512 BF16; 0.52-0.67 on a 2-core EPYC whose ResNet-101 step measured 0.55x). Measured once per
    CPU model and flags, torch version and thread count, then read from `<cache>/precision_probe.json` (cache:
    $UDA_CACHE_DIR, else ~/.cache/uda), so later runs on a machine take the same decision. Processes started
    together before the first write each measure; the ratios seen (0.52-0.67 on the EPYC, a 1.36x step on a
    Xeon) lie far from the BF16_PAYS threshold."""
    from uda.data.sampling import cache_dir

    path, key = cache_dir() / PROBE_FILE, _probe_key()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):  # valid JSON of another shape: measured again and rewritten
        cached = {}
    if isinstance(cached.get(key), (int, float)):
        return float(cached[key])
    bf16, fp32 = _conv_step_times()
    ratio = round(bf16 / fp32, 3)
    cached[key] = ratio
    try:  # atomic: another process reads either the old file or the new one
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(cached, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home: the next run measures again
    return ratio


def choose_mixed_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to train with for `requested` ("auto", "no", "fp16", "bf16") on `device`, and a message:
    what auto chose and why, or a warning for a request that will be slow. auto: bf16 on GPUs and CPUs where it
    pays (AMX-BF16, or AVX-512 BF16 measured faster than fp32), fp16 (with a gradient scaler) on older GPUs,
    fp32 ("no") otherwise."""
    if device.type == "cuda":
        if requested != "auto":
            return requested, None
        choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return choice, f"train.mixed_precision=auto: {choice} on {torch.cuda.get_device_name(device)}"
    if device.type != "cpu":  # other accelerators (mps, xpu, ...): fp32 unless asked
        return (
            ("no", f"train.mixed_precision=auto: fp32 on {device.type}")
            if requested == "auto"
            else (requested, None)
        )
    if requested == "fp16":
        return (
            requested,
            "warning: train.mixed_precision=fp16 has no CPU autocast in accelerate: the run is fp32",
        )
    if requested not in ("auto", "bf16"):
        return requested, None
    flags = cpu_flags()
    if "amx_bf16" in flags:
        why, native = "the CPU has AMX-BF16", True
    elif "avx512_bf16" in flags:
        ratio = bf16_probe_ratio()
        native = ratio <= BF16_PAYS
        why = f"AVX-512 BF16 without AMX; bf16 autocast measured {ratio:.2f}x the fp32 time on this CPU"
    else:
        native = False
        why = (
            f"the CPU has no AVX-512 BF16 or AMX; bf16 autocast measured {BF16_SLOWDOWN_AVX2}x the fp32 step "
            "on such a CPU"
        )
    if requested == "auto":
        return (
            "bf16" if native else "no"
        ), f"train.mixed_precision=auto: {'bf16' if native else 'fp32'} ({why})"
    if native:
        return requested, None
    return (
        requested,
        f"warning: train.mixed_precision=bf16 is slow here ({why}); use train.mixed_precision=auto or no",
    )


# accelerate's trackers: train.log_with name -> (module that must import, pip package).
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "mlflow": ("mlflow", "mlflow"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
    "trackio": ("trackio", "trackio"),
}


def trackers(log_with: str) -> list[str]:
    """The trackers of train.log_with ("tensorboard", "wandb", "tensorboard+wandb", "none"); a ConfigError names
    an unknown one or the `pip install` that a missing one needs."""
    import importlib.util

    from uda.config import ConfigError

    names = [n.strip() for n in log_with.replace(",", "+").split("+") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"train.log_with={log_with}: unknown tracker {name!r}; choose from none, {', '.join(TRACKERS)}"
            )
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"train.log_with={name} needs the {package} package: pip install {package} (or train.log_with=none)"
            )
    return names


def launcher_precision(requested: str) -> tuple[str, str | None]:
    """train.mixed_precision after `accelerate launch --mixed_precision X` (env ACCELERATE_MIXED_PRECISION): the
    config's explicit value wins; with "auto" (not set) the launcher's fp16/bf16/fp8 is taken. The launcher's
    "no" is not: accelerate writes it also when the flag is absent, so it cannot mean a choice (for fp32 set
    train.mixed_precision=no). (precision, message)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if requested != "auto" or launched not in ("fp16", "bf16", "fp8"):
        return requested, None
    return launched, f"mixed precision: {launched} (from accelerate launch)"


def make_accelerator(train, project_dir: str):
    """The run's Accelerator: mixed precision from the config, else from `accelerate launch --mixed_precision`,
    else chosen for the device (said by the first process); the model compiled through accelerate's dynamo
    plugin with train.compile; the trackers of train.log_with logging under project_dir."""
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    log_with = trackers(train.log_with)
    # The device the Accelerator will pick, found without initialising accelerate's process-wide state (a
    # PartialState made here, before the Accelerator, would not see the launcher's CPU processes).
    use_cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
    gpu = None if use_cpu else torch.accelerator.current_accelerator()
    precision, launched = launcher_precision(train.mixed_precision)
    precision, message = choose_mixed_precision(precision, gpu or torch.device("cpu"))
    if os.environ.get("RANK", "0") == "0":
        for line in (launched, message):
            if line:
                log_line(line)
    if train.compile:
        set_compile_memory_budget(train.compile_memory_budget)
    if use_cpu and train.keep_cpu_memory:
        keep_freed_memory()
    return Accelerator(
        mixed_precision=precision,
        log_with=log_with or None,
        project_dir=project_dir,
        dynamo_backend="inductor" if train.compile else None,
    )


# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


@functools.cache
def keep_freed_memory() -> bool:
    """Let the process keep the memory it frees for its next allocations (glibc malloc; True when applied).

    By default glibc serves every block over 32 MiB with its own mmap and unmaps it on free; a training step on
    the CPU allocates and frees such activations by the dozen (a 64-channel map of a 256x512 batch of 2 is 64 MiB),
    so every step the kernel page-faults them in again, zeroing 4 KiB at a time. With mmap off for large blocks
    (M_MMAP_MAX 0) and no trimming of the heap's top (M_TRIM_THRESHOLD -1), freed blocks stay mapped and are
    reused: the ResNet-101 mTEB S-D step at 256x512 took 0.76x the time at the same peak memory on a 2-core EPYC.
    Blocks freed into the heap cannot always be reused by blocks of other sizes, so peak memory can grow (the
    exchange block alone at 512x1024: 1.4x its step memory; README's speed section). The memory goes back to the
    system when the process ends, as with GPU caching allocators. Process-wide and not undone here; with another C
    library (musl, macOS, Windows) nothing is changed (False).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1


def set_compile_memory_budget(budget: float) -> None:
    """The share (0, 1] of the activations that torch.compile's graphs keep for the backward pass; below 1 its
    partitioner recomputes the cheapest operations (by estimated FLOPs) instead of keeping their outputs.
    Process-wide (torch._functorch.config), read when a graph is compiled."""
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = budget


def log_line(message: str) -> None:
    """An information line for the run log (train.log and the console once a run's log is set up; the console
    alone before)."""
    logger = logging.getLogger("uda")
    if logger.handlers:
        logger.info(message)
    else:
        print(message, flush=True)


def autocast_off(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on `device` (a no-op for device types without autocast)."""
    kind = torch.device(device).type
    if kind in ("cpu", "cuda", "xpu", "mps"):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()
