"""The toy PASCAL-Context: street scenes of the SYNTHIA-like renderer written in the multi-task PASCAL-Context
layout (ASTMT / MTI-Net / ATRC "PASCALContext" folder), with every file in the real format:

    JPEGImages/<id>.jpg                     the image (landscape or portrait, at most 94 px a side at height 256)
    semseg/pascal-context/<id>.png          21 classes: 0 background, VOC ids (person 15, car 7, bus 6, ...)
    pascal-context/trainval/<id>.mat        'LabelMap': context class ids (json/context_classes.json)
    human_parts/<id>.mat                    PASCAL-Part 'anno' struct: objects (class, class_ind, mask, parts)
    sal_distill/<id>.png                    saliency 0 / 255: people, riders and vehicles
    normals_distill/<id>.png                camera-frame normals as (n + 1) * 127.5 RGB (exact, from the ray caster)
    json/context_classes.json, json/nyu_classes.json    the class tables that select the pixels with normals
    ImageSets/Context/train.txt, val.txt

Human parts come from the person primitives (a body cylinder and a head ellipsoid): the head ellipsoid is the
head; on the body, heights below 0.42 m are lower legs, up to 0.85 m (where the renderer switches from trousers
to shirt) upper legs, above it the torso, except the outer sides of the cylinder as seen from the camera
(more than 0.55 of its radius off the axis), which are the arms (upper above the middle of the shirt, lower
below). Riders get head, torso and arms. The part names written are PASCAL-Part's (luarm, rlleg, ...), left and
right by the side of the axis, so the reader's grouping is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from scipy.io import savemat

from uda.data.toy.render import camera_effects, cast, shade
from uda.data.toy.scene import (
    BICYCLE,
    BUS,
    CAR,
    CLASS_NAMES,
    ELLIPSOID,
    MOTORCYCLE,
    PERSON,
    REAL_INTRINSICS,
    RIDER,
    SKY,
    TRUCK,
    VAN,
    camera_pose,
    rng_for,
    street_for,
)

PASCAL_SEED_OFFSET = 7919  # other streets than the SYNTHIA-like and NYUDv2-like sets of the same seed
LEG_SPLIT, SHIRT_FROM = (
    0.42,
    0.85,
)  # metres above the ground: lower/upper legs, trousers/shirt (render par[0])
ARM_OFFSET = 0.55  # fraction of the body radius off the axis (across the view) where the arms begin
JPEG_QUALITY = 92

# VOC ids of the 21-class semseg per internal class (0 background).
VOC_OF_CLASS = np.zeros(len(CLASS_NAMES), np.uint8)
VOC_OF_CLASS[[PERSON, RIDER]] = 15
VOC_OF_CLASS[[CAR, VAN]] = 7
VOC_OF_CLASS[BUS] = 6
VOC_OF_CLASS[MOTORCYCLE] = 14
VOC_OF_CLASS[BICYCLE] = 2
SALIENT = (PERSON, RIDER, CAR, VAN, TRUCK, BUS, MOTORCYCLE, BICYCLE)

# The toy's context class table: PASCAL-Context's ids for the classes whose id is known (person 284, car 59,
# ...), toy-only ids from 460 (above the real 459) for the others. Internal class -> context name.
CONTEXT_NAME = {
    "road": "road", "sidewalk": "sidewalk", "building": "building", "wall": "wall", "fence": "fence",
    "pole": "pole", "traffic light": "traffic light", "traffic sign": "sign", "vegetation": "plant",
    "tree": "tree", "terrain": "grass", "sky": "sky", "person": "person", "rider": "person", "car": "car",
    "van": "car", "truck": "truck", "bus": "bus", "motorcycle": "motorbike", "bicycle": "bicycle",
    "misc": "unknown", "ego vehicle": "unknown",
}  # fmt: skip
CONTEXT_IDS = {
    "person": 284, "car": 59, "bus": 45, "motorbike": 258, "bicycle": 23, "truck": 424, "tree": 420,
    "wall": 440, "unknown": 431, "road": 460, "sidewalk": 461, "building": 462, "fence": 463, "pole": 464,
    "traffic light": 465, "sign": 466, "plant": 467, "grass": 468, "sky": 469,
}  # fmt: skip
# Names the toy's "NYUDv2 normal estimator" knows: not sky, trees, plants or grass, so normals have holes there.
NYU_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "sign", "person", "car", "truck",
    "bus", "motorbike", "bicycle", "unknown",
)  # fmt: skip
CONTEXT_OF_CLASS = np.array([CONTEXT_IDS[CONTEXT_NAME[n]] for n in CLASS_NAMES], np.int32)


def pascal_context_size(height: int, index: int) -> tuple[int, int]:
    """(height, width) of toy PASCAL-Context image `index`: long side 2 * round(height * 47 / 256) (94 px at the
    default 256, as PASCAL's 500 px to its 512 pad), short side 3/4 of it; every third image is portrait."""
    long = 2 * round(height * 47 / 256)
    short = 2 * round(long * 0.375)
    return (long, short) if index % 3 == 2 else (short, long)


def pascal_context_id(index: int) -> str:
    """The PASCAL-style id of toy image `index`, e.g. 2008_000007."""
    return f"2008_{index:06d}"


def _camera(h: int, w: int) -> np.ndarray:
    """Square pixels at SYNTHIA's vertical field of view, principal point in the middle."""
    (fx, _, _, _), (_, rh) = REAL_INTRINSICS["synthia"]
    f = fx * max(h, w) / rh
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float32)


def _parts(street, pose: np.ndarray, depth: np.ndarray, hit: np.ndarray, d: np.ndarray) -> tuple:
    """Part ids [h,w] (human_parts7: 1 head .. 6 lower legs, 0 elsewhere) and the side [h,w] (+1 / -1 of the body
    axis across the view) of every person and rider pixel."""
    h, w = depth.shape
    prim = np.maximum(hit, 0)
    person = (hit >= 0) & np.isin(street.cls[prim], (PERSON, RIDER))
    parts = np.zeros((h, w), np.uint8)
    side = np.zeros((h, w), np.int8)
    if not person.any():
        return parts, side
    idx = np.flatnonzero(person.ravel())
    p = d[:, idx] * depth.ravel()[idx] + pose[:3, 3:]  # world hit points [3,k]
    k = prim.ravel()[idx]
    lo, hi = street.lo[k], street.hi[k]
    height = -p[1]
    centre = (lo + hi) / 2
    right = pose[:3, 0] / max(float(np.hypot(pose[0, 0], pose[2, 0])), 1e-6)
    lateral = (p[0] - centre[:, 0]) * right[0] + (p[2] - centre[:, 2]) * right[2]
    radius = (hi[:, 0] - lo[:, 0]) / 2
    top = -lo[:, 1]  # top of the body cylinder
    arm = np.abs(lateral) > ARM_OFFSET * radius
    pedestrian = street.cls[k] == PERSON
    shirt_from = np.where(pedestrian, SHIRT_FROM, -hi[:, 1])  # riders: the whole body cylinder is shirt
    upper = height > (shirt_from + top) / 2
    ids = np.select(
        [
            street.kind[k] == ELLIPSOID,
            pedestrian & (height < LEG_SPLIT),
            pedestrian & (height < SHIRT_FROM),
            arm & upper,
            arm,
        ],
        [1, 6, 5, 3, 4],
        2,
    )
    parts.ravel()[idx] = ids
    side.ravel()[idx] = np.where(lateral >= 0, 1, -1)
    return parts, side


_PART_NAMES = {  # part id -> PASCAL-Part names for side -1, +1
    1: ("head", "head"), 2: ("torso", "torso"), 3: ("luarm", "ruarm"), 4: ("llarm", "rlarm"),
    5: ("luleg", "ruleg"), 6: ("llleg", "rlleg"),
}  # fmt: skip


def _anno(name: str, classes: np.ndarray, instance: np.ndarray, parts: np.ndarray, side: np.ndarray) -> dict:
    """The PASCAL-Part 'anno' struct: imname and objects (class, class_ind, mask, parts) for every person and
    rider (class 15, with parts) and every vehicle (its VOC class, no parts)."""
    objects = []
    for inst in np.unique(instance[instance > 0]):
        mask = instance == inst
        cls = int(np.bincount(classes[mask]).argmax())
        voc = int(VOC_OF_CLASS[cls])
        if voc == 0:
            continue
        part_rows = []
        if voc == 15:
            for pid, names in _PART_NAMES.items():
                sides = ((0, names[0]),) if names[0] == names[1] else ((-1, names[0]), (1, names[1]))
                for sd, pname in sides:
                    m = mask & (parts == pid) & ((side == sd) if sd else True)
                    if m.any():
                        part_rows.append((pname, m.astype(np.uint8)))
        part_arr = np.empty((1, len(part_rows)), dtype=[("part_name", "O"), ("mask", "O")])
        for j, (pname, m) in enumerate(part_rows):
            part_arr[0, j] = (pname, m)
        objects.append(("person" if voc == 15 else "vehicle", voc, mask.astype(np.uint8), part_arr))
    obj_arr = np.empty(
        (1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    )
    for j, row in enumerate(objects):
        obj_arr[0, j] = row
    return {"imname": name, "objects": obj_arr}


MAT_HEADER = b"MATLAB 5.0 MAT-file, written by uda.data.toy"


def _fixed_header(path: Path) -> None:
    """Replace the creation time in a MAT-file's 116-byte text header by a fixed text, so that the toy data is
    bit-identical for a seed (scipy writes time.asctime() there; MATLAB and loadmat ignore the text)."""
    with path.open("r+b") as f:
        f.write(MAT_HEADER.ljust(116, b" "))


def write_pascal_context(out: Path, index: int, seed: int, height: int, width: int) -> None:
    """Render toy PASCAL-Context image `index` and write all its files under out (the dataset folder)."""
    h, w = pascal_context_size(height, index)
    s = seed + PASCAL_SEED_OFFSET
    street = street_for("synthia", index, s)
    pose = camera_pose("synthia", index, 0, s, street)
    K = _camera(h, w)
    depth, hit, d = cast(street, pose, K, h, w, ego=False)
    linear, classes, normals = shade("synthia", street, pose, K, depth, hit, d)
    image = camera_effects("synthia", linear, rng_for(s, "synthia", index, 2, 1000))
    instance = np.where(hit >= 0, street.inst[np.maximum(hit, 0)], 0).astype(np.int32)
    parts, side = _parts(street, pose, depth, hit, d)
    name = pascal_context_id(index)

    def png(rel: str, array: np.ndarray) -> None:
        path = out / rel / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), array):
            raise OSError(f"{path}: cv2.imwrite failed; check that the folder is writable")

    jpg = out / "JPEGImages" / f"{name}.jpg"
    jpg.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    jpg.write_bytes(buf.tobytes())
    png("semseg/pascal-context", VOC_OF_CLASS[classes])
    png("sal_distill", np.where(np.isin(classes, SALIENT), 255, 0).astype(np.uint8))
    rgb = np.where((classes == SKY)[..., None], 0, np.round((normals + 1) * 127.5)).astype(np.uint8)
    png("normals_distill", rgb[..., ::-1])
    for rel, data in (
        ("pascal-context/trainval", {"LabelMap": CONTEXT_OF_CLASS[classes].astype(np.uint16)}),
        ("human_parts", {"anno": _anno(name, classes, instance, parts, side)}),
    ):
        path = out / rel / f"{name}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        savemat(str(path), data, do_compression=True)
        _fixed_header(path)


def write_pascal_context_tables(out: Path, frames: int, split: dict[str, list[str]]) -> None:
    """json/context_classes.json, json/nyu_classes.json and ImageSets/Context/<split>.txt of the toy set."""
    (out / "json").mkdir(parents=True, exist_ok=True)
    (out / "json" / "context_classes.json").write_text(
        json.dumps(CONTEXT_IDS, indent=1, sort_keys=True) + "\n"
    )
    nyu = {n: i + 1 for i, n in enumerate(NYU_NAMES)}
    (out / "json" / "nyu_classes.json").write_text(json.dumps(nyu, indent=1, sort_keys=True) + "\n")
    folder = out / "ImageSets" / "Context"
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in split.items():
        (folder / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
