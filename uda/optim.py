"""The model's optimiser: its parameter groups and rates, and its settings on resume."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from uda.config import ExperimentConfig


def build_optimizer(cfg: ExperimentConfig, model, objectives, weighting) -> torch.optim.Optimizer:
    """Adam or SGD over the model's groups (backbone, decoder, ATRC's architecture logits), the objectives'
    groups trained with the model (e.g. the pose net) and the weighting's learnt weights, each at its rate."""
    groups = model.param_groups()
    param_groups = [
        {"params": groups["backbone"], "lr": cfg.optim.lr_backbone},
        {"params": groups["decoder"], "lr": cfg.optim.lr_decoder},
        *(
            [{"params": groups["architecture"], "lr": cfg.optim.lr_architecture or cfg.optim.lr_decoder}]
            if groups.get("architecture")
            else []
        ),
        *(group for o in objectives for group in o.param_groups()),
        *weighting.param_groups(cfg.loss.weighting_lr),
    ]
    o, fused = cfg.optim, cfg.optim.fused or None
    if o.optimizer == "adam":
        return torch.optim.Adam(param_groups, betas=o.betas, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(param_groups, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)


@contextlib.contextmanager
def settings_kept(optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[None]:
    """Keep the optimisers' group settings (betas, weight decay, momentum, ...) across a checkpoint load:
    load_state_dict puts back the saved ones, and a changed config would be ignored. The states (moments,
    step counts) are the checkpoint's."""
    saved = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
    yield
    for opt, groups in zip(optimizers, saved, strict=True):
        for group, values in zip(opt.param_groups, groups, strict=True):
            group.update(values)
