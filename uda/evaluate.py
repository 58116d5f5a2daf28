"""Evaluation of a model on a split: predictions in metric units, streaming metrics reduced across processes,
metrics.json and a Markdown report that states every protocol choice."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from uda.config import EvalConfig
from uda.files import write_text_atomic
from uda.metrics import DepthMetric, MultiTaskMetrics
from uda.tasks import OutputSpace, to_predictions


def protocol(
    eval_cfg: EvalConfig, dataset: str, split: str, label_set: str, checkpoint: str
) -> dict[str, Any]:
    """Every choice that changes a reported number, logged with the number."""
    return {
        "dataset": dataset,
        "split": split,
        "label_set": label_set,
        "checkpoint": checkpoint,
        "output_scale": eval_cfg.scale,
        "ground_truth_resolution": "native label files" if eval_cfg.label_resolution else "working size",
        "depth_cap_m": [eval_cfg.min_depth, eval_cfg.max_depth],
        "median_scaling": eval_cfg.median_scaling,
        "aggregation": "per-image mean" if eval_cfg.per_image else "per-pixel over the split",
        "edge_metric": eval_cfg.edge_metric,
        # The tolerance odsF matches with (F1 has none: its configured value, normally None, as before).
        "edge_max_dist": edge_max_dist(eval_cfg, dataset)
        if eval_cfg.edge_metric == "odsf"
        else eval_cfg.edge_max_dist,
    }


def edge_max_dist(eval_cfg: EvalConfig, dataset: str | None) -> float:
    """The odsF matching tolerance, a fraction of the image diagonal: eval.edge_max_dist when set, else the
    literature's value for `dataset` (uda.boundary.MAX_DIST), else NYUD-v2's 0.011 (BoundaryOdsF's default)."""
    from uda.boundary import MAX_DIST

    if eval_cfg.edge_max_dist is not None:
        return eval_cfg.edge_max_dist
    return MAX_DIST.get(dataset or "", MAX_DIST["nyudv2"])


def build_metrics(
    tasks: Sequence[str],
    eval_cfg: EvalConfig,
    space: OutputSpace,
    device: torch.device | str = "cpu",
    dataset: str | None = None,
) -> MultiTaskMetrics:
    """The streaming metrics of `tasks` under the protocol of eval_cfg (class count from `space`, the human-part
    classes of uda.tasks.num_parts(), the edge metric and its tolerance, edge_max_dist(eval_cfg, dataset))."""
    from uda.tasks import num_parts

    return MultiTaskMetrics(
        tasks,
        num_classes=space.num_classes,
        min_depth=eval_cfg.min_depth,
        max_depth=eval_cfg.max_depth,
        median_scaling=eval_cfg.median_scaling,
        per_image=eval_cfg.per_image,
        device=torch.device(device),
        num_parts=num_parts(),
        edge_metric=eval_cfg.edge_metric,
        edge_max_dist=edge_max_dist(eval_cfg, dataset),
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, Any]],
    tasks: Sequence[str],
    eval_cfg: EvalConfig,
    space: OutputSpace,
    reduce: Callable[[dict], dict] | None = None,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
    progress: bool = False,
    on_first_batch: Callable[[Mapping[str, Any], dict[str, torch.Tensor]], None] | None = None,
    domain: int = 0,
    dataset: str | None = None,
) -> dict[str, float]:
    """Run the model over batches and return flat metrics ("semseg/miou", "depth/rmse", ...); `space` says how
    the raw outputs map to sample units (class count, depth parametrisation). `domain` 1: the batches are of the
    run's target domain (its BatchNorm target statistics normalise them when it keeps them, train.bn_mode=domain).
    `dataset` (its odsF tolerance, see edge_max_dist) defaults to the one the first batch's `meta` names.

    `reduce` sums the metric state across processes (e.g. lambda s: accelerator.reduce(s, "sum")).
    """
    from uda.data.loader import move_to
    from uda.models.domain_bn import bn_domain

    was_training = model.training
    model.eval()
    metrics = build_metrics(tasks, eval_cfg, space, device, dataset)
    # With median scaling, absolute (unscaled) depth errors are reported too (depth_unscaled/*), and so are
    # those of a constant prediction under the same protocol (depth_constant/*): the floor to beat.
    unscaled = constant = None
    if eval_cfg.median_scaling and "depth" in tasks:
        args = (eval_cfg.min_depth, eval_cfg.max_depth)
        unscaled = DepthMetric(*args, False, eval_cfg.per_image, torch.device(device))
        constant = DepthMetric(*args, True, eval_cfg.per_image, torch.device(device))
    with bn_domain(model, domain):  # the whole split is of one domain
        for i, batch in enumerate(tqdm(batches, desc="evaluate", leave=False, disable=not progress)):
            if max_batches is not None and i >= max_batches:
                break
            if i == 0 and dataset is None and batch.get("meta"):
                # The readers name their dataset in each sample's meta (validation during training passes none).
                metrics = build_metrics(tasks, eval_cfg, space, device, batch["meta"][0].get("dataset"))
            batch = move_to(batch, device)
            outputs = model(batch["image"])
            preds = to_predictions(outputs, eval_cfg.scale, space, tasks)
            metrics.update(preds, batch)
            if unscaled is not None:
                unscaled.update(preds["depth"], batch["depth"])
                constant.update(torch.ones_like(preds["depth"]), batch["depth"])
            if i == 0 and on_first_batch is not None:
                on_first_batch(batch, preds)
    if reduce is not None:
        metrics.sync(reduce)
        if unscaled is not None:
            unscaled.sync(reduce)
            constant.sync(reduce)
    model.train(was_training)
    results = metrics.compute()
    if unscaled is not None:
        results.update({f"depth_unscaled/{k}": v for k, v in unscaled.compute().items()})
        results.update(
            {f"depth_constant/{k}": v for k, v in constant.compute().items() if k != "median_scale"}
        )
    if eval_cfg.subset_classes and "semseg" in tasks:
        results["semseg/miou_subset"] = metrics.segmentation.miou_subset(list(eval_cfg.subset_classes))
    return results


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.2f}"


def _part_names() -> Sequence[str]:
    """The class names of the parts task (its own label set, uda.tasks.PARTS_LABEL_SET)."""
    from uda.data.labels import get_label_set
    from uda.tasks import PARTS_LABEL_SET

    return get_label_set(PARTS_LABEL_SET).class_names


def write_report(
    out_dir: str | Path,
    title: str,
    results: Mapping[str, Mapping[str, float]],
    protocols: Mapping[str, Mapping[str, Any]],
    class_names: Sequence[str] | None = None,
    extra: Mapping[str, Any] | None = None,
    images: Sequence[str] = (),
    history: Sequence[Mapping[str, Any]] | None = None,
    figures: Sequence[str] = (),
) -> Path:
    """Write metrics.json and report.md (main metrics, per-class IoU of each task: semseg named by `class_names`,
    parts by their own label set; protocol) into out_dir; a training run adds
    its validation `history` (metrics.json and a table) and `figures` (curve PNGs relative to out_dir)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"results": results, "protocol": protocols, **(extra or {})}
    write_json_atomic(
        out_dir / "metrics.json", {**record, "history": history} if history is not None else record
    )
    lines = [f"# {title}", ""]
    for name, metrics in results.items():
        lines += [f"## {name}", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            if "/iou/" not in key:
                lines.append(f"| {key} | {_fmt(value)} |")
        # One table per task: parts IoU ("parts/iou/<c>") are of the human-part classes, not the semantic ones.
        per_class: dict[str, dict[int, float]] = {}
        for key, value in metrics.items():
            if "/iou/" in key:
                task, _, idx = key.partition("/iou/")
                per_class.setdefault(task, {})[int(idx)] = value
        for task, ious in per_class.items():
            names = class_names if task == "semseg" else _part_names() if task == "parts" else None
            lines += ["", f"| {task} class | IoU |", "|---|---|"]
            for idx, value in ious.items():
                label = names[idx] if names and idx < len(names) else str(idx)
                lines.append(f"| {label} | {_fmt(value)} |")
        lines += ["", "Protocol:", ""]
        lines += [f"- {k}: {v}" for k, v in protocols.get(name, {}).items()]
        lines.append("")
    if extra:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in extra.items()] + [""]
    if history or figures:
        from uda.runlog import history_table

        lines += ["## Validation history", "", history_table(history or ()), ""]
        lines += [f"![{Path(p).stem}]({p})" for p in figures] + [""]
    if images:
        lines += ["## Prediction images", ""] + [f"![{Path(p).stem}]({p})" for p in images] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its newest complete checkpoint) or a checkpoint folder itself."""
    from uda.checkpoint import CHECKPOINTS, STATE_FILE, complete_checkpoints

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such run folder; pass the folder a training run wrote (its --out) or one of its "
            f"{CHECKPOINTS}/step-*/ folders"
        )
    if (path / STATE_FILE).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"{path}: no complete checkpoint (expected {path / CHECKPOINTS}/step-*/{STATE_FILE}); train the run "
            "with train.ckpt_every > 0 or until its end, or pass a checkpoint folder"
        )
    return found[0]


def load_trained_model(path: str | Path) -> tuple[Any, torch.nn.Module, Path]:
    """(config, model with trained weights, checkpoint folder) from a run or checkpoint folder.

    Weights are read with safetensors (no code is executed); missing or unexpected keys are an error that
    names them, since a checkpoint of another model config cannot be evaluated as this one.
    """
    from safetensors.torch import load_file

    from uda.checkpoint import STATE_FILE, CheckpointError, check_files
    from uda.config import ExperimentConfig, from_dict
    from uda.data.labels import get_label_set
    from uda.models import build_model
    from uda.tasks import task_channels

    ckpt = find_checkpoint(path)
    state_file = ckpt / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
        cfg = from_dict(ExperimentConfig, state["config"])
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, no config, or a config this code refuses
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"{state_file}: cannot read the run's config ({reason}); "
            "the checkpoint is damaged or from another version of uda, pass an older checkpoint folder"
        ) from None
    model_cfg = replace(cfg.model, pretrained=False)
    copy = ckpt.parent.parent / "normal_clusters.json"  # ATRC runs keep their normals' centroids there
    if model_cfg.normal_clusters and not Path(model_cfg.normal_clusters).is_file() and copy.is_file():
        model_cfg = replace(model_cfg, normal_clusters=str(copy))
    model = build_model(
        model_cfg,
        task_channels(tuple(cfg.tasks), get_label_set(cfg.data.label_set).num_classes),
    )
    weights = ckpt / "model.safetensors"
    # The weights' size and SHA-256 as recorded at save time (the optimiser and RNG files are not needed here).
    record = state.get("files") if isinstance(state, dict) else None
    if isinstance(record, Mapping) and weights.name in record:
        try:
            check_files(ckpt, {"files": {weights.name: record[weights.name]}})
        except CheckpointError as exc:
            reason = str(exc).removeprefix(f"{weights}: ")
            raise ValueError(
                f"{weights}: cannot read weights ({reason}); the checkpoint is damaged, use an older one"
            ) from None
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ValueError(
            f"{weights}: cannot read weights ({exc}); the checkpoint is damaged, use an older one"
        ) from None
    if cfg.train.bn_mode == "domain" and any(k.endswith(".target_running_mean") for k in tensors):
        from uda.models.domain_bn import add_domain_statistics

        add_domain_statistics(model)  # the run kept target BatchNorm statistics (it trained on target images)
    check_state_dict(model, tensors, weights)
    model.load_state_dict(tensors)
    return cfg, model, ckpt


def check_state_dict(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse weights whose keys or shapes differ from the model's, naming the first mismatches."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})")
        raise ValueError(
            f"{source}: weights do not fit this model config ({'; '.join(parts)}); "
            "evaluate with the config the checkpoint was trained with"
        )
