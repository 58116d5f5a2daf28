"""Per-domain BatchNorm statistics (`train.bn_mode=domain`): AdaBN (Li et al., 2016) kept during training.

A network trained on source images normalises target images with source statistics. On a domain gap of colour
and contrast every BatchNorm layer then shifts the target's features, and a whole class can fall into another
(on the toy SYNTHIA -> Cityscapes data the source-only mTEB model labels 94-99 % of the target's vegetation
"building"; the same weights with target statistics label most of it vegetation). With per-domain statistics
every BatchNorm layer keeps a second set of running statistics, moved only by target images (the target
stream; self-training's mixed images, half source, are normalised as target images but move nothing) and used
whenever the network sees the target (the teacher's pseudo-labels, validation, `uda-evaluate` and
`uda-export`). The affine parameters stay shared, as in AdaBN (DSBN, Chang et al. 2019, also splits them).

    add_domain_statistics(model)        # every BatchNorm layer gets target_running_mean/var/num_batches_tracked
    with bn_domain(model, 1):           # target statistics for this forward (train: updated; eval: used)
        outputs = model(target_images)

The target statistics start as copies of the source ones. A state dict without them (a source-only run used as
`train.init_from`) fills them from its source statistics, and the engine then measures them on target training
images before the first step (`estimate_target_statistics`, `train.adabn_images`): otherwise they would need
tens of steps to leave the source values, and an EMA teacher, which averages them too, hundreds. Within
`bn_domain(model, 1)` the two sets swap places in each layer's buffers, so any BatchNorm class (torch's,
SyncBatchNorm, timm's BatchNormAct2d) runs its own forward unchanged, and nothing is paid per layer outside the
context.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "STATS",
    "add_domain_statistics",
    "bn_domain",
    "estimate_target_statistics",
    "has_domain_statistics",
    "keep_target_statistics",
    "measure_target_statistics",
    "needs_target_statistics",
]

# (source buffer, target buffer) names in each BatchNorm layer
STATS = (
    ("running_mean", "target_running_mean"),
    ("running_var", "target_running_var"),
    ("num_batches_tracked", "target_num_batches_tracked"),
)


def _layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def _fill_target_from_source(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: a state dict without target statistics (a run without them) gives its source
    statistics to both domains, and the layer is marked (`needs_target_statistics`)."""
    for source, target in STATS:
        if prefix + target not in state_dict and prefix + source in state_dict:
            state_dict[prefix + target] = state_dict[prefix + source].clone()
            module._target_from_source = True


def needs_target_statistics(model: nn.Module) -> bool:
    """Whether weights loaded into `model` lacked target statistics, so that its target statistics are still
    the source ones (estimate_target_statistics measures them)."""
    return any(getattr(layer, "_target_from_source", False) for layer in _layers(model))


@torch.no_grad()
def estimate_target_statistics(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """AdaBN: replace the target statistics of every BatchNorm layer by the average over the target batches of
    `batches` (image tensors [B,3,H,W]) of their batch means and variances (BatchNorm with momentum None, as
    Precise-BN: the variance each batch was normalised with in training, not the pooled variance of all the
    images, which adds the spread of the batch means), the model in training mode without gradients. The global RNG (dropout draws) is left as it
    was, so the run's own random stream does not depend on this. Returns the number of images."""
    layers = [m for m in _layers(model) if hasattr(m, "target_running_mean")]
    momenta = [m.momentum for m in layers]
    was_training = model.training
    seen = 0
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices), bn_domain(model, 1):
        for m in layers:
            m.reset_running_stats()  # the target's, swapped in
            m.momentum = None
        model.train()
        for images in batches:
            model(images)
            seen += images.shape[0]
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
        m._target_from_source = False
    model.train(was_training)
    return seen


def add_domain_statistics(model: nn.Module) -> int:
    """Give every BatchNorm layer of `model` (that tracks running statistics) target-domain statistics, copies of
    its current ones; returns the number of layers. Idempotent."""
    layers = _layers(model)
    for layer in layers:
        if hasattr(layer, "target_running_mean"):
            continue
        for source, target in STATS:
            layer.register_buffer(target, getattr(layer, source).clone())
        layer.register_load_state_dict_pre_hook(_fill_target_from_source)
    return len(layers)


def has_domain_statistics(model: nn.Module) -> bool:
    """Whether `model`'s BatchNorm layers keep target statistics (add_domain_statistics was applied)."""
    return any(hasattr(layer, "target_running_mean") for layer in _layers(model))


def _swap(layers: list[_BatchNorm]) -> None:
    for layer in layers:
        buffers = layer._buffers
        for source, target in STATS:
            buffers[source], buffers[target] = buffers[target], buffers[source]
        layer._bn_domain = 1 - getattr(layer, "_bn_domain", 0)


@contextlib.contextmanager
def bn_domain(model: nn.Module, domain: int, track: bool = True) -> Iterator[None]:
    """Forward `model` with the BatchNorm statistics of `domain` (0 source, 1 target) inside the block: in
    training mode the batch is normalised by its own statistics and moves that domain's running ones (unless
    `track` is False: images that are not purely of the domain, e.g. self-training's mixed images, leave them
    as they are); in eval mode that domain's running statistics normalise it. A model without target
    statistics ignores both arguments; blocks nest (the inner one wins, the outer one's domain comes back at its
    end)."""
    if domain not in (0, 1):
        raise ValueError(f"bn_domain: domain must be 0 (source) or 1 (target), got {domain}")
    split = [m for m in _layers(model) if hasattr(m, "target_running_mean")]
    layers = [m for m in split if getattr(m, "_bn_domain", 0) != domain]
    _swap(layers)
    # momentum 0 keeps the running statistics exactly; the batch counter is put back after
    kept = [] if track else [(m, m.momentum, m.num_batches_tracked.clone()) for m in split]
    for m, _, _ in kept:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in kept:
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        _swap(layers)


def keep_target_statistics(model: nn.Module, data, log) -> None:
    """The engine's model under train.bn_mode=domain with target images to train on (data: the run's
    uda.data.streams.RunData, `target_statistics`): add the target statistics, before init_from loads weights."""
    if data.target_statistics:
        log.info(
            f"train.bn_mode=domain: {add_domain_statistics(model)} BatchNorm layers keep target statistics"
        )


def measure_target_statistics(model: nn.Module, cfg, data, accelerator, log) -> None:
    """The engine's start under train.bn_mode=domain from weights without target statistics (init_from a
    source-only run): estimate them on cfg.train.adabn_images target training images spread over the split
    (data: the run's uda.data.streams.RunData), before the teacher copies the model. Otherwise nothing."""
    if cfg.train.adabn_images == 0 or not needs_target_statistics(model):
        return
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    loader = data.spread_images(cfg.target, cfg.train.adabn_images)
    images = (b["image"].to(accelerator.device, memory_format=fmt) for b in loader)
    with accelerator.autocast():
        seen = estimate_target_statistics(model, images)
    log.info(
        f"train.bn_mode=domain: target BatchNorm statistics measured on {seen} {cfg.target.dataset} images"
    )
