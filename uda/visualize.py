"""Prediction images: input, ground truth and prediction for every task, side by side in one PNG per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def _to_hw(t: torch.Tensor, size: tuple[int, int], nearest: bool) -> torch.Tensor:
    """Resize a [C,H,W] tensor to size (nearest for labels, bilinear otherwise)."""
    if tuple(t.shape[-2:]) == size:
        return t
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False}
    return F.interpolate(t[None].float(), size=size, mode=mode, **kwargs)[0]


def image_rgb(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] -> uint8 [H,W,3]."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def depth_rgb(depth: torch.Tensor, max_depth: float = 80.0) -> np.ndarray:
    """Metric depth [1,H,W] -> magma colour map on inverse depth (near = bright); 0 (no measurement) is black."""
    d = depth.detach().float()[0].cpu().numpy()
    valid = d > 0
    inv = np.where(valid, 1.0 / np.clip(d, 1e-3, None), 0.0)
    scale = np.percentile(inv[valid], 95) if valid.any() else 1.0
    grey = (np.clip(inv / max(scale, 1.0 / max_depth), 0, 1) * 255).astype(np.uint8)
    rgb = cv2.applyColorMap(grey, cv2.COLORMAP_MAGMA)[..., ::-1].copy()
    rgb[~valid] = 0
    return rgb


def normals_rgb(normals: torch.Tensor) -> np.ndarray:
    """Unit normals [3,H,W] -> RGB (n+1)/2; unknown (zero) normals are black."""
    n = normals.detach().float()
    norm = n.norm(dim=0, keepdim=True)
    rgb = torch.where(norm > 0.5, (n / norm.clamp_min(1e-6) + 1) / 2, torch.zeros_like(n))
    return image_rgb(rgb)


def edges_rgb(edges: torch.Tensor) -> np.ndarray:
    """Edge probability or label [1,H,W] in [0,1] -> grey RGB."""
    return image_rgb(edges.detach().float().clamp(0, 1).expand(3, -1, -1))


def task_rgb(task: str, value: torch.Tensor, label_set=None) -> np.ndarray:
    """One task map (ground truth or prediction already converted: labels, metres, unit normals, probabilities)."""
    if task == "semseg":
        return label_set.colorize(value.detach().cpu().numpy().astype(np.int64))
    if task == "depth":
        return depth_rgb(value)
    if task == "normals":
        return normals_rgb(value)
    if task == "edges":
        return edges_rgb(value)
    raise ValueError(f"unknown task {task!r}")


def _label(img: np.ndarray, text: str) -> np.ndarray:
    out = img.copy()
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def prediction_panel(
    image: torch.Tensor,
    targets: Mapping[str, torch.Tensor],
    predictions: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    label_set=None,
) -> np.ndarray:
    """One sample as a grid: the input on top, then per task the ground truth (left) and prediction (right).

    Maps are per sample: semseg [H,W] class ids, depth [1,H,W] metres, normals [3,H,W], edges [1,H,W].
    """
    size = tuple(image.shape[-2:])

    def tile(task: str, value: torch.Tensor, name: str) -> np.ndarray:
        value = _to_hw(value[None] if task == "semseg" else value, size, nearest=True)
        return _label(task_rgb(task, value[0] if task == "semseg" else value, label_set), name)

    rgb = image_rgb(image)
    rows = [np.concatenate([_label(rgb, "input"), np.zeros_like(rgb)], axis=1)]
    for task in tasks:
        gt = tile(task, targets[task], f"{task} gt") if task in targets else np.zeros_like(rgb)
        rows.append(np.concatenate([gt, tile(task, predictions[task], f"{task} pred")], axis=1))
    return np.concatenate(rows, axis=0)


def save_prediction_images(
    folder: str | Path,
    prefix: str,
    batch: Mapping,
    predictions: Mapping[str, torch.Tensor],
    tasks: Sequence[str],
    label_set=None,
    max_images: int = 2,
) -> list[Path]:
    """Write one panel PNG per sample (at most max_images) and return the paths.

    `predictions` are batched in sample units (semseg logits [B,C,H,W], metres, unit normals, edge prob).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(max_images, batch["image"].shape[0])):
        targets = {t: batch[t][i] for t in tasks if t in batch}
        preds = {t: predictions[t][i].argmax(0) if t == "semseg" else predictions[t][i] for t in tasks}
        panel = prediction_panel(batch["image"][i], targets, preds, tasks, label_set)
        path = folder / f"{prefix}_{i}.png"
        cv2.imwrite(str(path), panel[..., ::-1])
        paths.append(path)
    return paths
