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


def depth_scale(depth: torch.Tensor, max_depth: float = 80.0) -> float:
    """The inverse depth (1/m) drawn brightest: the 95th percentile of the valid pixels (at least 1/max_depth)."""
    d = depth.detach().float()[0].cpu().numpy()
    valid = d > 0
    scale = float(np.percentile(1.0 / np.clip(d[valid], 1e-3, None), 95)) if valid.any() else 1.0
    return max(scale, 1.0 / max_depth)


def depth_rgb(depth: torch.Tensor, max_depth: float = 80.0, scale: float | None = None) -> np.ndarray:
    """Metric depth [1,H,W] -> magma colour map on inverse depth (near = bright, 1/scale metres and nearer at the
    top of the map); 0 (no measurement) is black. scale: see depth_scale (default: this map's own)."""
    d = depth.detach().float()[0].cpu().numpy()
    valid = d > 0
    inv = np.where(valid, 1.0 / np.clip(d, 1e-3, None), 0.0)
    scale = depth_scale(depth, max_depth) if scale is None else scale
    grey = (np.clip(inv / scale, 0, 1) * 255).astype(np.uint8)
    rgb = cv2.applyColorMap(grey, cv2.COLORMAP_MAGMA)[..., ::-1].copy()
    rgb[~valid] = 0
    return rgb


def depth_colorbar(width: int, scale: float, height: int = 26) -> np.ndarray:
    """A magma bar for depth_rgb at `scale`, labelled in metres (far on the left, near on the right)."""
    bar = np.full((height, width, 3), 255, np.uint8)
    grey = np.linspace(0, 255, width - 8).astype(np.uint8)[None].repeat(10, 0)
    bar[2:12, 4:-4] = cv2.applyColorMap(grey, cv2.COLORMAP_MAGMA)[..., ::-1]
    for fraction in (0.125, 0.25, 0.5, 1.0):
        x = 4 + int(round(fraction * (width - 9)))
        text = f"{1.0 / (fraction * scale):.3g}m"
        cv2.putText(bar, text, (min(x - 10, width - 34), 23), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 0, 0), 1)
    return bar


def class_legend(width: int, label_set, classes: Sequence[int]) -> np.ndarray:
    """Colour swatches with the names of `classes` (ids of label_set), a few per line."""
    per_line = max(1, width // 90)
    lines = max(1, -(-len(classes) // per_line))
    legend = np.full((lines * 13 + 4, width, 3), 255, np.uint8)
    for k, c in enumerate(classes):
        x, y = 4 + (k % per_line) * (width // per_line), 3 + (k // per_line) * 13
        legend[y : y + 9, x : x + 9] = label_set.colors[c]
        name = label_set.class_names[c][: max(4, (width // per_line - 14) // 5)]  # ~5 px a character
        cv2.putText(legend, name, (x + 12, y + 8), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (0, 0, 0), 1, cv2.LINE_AA)
    return legend


def normals_rgb(normals: torch.Tensor) -> np.ndarray:
    """Unit normals [3,H,W] -> RGB (n+1)/2; unknown (zero) normals are black."""
    n = normals.detach().float()
    norm = n.norm(dim=0, keepdim=True)
    rgb = torch.where(norm > 0.5, (n / norm.clamp_min(1e-6) + 1) / 2, torch.zeros_like(n))
    return image_rgb(rgb)


def edges_rgb(edges: torch.Tensor) -> np.ndarray:
    """Edge (or saliency) probability or label [1,H,W] in [0,1] -> grey RGB; padding (255) is dark blue."""
    e = edges.detach().float()
    rgb = image_rgb(torch.where(e > 1, torch.zeros_like(e), e).clamp(0, 1).expand(3, -1, -1))
    rgb[(e[0] > 1).cpu().numpy()] = (0, 0, 96)
    return rgb


def parts_rgb(parts: torch.Tensor) -> np.ndarray:
    """Human-part ids [H,W] -> the colours of the human_parts7 label set (ignore 255 is black)."""
    from uda.data.labels import get_label_set
    from uda.tasks import PARTS_LABEL_SET

    return get_label_set(PARTS_LABEL_SET).colorize(parts.detach().cpu().numpy().astype(np.int64))


def task_rgb(task: str, value: torch.Tensor, label_set=None, depth_scale: float | None = None) -> np.ndarray:
    """One task map (ground truth or prediction already converted: labels, metres, unit normals, probabilities)."""
    if task == "semseg":
        return label_set.colorize(value.detach().cpu().numpy().astype(np.int64))
    if task == "parts":
        return parts_rgb(value)

    if task == "depth":
        return depth_rgb(value, scale=depth_scale)
    if task == "normals":
        return normals_rgb(value)
    if task in ("edges", "saliency"):
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
    """One sample as a grid: the input on top, then per task the ground truth (left) and prediction (right); under
    segmentation a legend of the classes shown, under depth a colour bar in metres (both maps share it).

    Maps are per sample: semseg and parts [H,W] class ids, depth [1,H,W] metres, normals [3,H,W], edges and
    saliency [1,H,W].
    """
    size = tuple(image.shape[-2:])
    scale = depth_scale(targets.get("depth", predictions.get("depth"))) if "depth" in tasks else None

    def tile(task: str, value: torch.Tensor, name: str) -> np.ndarray:
        ids = task in ("semseg", "parts")  # [H,W] class-id maps
        value = _to_hw(value[None] if ids else value, size, nearest=True)
        return _label(task_rgb(task, value[0] if ids else value, label_set, scale), name)

    rgb = image_rgb(image)
    rows = [np.concatenate([_label(rgb, "input"), np.zeros_like(rgb)], axis=1)]
    for task in tasks:
        gt = tile(task, targets[task], f"{task} gt") if task in targets else np.zeros_like(rgb)
        rows.append(np.concatenate([gt, tile(task, predictions[task], f"{task} pred")], axis=1))
        if task == "semseg" and label_set is not None:
            shown = torch.cat([predictions[task].flatten(), targets.get(task, predictions[task]).flatten()])
            classes = [int(c) for c in shown.unique() if 0 <= int(c) < label_set.num_classes]
            rows.append(class_legend(2 * rgb.shape[1], label_set, classes))
        if task == "depth":
            rows.append(depth_colorbar(2 * rgb.shape[1], scale))
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

    `predictions` are batched in sample units (semseg and parts logits [B,C,H,W], metres, unit normals, edge and
    saliency probabilities).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(min(max_images, batch["image"].shape[0])):
        targets = {t: batch[t][i] for t in tasks if t in batch}
        preds = {
            t: predictions[t][i].argmax(0) if t in ("semseg", "parts") else predictions[t][i] for t in tasks
        }
        panel = prediction_panel(batch["image"][i], targets, preds, tasks, label_set)
        path = folder / f"{prefix}_{i}.png"
        cv2.imwrite(str(path), panel[..., ::-1])
        paths.append(path)
    return paths
