"""Writers of the toy datasets in the real SYNTHIA, Cityscapes and VKITTI2 on-disk formats, and the driver."""

from __future__ import annotations

import ctypes
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from uda.data.splits import split_ids, write_split_files
from uda.data.toy.pascal import (
    pascal_context_id,
    pascal_context_size,
    write_pascal_context,
    write_pascal_context_tables,
)
from uda.data.toy.render import render, render_frame
from uda.data.toy.scene import (
    CS_BASELINE,
    CS_LABELLED_FRAME,
    CS_MAX_DEPTH,
    CS_MIN_DISPARITY,
    CS_TRAIN_CITIES,
    CS_VAL_CITY,
    DOMAINS,
    EGO,
    SKY,
    SKY_DEPTH,
    VERSION,
    VK_BASELINE,
    VK_FRAMES_PER_SCENE,
    VKITTI2_CATEGORIES,
    camera_pose,
    check_size,
    domain_size,
    intrinsics,
    rng_for,
    street_for,
    street_of,
)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), array):
        raise OSError(f"{path}: cv2.imwrite failed; check that the folder is writable")


def _centimetres(depth: np.ndarray) -> np.ndarray:
    """Depth in metres -> uint16 centimetres, clipped to 65535 (the SYNTHIA and VKITTI2 encoding)."""
    return np.clip(np.round(depth.astype(np.float64) * 100), 0, 65535).astype(np.uint16)


def _write_synthia(out: Path, index: int, seed: int, height: int, width: int) -> None:
    f = render_frame("synthia", index, seed, height, width)
    name = f"{index:07d}.png"
    _write_png(out / "RGB" / name, f["image"][..., ::-1])
    label = np.zeros(f["label"].shape + (3,), np.uint16)
    label[..., 2] = f["label"]  # cv2 writes BGR: array channel 2 is the PNG's first (R) channel
    label[..., 1] = f["instance"]
    _write_png(out / "GT" / "LABELS" / name, label)
    # three equal 16-bit channels: cv2.IMREAD_ANYDEPTH (grey) and any single channel give the centimetres
    _write_png(out / "Depth" / "Depth" / name, np.repeat(_centimetres(f["depth"])[..., None], 3, axis=2))


def cityscapes_disparity(
    depth: np.ndarray, classes: np.ndarray, fx: float, rng: np.random.Generator
) -> np.ndarray:
    """Cityscapes disparity PNG values uint16 (disparity px * 256 + 1; 0 = invalid) from depth in metres.

    Invalid as in SGM output: sky, ego vehicle, beyond CS_MAX_DEPTH or below CS_MIN_DISPARITY, a left
    border without a match in the right image, and a few random holes.
    """
    h, w = depth.shape
    disp = CS_BASELINE * fx / depth.astype(np.float64)
    valid = (classes != SKY) & (classes != EGO) & (depth <= CS_MAX_DEPTH) & (disp >= CS_MIN_DISPARITY)
    valid[:, : max(1, round(0.04 * w))] = False
    holes = np.zeros((h, w), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        centre = (int(rng.integers(w)), int(rng.integers(h // 3, h)))
        axes = (int(rng.integers(2, max(3, w // 30))), int(rng.integers(2, max(3, h // 30))))
        cv2.ellipse(holes, centre, axes, 0, 0, 360, 1, -1)
    valid &= holes == 0
    return np.where(valid, np.clip(np.round(disp * 256) + 1, 1, 65535), 0).astype(np.uint16)


def cityscapes_name(index: int) -> tuple[str, str, int]:
    """(split, city, sequence number) of Cityscapes labelled frame `index`: every 5th frame is val."""
    if index % 5 == 4:
        return "val", CS_VAL_CITY, index
    return "train", CS_TRAIN_CITIES[(index % 5) % len(CS_TRAIN_CITIES)], index


def _write_cityscapes(
    out: Path, index: int, seed: int, height: int, width: int, sequence: bool = True
) -> None:
    split, city, seq = cityscapes_name(index)
    f = render_frame("cityscapes", index, seed, height, width)
    stem = f"{city}_{seq:06d}_{CS_LABELLED_FRAME:06d}"
    sub = Path(split) / city
    _write_png(out / "leftImg8bit" / sub / f"{stem}_leftImg8bit.png", f["image"][..., ::-1])
    _write_png(out / "gtFine" / sub / f"{stem}_gtFine_labelIds.png", f["label"].astype(np.uint8))
    K = f["K"]
    disp = cityscapes_disparity(
        f["depth"], f["classes"], float(K[0, 0]), rng_for(seed, "cityscapes", index, 3)
    )
    _write_png(out / "disparity" / sub / f"{stem}_disparity.png", disp)
    forward = f["pose"][:3, 2]
    camera = {
        "extrinsic": {"baseline": CS_BASELINE, "pitch": math.asin(float(forward[1])), "roll": 0.0, "x": 1.7,
                      "y": 0.1, "yaw": 0.0, "z": float(-f["pose"][1, 3])},
        "intrinsic": {"fx": float(K[0, 0]), "fy": float(K[1, 1]), "u0": float(K[0, 2]), "v0": float(K[1, 2])},
    }  # fmt: skip
    path = out / "camera" / sub / f"{stem}_camera.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(camera, indent=4) + "\n")
    if sequence:
        _write_cityscapes_sequence(out, index, seed, height, width, labelled=f["image"])


def _write_cityscapes_sequence(
    out: Path, index: int, seed: int, height: int, width: int, labelled: np.ndarray | None = None
) -> None:
    """leftImg8bit_sequence: the frames before and after labelled frame `index`, and the labelled frame itself
    (as in the real dataset; copied from leftImg8bit when not given)."""
    split, city, seq = cityscapes_name(index)
    sub = Path(split) / city
    for offset in (-1, 0, 1):
        name = f"{city}_{seq:06d}_{CS_LABELLED_FRAME + offset:06d}_leftImg8bit.png"
        path = out / "leftImg8bit_sequence" / sub / name
        if offset == 0 and labelled is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stem = f"{city}_{seq:06d}_{CS_LABELLED_FRAME:06d}"
            shutil.copyfile(out / "leftImg8bit" / sub / f"{stem}_leftImg8bit.png", path)
            continue
        img = (
            labelled
            if offset == 0
            else render_frame("cityscapes", index, seed, height, width, offset)["image"]
        )
        _write_png(path, img[..., ::-1])


def vkitti2_name(index: int) -> tuple[str, int]:
    """(scene folder, frame number) of VKITTI2 labelled frame `index`, e.g. ("Scene01", 42)."""
    scene, frame = street_of("vkitti2", index)
    return f"Scene{scene + 1:02d}", frame


def _write_vkitti2(out: Path, index: int, seed: int, height: int, width: int) -> None:
    scene, frame = vkitti2_name(index)
    h, w = domain_size("vkitti2", height, width)
    f, jpeg = render("vkitti2", index, seed, h, w, 0)
    root = out / scene / "clone" / "frames"
    path = root / "rgb" / "Camera_0" / f"rgb_{frame:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg)
    _write_png(root / "depth" / "Camera_0" / f"depth_{frame:05d}.png", _centimetres(f["depth"]))
    colours = np.array([c for _, c in VKITTI2_CATEGORIES], np.uint8)
    _write_png(
        root / "classSegmentation" / "Camera_0" / f"classgt_{frame:05d}.png", colours[f["label"]][..., ::-1]
    )


def _write_vkitti2_scene_files(out: Path, frames: int, seed: int, height: int, width: int) -> None:
    """colors.txt, intrinsic.txt and extrinsic.txt (world-to-camera, both cameras) of every scene."""
    h, w = domain_size("vkitti2", height, width)
    K = intrinsics("vkitti2", h, w)
    scenes: dict[str, list[int]] = {}
    for index in range(frames):
        scenes.setdefault(vkitti2_name(index)[0], []).append(index)
    colours = "Category r g b\n" + "".join(f"{n} {r} {g} {b}\n" for n, (r, g, b) in VKITTI2_CATEGORIES)
    for scene, indices in scenes.items():
        folder = out / scene / "clone"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "colors.txt").write_text(colours)
        intr = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
        extr = ["frame cameraID r1,1 r1,2 r1,3 t1 r2,1 r2,2 r2,3 t2 r3,1 r3,2 r3,3 t3 0 0 0 1"]
        street = street_for("vkitti2", indices[0], seed)
        for index in indices:
            frame = vkitti2_name(index)[1]
            world_to_cam = np.linalg.inv(camera_pose("vkitti2", index, 0, seed, street))
            for cam in (0, 1):
                m = world_to_cam.copy()
                m[0, 3] -= cam * VK_BASELINE  # Camera_1 sits VK_BASELINE to the right of Camera_0
                intr.append(f"{frame} {cam} {K[0, 0]:.6f} {K[1, 1]:.6f} {K[0, 2]:.6f} {K[1, 2]:.6f}")
                extr.append(f"{frame} {cam} " + " ".join(f"{x:.6f}" for x in m.ravel()))
        (folder / "intrinsic.txt").write_text("\n".join(intr) + "\n")
        (folder / "extrinsic.txt").write_text("\n".join(extr) + "\n")


# NYU40 ids (1..40, 0 = void) standing in for the street classes, in the order of CLASS_NAMES: the toy NYUDv2
# set is the SYNTHIA-like street renderer written in the NYUDv2 layout, so that the S-D-N-E recipe (normals
# and edges ground truth as files) runs without the real data. It is a format stand-in, not indoor scenes.
NYU40_OF_CLASS = np.array([2, 20, 1, 1, 38, 35, 35, 11, 40, 40, 20, 22, 31, 31, 39, 39, 3, 3, 5, 5, 40, 0])
NYU_SEED_OFFSET = 104729
# The rendered domains plus the NYUDv2- and PASCAL-Context-layout stand-ins (other streets than the SYNTHIA-like
# set of the same seed).
TOY_DATASETS = (*DOMAINS, "nyudv2", "pascal_context")


def nyudv2_size(height: int) -> tuple[int, int]:
    """(height, width) of toy NYUDv2 images: the real 448x576 aspect at the target height."""
    return height, 2 * round(height * 288 / 448)


def _write_nyudv2(out: Path, index: int, seed: int, height: int, width: int) -> None:
    h, w = nyudv2_size(height)
    f = render_frame("synthia", index, seed + NYU_SEED_OFFSET, height, width)  # SYNTHIA-like look and camera
    image = cv2.resize(f["image"], (w, h), interpolation=cv2.INTER_AREA)
    classes = cv2.resize(f["classes"].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    depth = cv2.resize(f["depth"], (w, h), interpolation=cv2.INTER_NEAREST)
    normals = cv2.resize(f["normals"], (w, h), interpolation=cv2.INTER_NEAREST)
    label = NYU40_OF_CLASS[classes].astype(np.uint8)
    name = f"{index:06d}"
    _write_png(out / "images" / f"{name}.png", image[..., ::-1])
    _write_png(out / "segmentation" / f"{name}.png", label)
    sky = depth >= SKY_DEPTH
    (out / "depth").mkdir(parents=True, exist_ok=True)
    np.save(out / "depth" / f"{name}.npy", np.where(sky, 0.0, depth).astype(np.float32))
    rgb = np.where(sky[..., None], 0, np.round((normals + 1) * 127.5)).astype(np.uint8)
    _write_png(out / "normals" / f"{name}.png", rgb[..., ::-1])
    edges = np.zeros(label.shape, bool)
    edges[1:] |= label[1:] != label[:-1]
    edges[:, 1:] |= label[:, 1:] != label[:, :-1]
    _write_png(out / "edge" / f"{name}.png", edges.astype(np.uint8) * 255)


# ----------------------------------------------------------------------------------------------- driver


def toy_size(dataset: str, height: int, width: int) -> tuple[int, int]:
    """(height, width) of a toy dataset's images (PASCAL-Context: its landscape images; portraits are turned)."""
    if dataset == "nyudv2":
        return nyudv2_size(height)
    if dataset == "pascal_context":
        return pascal_context_size(height, 0)
    return domain_size(dataset, height, width)


SEQUENCE = "cityscapes_sequence"  # Cityscapes' video frames (leftImg8bit_sequence), for self-supervised depth

_WRITERS = {
    "synthia": _write_synthia,
    "cityscapes": _write_cityscapes,
    "cityscapes-labelled": partial(_write_cityscapes, sequence=False),
    SEQUENCE: _write_cityscapes_sequence,
    "vkitti2": _write_vkitti2,
    "nyudv2": _write_nyudv2,
    "pascal_context": write_pascal_context,
}


def _task(args: tuple) -> str:
    out, domain, index, seed, height, width = args
    folder = "cityscapes" if domain.startswith("cityscapes") else domain
    _WRITERS[domain](Path(out) / folder, index, seed, height, width)
    return domain


def _worker_init() -> None:
    """Per worker: no OpenCV threads (one process per core already) and a malloc that keeps its memory."""
    cv2.setNumThreads(1)
    try:  # glibc returns every large numpy temporary to the OS; page-faulting it back costs ~15 % of the run
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):  # not glibc: keep the defaults
        pass


def make_toy_data(
    out: str | Path,
    frames: int = 240,
    height: int = 256,
    width: int = 512,
    seed: int = 0,
    domains: Sequence[str] = TOY_DATASETS,
    workers: int | None = None,
    progress: bool = True,
    extend: bool = False,
    sequences: bool = True,
) -> None:
    """Render `frames` labelled frames per domain and write them in the real on-disk formats under out/.

    height, width: the Cityscapes (target) size in pixels; sources use `domain_size`. Bit-identical for a
    given (seed, frames, size), domain by domain. Writes out/<domain>/..., split files, and out/toy_info.json
    last. An existing toy dataset in out/ is replaced; a folder with other data is never touched. With
    extend=True, a toy dataset of the same generator version, seed, frames and size keeps its domains and only
    the missing ones are rendered (a recipe renders just the datasets it reads). sequences=False leaves out
    Cityscapes' video frames (leftImg8bit_sequence, two extra renders per frame), which only self-supervised depth
    reads; a later call with sequences=True and extend=True adds them.
    """
    out = Path(out)
    domains = tuple(domains)
    for d in domains:
        if d not in TOY_DATASETS:
            raise ValueError(f"domain={d!r}: unknown toy dataset; use one of {', '.join(TOY_DATASETS)}")
    check_size(height, width)
    if frames < 1:
        raise ValueError(f"frames={frames}: need at least one labelled frame per domain")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers={workers}: need at least one worker process")
    info_path = out / "toy_info.json"
    kept: tuple[str, ...] = ()
    kept_sequence = False
    if extend and info_path.is_file():
        old = json.loads(info_path.read_text())
        same = {"version": VERSION, "seed": seed, "frames": frames, "target_size": [height, width]}
        if all(old.get(k) == v for k, v in same.items()):
            kept = tuple(d for d in old.get("domains", ()) if (out / d).is_dir())
            kept_sequence = "cityscapes" in kept and old.get(SEQUENCE, True)
    want_sequence = sequences and "cityscapes" in domains
    add_sequence = want_sequence and "cityscapes" in kept and not kept_sequence
    domains = tuple(d for d in domains if d not in kept)
    if kept and not domains and not add_sequence:
        return
    if kept:  # extend: the marker lists the complete parts; another toy folder is from an interrupted run
        for d in domains:
            shutil.rmtree(out / d, ignore_errors=True)
        if add_sequence:
            shutil.rmtree(out / "cityscapes" / "leftImg8bit_sequence", ignore_errors=True)
    elif info_path.is_file():  # a toy dataset: replace it whole
        info_path.unlink()  # written last, so its presence means a complete dataset
        for d in TOY_DATASETS:
            shutil.rmtree(out / d, ignore_errors=True)
    for d in domains:
        if (out / d).exists():
            raise FileExistsError(
                f"{out / d}: exists but {info_path} does not (not toy data, or an interrupted run); "
                "delete it or pick another output folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    # interleave the domains so that every worker gets a similar mix of cheap and expensive frames
    parts = [d if d != "cityscapes" or want_sequence else "cityscapes-labelled" for d in domains]
    parts += [SEQUENCE] if add_sequence else []
    tasks = [(str(out), d, i, seed, height, width) for i in range(frames) for d in parts]
    with tqdm(total=len(tasks), desc="toy data", unit="frame", disable=not progress) as bar:
        if workers == 1:
            for t in tasks:
                _task(t)
                bar.update()
        else:
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            )
            with ctx.Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
                for _ in pool.imap_unordered(_task, tasks, chunksize=2):
                    bar.update()
    if "synthia" in domains:
        write_split_files(out / "synthia" / "splits", split_ids(f"{i:07d}" for i in range(frames)))
    if "nyudv2" in domains:  # the official NYUDv2 split is a file list: gt_sets/{train,val}.txt
        write_split_files(out / "nyudv2" / "gt_sets", split_ids(f"{i:06d}" for i in range(frames)))
    if "pascal_context" in domains:  # ImageSets/Context/{train,val}.txt and the normals' class tables
        ids = split_ids(pascal_context_id(i) for i in range(frames))
        write_pascal_context_tables(out / "pascal_context", frames, ids)
    if "vkitti2" in domains:
        _write_vkitti2_scene_files(out / "vkitti2", frames, seed, height, width)
        ids = [f"{s}/{f:05d}" for s, f in map(vkitti2_name, range(frames))]
        write_split_files(out / "vkitti2" / "splits", split_ids(ids))
    domains = tuple(d for d in TOY_DATASETS if d in kept or d in domains)
    info = {
        "generator": "uda.data.toy",
        "version": VERSION,
        "seed": seed,
        "frames": frames,
        "target_size": [height, width],
        "sizes": {d: list(toy_size(d, height, width)) for d in domains},
        "domains": list(domains),
        "sky_depth_m": SKY_DEPTH,
        SEQUENCE: bool(kept_sequence or want_sequence),  # each implies Cityscapes is there
        "vkitti2_frames_per_scene": VK_FRAMES_PER_SCENE,
    }
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(info_path)
