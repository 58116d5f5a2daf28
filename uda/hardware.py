"""What the machine can do fast: CPU instruction sets and the mixed precision that pays on a device."""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

import torch

# The fp32 step time that bf16 autocast costs on CPUs without AMX (tools/benchmark.py, step bench):
# a 2-core AMD EPYC with AVX2 only: 12-16x (ResNet-18 toy step; the convolutions fall to a slow reference kernel);
# a 2-core Intel Xeon with AVX-512 BF16 but no AMX: 1.36x (ResNet-101 mTEB S-D step at 256x512, batch 2).
BF16_SLOWDOWN_AVX2 = 16
BF16_SLOWDOWN_AVX512_BF16 = 1.36


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


def cpu_supports_bf16(flags: frozenset[str] | None = None) -> bool:
    """True where bf16 autocast pays on this CPU: it has AMX-BF16 tiles (oneDNN's bf16 convolutions and
    matrix products). AVX-512 BF16 alone computes bf16 but measured slower than fp32 (1.36x the step)."""
    flags = cpu_flags() if flags is None else flags
    return "amx_bf16" in flags


def choose_mixed_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The precision to train with for `requested` ("auto", "no", "fp16", "bf16") on `device`, and a message:
    what auto chose and why, or a warning for a request that will be slow. auto: bf16 on GPUs and CPUs that
    support it, fp16 (with a gradient scaler) on older GPUs, fp32 ("no") otherwise."""
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
    flags = cpu_flags()
    native = cpu_supports_bf16(flags)
    if requested == "auto":
        why = "the CPU has AMX-BF16" if native else "the CPU has no AMX-BF16"
        return (
            "bf16" if native else "no"
        ), f"train.mixed_precision=auto: {'bf16' if native else 'fp32'} ({why})"
    if requested == "bf16" and not native:
        cost = BF16_SLOWDOWN_AVX512_BF16 if "avx512_bf16" in flags else BF16_SLOWDOWN_AVX2
        kind = "AVX-512 BF16 but no AMX" if "avx512_bf16" in flags else "no AVX-512 BF16 or AMX"
        return requested, (
            f"warning: train.mixed_precision=bf16 on a CPU with {kind}: bf16 autocast measured {cost}x the fp32 "
            "step time on such a CPU; use train.mixed_precision=auto or no"
        )
    if requested == "fp16":
        return (
            requested,
            "warning: train.mixed_precision=fp16 has no CPU autocast in accelerate: the run is fp32",
        )
    return requested, None


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
    return Accelerator(
        mixed_precision=precision,
        log_with=log_with or None,
        project_dir=project_dir,
        dynamo_backend="inductor" if train.compile else None,
    )


def log_line(message: str) -> None:
    """An information line for the run log (train.log and the console once a run's log is set up; the console
    alone before)."""
    logger = logging.getLogger("uda")
    if logger.handlers:
        logger.info(message)
    else:
        print(message, flush=True)
