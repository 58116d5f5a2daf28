"""Shareable trained models: weights-only safetensors plus the model config (written by `uda-export`), and
`load_pretrained` that builds the model from that config and loads the weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

FORMAT = "uda-pretrained"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def export_pretrained(run: str | Path, out: str | Path, statistics: str = "target") -> Path:
    """Write the model of a run or checkpoint folder (its newest complete checkpoint) to `out`: model.safetensors
    (weights only) and config.json (model config, tasks and output channels, label set and class names, depth
    parametrisation, the checkpoint it came from). A run with per-domain BatchNorm statistics
    (train.bn_mode=domain) is exported with one set, `statistics` "target" (what its target evaluation used)
    or "source", named in config.json as bn_statistics. Returns `out`."""
    from safetensors.torch import save_file

    from uda.config import to_dict
    from uda.data.labels import get_label_set
    from uda.evaluate import load_trained_model
    from uda.models.domain_bn import STATS, has_domain_statistics
    from uda.tasks import task_channels

    if statistics not in ("source", "target"):
        raise ValueError(f"statistics={statistics!r}: choose source or target")
    cfg, model, ckpt = load_trained_model(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    label_set = get_label_set(cfg.data.label_set)
    config = {
        "format": FORMAT,
        "version": 1,
        "name": cfg.name,
        "tasks": list(cfg.tasks),
        "channels": task_channels(tuple(cfg.tasks), label_set.num_classes),
        "model": to_dict(replace(cfg.model, pretrained=False, weights_path=None)),
        "label_set": cfg.data.label_set,
        "class_names": list(label_set.class_names),
        "d_far": cfg.loss.d_far,
        "checkpoint": f"{ckpt.parent.parent.name}/{ckpt.parent.name}/{ckpt.name}",
        "step": json.loads((ckpt / "trainer_state.json").read_text())["step"],
    }
    state = model.state_dict()
    if has_domain_statistics(model):
        config["bn_statistics"] = statistics
        for key in [k for k in state if any(k.endswith("." + target) for _, target in STATS)]:
            head, _, leaf = key.rpartition(".")
            value = state.pop(key)
            if statistics == "target":
                state[f"{head}.{leaf.removeprefix('target_')}"] = value
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": FORMAT})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_pretrained_config(path: str | Path) -> dict[str, Any]:
    """config.json of an exported model (folder, or its model.safetensors)."""
    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{folder / CONFIG}: cannot read ({exc}); pass a folder written by uda-export"
        ) from None
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG}: not a uda-export config (format {config.get('format')!r})")
    return config


def load_pretrained(path: str | Path, device: str = "cpu") -> nn.Module:
    """The model of an exported folder (or its model.safetensors), built from its config, with its weights, in
    eval mode. Outputs are {task: {scale: tensor}} as the training model's."""
    from safetensors.torch import load_file

    from uda.config import ModelConfig, from_dict
    from uda.evaluate import check_state_dict
    from uda.models.multitask import build_model

    path = Path(path)
    folder = path.parent if path.suffix == ".safetensors" else path
    config = read_pretrained_config(folder)
    model_cfg = from_dict(ModelConfig, config["model"])
    tensors = load_file(str(folder / WEIGHTS), device=device)
    centroids = [v for k, v in tensors.items() if k.rpartition(".")[2] == "normal_centroids"]
    if model_cfg.normal_clusters is not None and centroids:
        # ATRC's normals centroids are a buffer of the weights: build with that many placeholder directions
        # rather than re-read model.normal_clusters (a file of the training machine); the load restores them.
        model_cfg = replace(model_cfg, normal_clusters=None, atrc_normal_clusters=len(centroids[0]))
    model = build_model(model_cfg, config["channels"])
    check_state_dict(model, tensors, folder / WEIGHTS)
    model.load_state_dict(tensors)
    model.pretrained_config = config  # tasks, class names, depth parametrisation
    return model.to(device).eval()
