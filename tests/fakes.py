"""Tiny datasets written in the real on-disk formats (for reader and check_dataset tests).

Each make_* writes a dataset folder under root and returns the ground truth it encoded, in our units,
so tests compare what the readers decode against what was written.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from uda.data.labels import get_id_table
from uda.data.splits import write_split_files

CS_CAMERA = {"baseline": 0.209313, "fx": 2262.52, "fy": 2265.3017905988554, "u0": 1096.98, "v0": 513.137}


def write_png(path: Path, array: np.ndarray) -> None:
    """Write array with cv2 (BGR order for 3 channels), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path


def rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_synthia(root: Path, n: int = 5, h: int = 8, w: int = 12, seed: int = 0, splits: bool = True) -> dict:
    """SYNTHIA RAND_CITYSCAPES: RGB PNG, 16-bit label PNG (id in R, instance in G), 16-bit 3-channel depth in cm."""
    rng = np.random.default_rng(seed)
    gt = {}
    for k in range(n):
        id = f"{k:07d}"
        label = rng.integers(0, 23, (h, w)).astype(np.uint16)
        instance = rng.integers(256, 4000, (h, w)).astype(np.uint16)  # > 255, so 8-bit reading would show
        depth_cm = rng.integers(1, 60000, (h, w)).astype(np.uint16)
        write_png(root / "RGB" / f"{id}.png", rgb(rng, h, w)[:, :, ::-1])
        # File channels are R, G, B; cv2 writes BGR, so R (the class id) goes last.
        write_png(root / "GT" / "LABELS" / f"{id}.png", np.stack([np.zeros_like(label), instance, label], -1))
        write_png(root / "Depth" / "Depth" / f"{id}.png", np.stack([depth_cm] * 3, -1))
        gt[id] = {"label": label.astype(np.int64), "depth": depth_cm.astype(np.float64) / 100.0}
    if splits:
        ids = sorted(gt)
        write_split_files(root / "splits", {"train": ids[: n - 2], "val": ids[n - 2 :]})
    return gt


def cs_name(id: str, offset: int = 0) -> str:
    city_seq, frame = id.rsplit("_", 1)
    return f"{city_seq}_{int(frame) + offset:06d}"


def make_cityscapes(
    root: Path,
    split: str = "train",
    ids: tuple[str, ...] = ("aachen/aachen_000000_000019", "bochum/bochum_000000_000313"),
    h: int = 8,
    w: int = 16,
    seed: int = 0,
    disparity: bool = True,
    camera: dict | None = None,
    frames: tuple[int, ...] = (-1, 1),
) -> dict:
    """Cityscapes: leftImg8bit PNG, 8-bit labelIds, 16-bit disparity, camera json, sequence frames."""
    rng = np.random.default_rng(seed)
    camera = camera or CS_CAMERA
    gt = {}
    for id in ids:
        city = id.split("/")[0]
        label = rng.choice(np.arange(0, 34), (h, w)).astype(np.uint8)
        png = rng.integers(0, 30000, (h, w)).astype(np.uint16)
        png[0, :3] = [0, 1, 2]  # no measurement, zero disparity, smallest valid disparity
        image = rgb(rng, h, w)
        write_png(root / "leftImg8bit" / split / f"{id}_leftImg8bit.png", image[:, :, ::-1])
        write_png(root / "gtFine" / split / f"{id}_gtFine_labelIds.png", label)
        if disparity:
            write_png(root / "disparity" / split / f"{id}_disparity.png", png)
        cam = {
            "extrinsic": {
                "baseline": camera["baseline"],
                "pitch": 0.04,
                "roll": 0.0,
                "x": 1.7,
                "y": 0.0,
                "z": 1.2,
            },
            "intrinsic": {k: camera[k] for k in ("fx", "fy", "u0", "v0")},
        }
        (root / "camera" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "camera" / split / f"{id}_camera.json").write_text(json.dumps(cam))
        frame_images = {0: image}
        for k in frames:
            frame_images[k] = rgb(rng, h, w)
            path = (
                root
                / "leftImg8bit_sequence"
                / split
                / city
                / f"{cs_name(id.split('/')[1], k)}_leftImg8bit.png"
            )
            write_png(path, frame_images[k][:, :, ::-1])
        disp = (png.astype(np.float64) - 1.0) / 256.0
        depth = np.where(disp > 0, camera["baseline"] * camera["fx"] / np.where(disp > 0, disp, 1.0), 0.0)
        gt[id] = {"label": label.astype(np.int64), "depth": depth, "frames": frame_images}
    return gt


VK_CATEGORIES = [
    ("Terrain", (210, 0, 200)),
    ("Sky", (90, 200, 255)),
    ("Tree", (0, 199, 0)),
    ("Vegetation", (90, 240, 0)),
    ("Building", (140, 140, 140)),
    ("Road", (100, 60, 100)),
    ("GuardRail", (250, 100, 255)),
    ("TrafficSign", (255, 255, 0)),
    ("TrafficLight", (200, 200, 0)),
    ("Pole", (255, 130, 0)),
    ("Misc", (80, 80, 80)),
    ("Truck", (160, 60, 60)),
    ("Car", (255, 127, 80)),
    ("Van", (0, 139, 139)),
    ("Undefined", (0, 0, 0)),
]


def make_vkitti2(
    root: Path,
    scenes: dict[str, int] | None = None,
    variation: str = "clone",
    h: int = 6,
    w: int = 10,
    seed: int = 0,
    splits: bool = True,
) -> dict:
    """VKITTI2: rgb JPEG, colour classgt PNG, 16-bit depth PNG in cm (65535 = sky), colors.txt, intrinsic.txt."""
    rng = np.random.default_rng(seed)
    scenes = scenes or {"Scene01": 3, "Scene02": 2}
    ids_of = dict(zip(get_id_table("vkitti2").names, get_id_table("vkitti2").ids))
    gt = {}
    for scene, n in scenes.items():
        base = root / scene / variation
        base.mkdir(parents=True, exist_ok=True)
        # Written in a shuffled order: decoding must go by category name and colour, not by row.
        rows = [VK_CATEGORIES[i] for i in rng.permutation(len(VK_CATEGORIES))]
        (base / "colors.txt").write_text(
            "Category r g b\n" + "".join(f"{c} {r} {g} {b}\n" for c, (r, g, b) in rows)
        )
        lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
        for f in range(n):
            for cam in (0, 1):
                lines.append(f"{f} {cam} {700.0 + f + 10 * cam} {701.0 + f} {w / 2 + 0.5} {h / 2 + 0.25}")
        (base / "intrinsic.txt").write_text("\n".join(lines) + "\n")
        for f in range(n):
            id = f"{scene}/{f:05d}"
            cat = rng.integers(0, len(VK_CATEGORIES), (h, w))
            colors = np.array([c for _, c in VK_CATEGORIES], np.uint8)[cat]
            depth_cm = rng.integers(1, 65535, (h, w)).astype(np.uint16)
            depth_cm[0, 0] = 65535
            image = rgb(rng, h, w)
            write_png(base / "frames" / "rgb" / "Camera_0" / f"rgb_{f:05d}.jpg", image[:, :, ::-1])
            write_png(
                base / "frames" / "classSegmentation" / "Camera_0" / f"classgt_{f:05d}.png",
                colors[:, :, ::-1],
            )
            write_png(base / "frames" / "depth" / "Camera_0" / f"depth_{f:05d}.png", depth_cm)
            label = np.array([ids_of[VK_CATEGORIES[c][0]] for c in cat.ravel()]).reshape(h, w)
            depth = np.where(depth_cm == 65535, 0.0, depth_cm / 100.0)
            K = np.array([[700.0 + f, 0, w / 2 + 0.5], [0, 701.0 + f, h / 2 + 0.25], [0, 0, 1]])
            gt[id] = {"label": label, "depth": depth, "K": K}
    if splits:
        ids = sorted(gt)
        write_split_files(root / "splits", {"train": ids[:-1], "val": ids[-1:]})
    return gt


def make_nyudv2(
    root: Path, ids: tuple[str, ...] = ("0001", "0002", "0003"), h: int = 6, w: int = 8, seed: int = 0
) -> dict:
    """NYUDv2 (ATRC layout): images PNG, segmentation PNG (0 void, 1..40), depth .npy (m), normals PNG, edge PNG."""
    rng = np.random.default_rng(seed)
    gt = {}
    for id in ids:
        label = rng.integers(0, 41, (h, w)).astype(np.uint8)
        depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
        depth[0, 0] = np.nan
        n = rng.normal(size=(3, h, w))
        n /= np.linalg.norm(n, axis=0, keepdims=True)
        normals_png = np.round((n + 1.0) / 2.0 * 255.0).astype(np.uint8).transpose(1, 2, 0)
        normals_png[0, 0] = 0  # black: no normal
        edge = (rng.random((h, w)) < 0.3).astype(np.uint8) * 255
        write_png(root / "images" / f"{id}.png", rgb(rng, h, w))
        write_png(root / "segmentation" / f"{id}.png", label)
        (root / "depth").mkdir(parents=True, exist_ok=True)
        np.save(root / "depth" / f"{id}.npy", depth)
        write_png(root / "normals" / f"{id}.png", normals_png[:, :, ::-1])
        write_png(root / "edge" / f"{id}.png", edge)
        gt[id] = {"label": label.astype(np.int64), "depth": depth, "normals": n, "edges": edge > 0}
    (root / "gt_sets").mkdir(parents=True, exist_ok=True)
    (root / "gt_sets" / "train.txt").write_text("\n".join(ids[:-1]) + "\n")
    (root / "gt_sets" / "val.txt").write_text(ids[-1] + "\n")
    return gt


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
