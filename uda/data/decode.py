"""Decoding of the datasets' on-disk file formats into numpy arrays in our units (metres, class ids, pixels).

Every function takes a path and raises DataError with a one-line message naming that file and the fix.
The dataset readers and tools/check_dataset.py both use these functions, so a file that passes the check
is a file the readers can load.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# cv2 would otherwise start its own thread pool in every DataLoader worker.
cv2.setNumThreads(0)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8"


class DataError(ValueError):
    """A problem with a dataset file or folder; the message is one line naming the file and the fix."""


# ---------------------------------------------------------------------------------------------------------
# Generic image files
# ---------------------------------------------------------------------------------------------------------


def _read_checked_bytes(path: Path, what: str) -> bytes:
    """The bytes of an image file, refusing missing, empty and truncated PNG/JPEG files."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing {what} file (partial dataset?); re-extract the dataset or fix the split file"
        )
    data = path.read_bytes()
    # cv2 decodes a truncated JPEG with only a warning, so check the end-of-image markers ourselves.
    if data.startswith(PNG_SIGNATURE):
        if b"IEND" not in data[-16:]:
            raise DataError(f"{path}: truncated PNG ({what}); re-extract or re-download the file")
    elif data.startswith(JPEG_SIGNATURE):
        if b"\xff\xd9" not in data[-1024:]:
            raise DataError(f"{path}: truncated JPEG ({what}); re-extract or re-download the file")
    elif not data:
        raise DataError(f"{path}: empty {what} file; re-extract or re-download the file")
    return data


def read_raw(path: str | Path, what: str = "image") -> np.ndarray:
    """Decode an image file as stored (cv2 IMREAD_UNCHANGED: BGR channel order, 8 or 16 bit)."""
    path = Path(path)
    return _imdecode(path, _read_checked_bytes(path, what), what)


def _imdecode(path: Path, data: bytes, what: str) -> np.ndarray:
    """Decode the bytes of an image file as stored (cv2 IMREAD_UNCHANGED)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise DataError(f"{path}: unreadable {what} (corrupt file?); re-extract or re-download the file")
    return image


def _is_palette_png(data: bytes) -> bool:
    """True for a palette-indexed PNG (IHDR colour type 3), whose pixels are indices into a colour table."""
    return data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) > 25 and data[25] == 3


def _palette_indices(path: Path, data: bytes, what: str) -> np.ndarray:
    """The palette indices uint8 [H,W] of a palette-indexed PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image)  # mode "P": the indices, not their colours
    except (OSError, SyntaxError, ValueError):
        raise DataError(
            f"{path}: unreadable {what} (corrupt file?); re-extract or re-download the file"
        ) from None


def read_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit colour image as uint8 RGB [H,W,3]."""
    path = Path(path)
    image = read_raw(path, "image")
    if image.dtype != np.uint8:
        raise DataError(
            f"{path}: image is {image.dtype}, expected 8-bit RGB; convert it to an 8-bit PNG/JPEG"
        )
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    # IMREAD_UNCHANGED keeps BGR(A); drop alpha and reverse to RGB.
    return np.ascontiguousarray(image[:, :, 2::-1])


def read_png16(path: str | Path, what: str) -> np.ndarray:
    """A 16-bit PNG as uint16 [H,W]; a multi-channel file gives its first (R) channel."""
    path = Path(path)
    image = read_raw(path, what)
    if image.dtype != np.uint16:
        raise DataError(
            f"{path}: {what} PNG is {8 * image.dtype.itemsize}-bit, expected 16-bit; "
            "use the original files (an 8-bit copy has lost the values)"
        )
    # cv2 stores colour as BGR(A), so the first (R) channel of the file is index 2.
    return image[:, :, 2] if image.ndim == 3 else image


def read_label8(path: str | Path, what: str = "label") -> np.ndarray:
    """A single-channel 8-bit label PNG as uint8 [H,W] (Cityscapes labelIds, NYUDv2 segmentation), or the
    indices of a palette-indexed one (VOC-style labels: the index is the class id, the palette its colour)."""
    path = Path(path)
    data = _read_checked_bytes(path, what)
    # cv2 would expand the palette to BGR colours, losing the ids.
    image = _palette_indices(path, data, what) if _is_palette_png(data) else _imdecode(path, data, what)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise DataError(
            f"{path}: {what} PNG must be single-channel 8-bit ids, got {image.dtype} with shape {image.shape}; "
            "use the id PNGs, not the colour visualisations"
        )
    return image


def check_same_size(
    path: Path, shape: tuple[int, ...], image_shape: tuple[int, ...], image_path: Path
) -> None:
    """Refuse ground truth whose [H,W] differs from the image's."""
    if tuple(shape[:2]) != tuple(image_shape[:2]):
        raise DataError(
            f"{path}: size {shape[1]}x{shape[0]} differs from image {image_path.name} "
            f"({image_shape[1]}x{image_shape[0]}); use files of the same resolution"
        )


def intrinsics(fx: float, fy: float, cx: float, cy: float, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    """Pixel intrinsics K float32 [3,3], optionally for the image resized by (sx, sy) (new size / old size).

    The principal point follows the pixel-centre convention of uda.geometry.resize_intrinsics (pixel edges
    scale, centres sit half a pixel inside them): a stored downscaled copy gets the K that resizing the
    full-size image in the transforms would give.
    """
    # Unscaled values are kept bit for bit.
    cx = float(cx) if sx == 1 else (float(cx) + 0.5) * sx - 0.5
    cy = float(cy) if sy == 1 else (float(cy) + 0.5) * sy - 0.5
    return np.array([[fx * sx, 0.0, cx], [0.0, fy * sy, cy], [0.0, 0.0, 1.0]], np.float32)


def semantic_edges(label: np.ndarray) -> np.ndarray:
    """Semantic edges float32 [H,W]: 1 where a 4-neighbour has a different label (2 px wide lines), else 0."""
    edges = np.zeros(label.shape, bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    # Mark both sides of every boundary so that the result does not depend on the scan direction.
    edges[1:, :] |= dy
    edges[:-1, :] |= dy
    edges[:, 1:] |= dx
    edges[:, :-1] |= dx
    return edges.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# SYNTHIA RAND_CITYSCAPES
# ---------------------------------------------------------------------------------------------------------

SYNTHIA_FULL_SIZE = (1280, 760)  # width, height at which the intrinsics below hold
SYNTHIA_INTRINSICS = (532.740352, 532.740352, 640.0, 380.0)  # fx, fy, u0, v0


def synthia_label(path: str | Path) -> np.ndarray:
    """SYNTHIA class ids [H,W] from GT/LABELS: a 16-bit PNG with the class id in the R channel (G holds instances).

    A single-channel PNG (e.g. pre-parsed labels) is taken as ids directly; an 8-bit colour PNG is refused
    because it is the GT/COLOR visualisation or an 8-bit re-save that lost the ids.
    """
    path = Path(path)
    image = read_raw(path, "label")
    if image.ndim == 3 and image.dtype != np.uint16:
        raise DataError(
            f"{path}: label PNG is 8-bit colour, expected SYNTHIA's 16-bit GT/LABELS (id in R); "
            "use GT/LABELS, not GT/COLOR or an 8-bit copy"
        )
    return image[:, :, 2] if image.ndim == 3 else image


def synthia_depth(path: str | Path) -> np.ndarray:
    """SYNTHIA depth in metres float32 [H,W]: 16-bit PNG in centimetres (3 identical channels; we read R)."""
    return read_png16(path, "depth").astype(np.float32) * 0.01


def synthia_intrinsics(width: int, height: int) -> np.ndarray:
    """SYNTHIA K for an image of width x height (the published 1280x760 intrinsics, scaled)."""
    return intrinsics(*SYNTHIA_INTRINSICS, width / SYNTHIA_FULL_SIZE[0], height / SYNTHIA_FULL_SIZE[1])


# ---------------------------------------------------------------------------------------------------------
# Cityscapes
# ---------------------------------------------------------------------------------------------------------

CITYSCAPES_FULL_SIZE = (2048, 1024)
# Fallback when a sample has no camera json (semantic segmentation only): the typical values at 2048x1024.
CITYSCAPES_INTRINSICS = (2262.52, 2265.3017905988554, 1096.98, 513.137)


def cityscapes_camera(path: str | Path) -> dict[str, float]:
    """fx, fy, u0, v0 (pixels) and baseline (metres) from a Cityscapes *_camera.json."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing camera file (partial dataset?); extract camera_trainvaltest.zip")
    try:
        data = json.loads(path.read_text())
        intr, extr = data["intrinsic"], data["extrinsic"]
        return {k: float(intr[k]) for k in ("fx", "fy", "u0", "v0")} | {"baseline": float(extr["baseline"])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: malformed camera json ({type(e).__name__}: {e}); re-extract the file"
        ) from None


def stored_intrinsics(
    fx: float, fy: float, cx: float, cy: float, width: int, height: int, full_size: tuple[int, int]
) -> np.ndarray:
    """K for an image of width x height from intrinsics a dataset stores per sample, which hold either for
    the dataset's full_size (width, height) (real data, also when the image is a downscaled copy) or for the
    image itself (the toy data writes its own). The principal point lies near the image centre, so we take
    the reference width (this image or the full one) that puts cx closest to the middle."""
    ref_w = min((width, full_size[0]), key=lambda w: abs(cx / w - 0.5))
    if ref_w == width:
        return intrinsics(fx, fy, cx, cy)
    return intrinsics(fx, fy, cx, cy, width / full_size[0], height / full_size[1])


def cityscapes_intrinsics(camera: dict[str, float], width: int, height: int) -> np.ndarray:
    """K for an image of width x height from camera json values (2048x1024 intrinsics for real Cityscapes),
    scaled when the json is for full resolution (see `stored_intrinsics`)."""
    return stored_intrinsics(
        camera["fx"], camera["fy"], camera["u0"], camera["v0"], width, height, CITYSCAPES_FULL_SIZE
    )


def cityscapes_depth(path: str | Path, camera: dict[str, float]) -> np.ndarray:
    """Depth in metres float32 [H,W] from a disparity PNG: d = (png - 1) / 256 px, depth = baseline * fx / d.

    png 0 marks no measurement (and png 1 a zero disparity), both give depth 0. Disparities are in pixels of
    the resolution the camera json describes, so fx is used unscaled even if the PNG has been resized.
    """
    png = read_png16(path, "disparity").astype(np.float32)
    disparity = (png - 1.0) / 256.0
    valid = disparity > 0
    depth = np.zeros_like(disparity)
    depth[valid] = camera["baseline"] * camera["fx"] / disparity[valid]
    return depth


# ---------------------------------------------------------------------------------------------------------
# Virtual KITTI 2
# ---------------------------------------------------------------------------------------------------------

VKITTI2_FULL_SIZE = (1242, 375)
# Fallback when a scene has no intrinsic.txt (semantic segmentation only): the published values.
VKITTI2_INTRINSICS = (725.0087, 725.0087, 620.5, 187.0)


def vkitti2_colors(path: str | Path, names: dict[str, int]) -> dict[tuple[int, int, int], int]:
    """Parse a scene's colors.txt ('Category r g b' header) into {(r, g, b): id} using names {category: id}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: missing colors.txt (needed to decode labels); extract vkitti_2.0.3_textgt.tar.gz"
        )
    colors: dict[tuple[int, int, int], int] = {}
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if not parts or (n == 0 and parts[0] == "Category"):
            continue
        if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
            raise DataError(f"{path}: line {n + 1} {line!r} is not 'Category r g b'; re-extract the file")
        if parts[0] not in names:
            raise DataError(
                f"{path}: unknown category {parts[0]!r}; add it to uda/catalogue/classes/vkitti2.json"
            )
        colors[(int(parts[1]), int(parts[2]), int(parts[3]))] = names[parts[0]]
    if not colors:
        raise DataError(f"{path}: no colours listed; re-extract the file")
    return colors


def vkitti2_label(path: str | Path, colors: dict[tuple[int, int, int], int]) -> np.ndarray:
    """VKITTI2 class ids uint8 [H,W] from a colour-coded classgt PNG by exact colour match; unknown colours fail."""
    path = Path(path)
    image = read_raw(path, "label")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] < 3:
        raise DataError(
            f"{path}: label PNG must be 8-bit RGB, got {image.dtype} {image.shape}; re-extract the file"
        )
    bgr = image[:, :, :3].astype(np.int32)
    key = (bgr[:, :, 2] << 16) | (bgr[:, :, 1] << 8) | bgr[:, :, 0]
    table_keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], np.int32)
    table_ids = np.array(list(colors.values()), np.uint8)
    order = np.argsort(table_keys)
    table_keys, table_ids = table_keys[order], table_ids[order]
    pos = np.clip(np.searchsorted(table_keys, key), 0, len(table_keys) - 1)
    unknown = table_keys[pos] != key
    if unknown.any():
        k = int(key[unknown][0])
        raise DataError(
            f"{path}: colour {(k >> 16, (k >> 8) & 255, k & 255)} at {int(unknown.sum())} pixels is not in "
            "colors.txt; use the original classgt PNGs (no resizing with interpolation)"
        )
    return table_ids[pos]


VKITTI2_SKY_CM = 65535  # the depth PNG value of sky (and of anything as far or farther)
VKITTI2_SKY_M = VKITTI2_SKY_CM * 0.01  # 655.35 m
SKY_DEPTH_MODES = ("far", "none")


def vkitti2_depth(path: str | Path, sky: str = "none") -> np.ndarray:
    """VKITTI2 depth in metres float32 [H,W] from a 16-bit PNG in centimetres.

    Sky (65535) becomes VKITTI2_SKY_M = 655.35 m with sky="far" (the DenseMTL code supervises it as the far
    value; the < 80 m evaluation cap removes it) or 0 = no measurement with sky="none".
    """
    if sky not in SKY_DEPTH_MODES:
        raise ValueError(f"sky={sky!r}: use one of {', '.join(SKY_DEPTH_MODES)}")
    png = read_png16(path, "depth")
    depth = png.astype(np.float32) * 0.01
    depth[png == VKITTI2_SKY_CM] = VKITTI2_SKY_M if sky == "far" else 0.0
    return depth


def vkitti2_sky(depth: np.ndarray) -> np.ndarray:
    """Sky mask bool [H,W] of a depth map in metres decoded with sky="far" (the 65535 cm value)."""
    # Every other PNG value is at most 655.34 m, so half a centimetre separates sky from the farthest depth.
    return depth > VKITTI2_SKY_M - 0.005


def vkitti2_intrinsics(path: str | Path) -> dict[tuple[int, int], np.ndarray]:
    """Parse intrinsic.txt ('frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]') into {(frame, camera): K}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing intrinsic.txt; extract vkitti_2.0.3_textgt.tar.gz")
    out: dict[tuple[int, int], np.ndarray] = {}
    for n, line in enumerate(path.read_text().splitlines()):
        parts = line.split()
        if not parts or (n == 0 and parts[0] == "frame"):
            continue
        try:
            frame, cam = int(parts[0]), int(parts[1])
            fx, fy, cx, cy = (float(p) for p in parts[2:6])
        except (ValueError, IndexError):
            raise DataError(
                f"{path}: line {n + 1} {line!r} is not 'frame cameraID fx fy cx cy'; re-extract"
            ) from None
        out[(frame, cam)] = intrinsics(fx, fy, cx, cy)
    return out


# ---------------------------------------------------------------------------------------------------------
# NYUDv2 (the multi-task layout of ATRC / MTI-Net / DenseMTL)
# ---------------------------------------------------------------------------------------------------------

NYUDV2_FULL_SIZE = (640, 480)
NYUDV2_INTRINSICS = (518.86, 519.47, 325.58, 253.74)  # Kinect colour camera at 640x480


def read_npy(path: str | Path, what: str) -> np.ndarray:
    """A numpy .npy array as float32 (no pickles); missing or damaged files raise DataError naming them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing {what} file (partial dataset?); re-extract the dataset")
    try:
        return np.asarray(np.load(path, allow_pickle=False), np.float32)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(
            f"{path}: unreadable .npy ({' '.join(str(e).split())[:100]}); re-extract the file"
        ) from None


def nyudv2_depth(path: str | Path) -> np.ndarray:
    """NYUDv2 depth in metres float32 [H,W] from depth/<id>.npy; non-finite or non-positive values become 0."""
    path = Path(path)
    depth = np.squeeze(read_npy(path, "depth"))
    if depth.ndim != 2:
        raise DataError(f"{path}: depth must be [H,W], got shape {depth.shape}; re-extract the file")
    depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return depth


def nyudv2_normals(path: str | Path) -> np.ndarray:
    """NYUDv2 normals float32 [3,H,W] from an 8-bit RGB PNG via 2x-1 (x = png/255), or from MTI-Net's float
    .npy [H,W,3]; 0 where not unit length.

    Channels are taken as stored (R, G, B) -> (x, y, z); pixels far from unit length (e.g. black = no data)
    are unknown.
    """
    path = Path(path)
    if path.suffix == ".npy":  # MTI-Net's NYUD_MT release: float [H,W,3] in [-1, 1]
        n = read_npy(path, "normals")
        if n.ndim != 3 or n.shape[2] != 3:
            raise DataError(f"{path}: normals must be [H,W,3], got shape {n.shape}; re-extract the file")
        n = np.nan_to_num(n).transpose(2, 0, 1)
    else:
        image = read_raw(path, "normals")
        if image.dtype != np.uint8 or image.ndim != 3:
            raise DataError(
                f"{path}: normals PNG must be 8-bit RGB, got {image.dtype} {image.shape}; re-extract the file"
            )
        n = image[:, :, 2::-1].astype(np.float32).transpose(2, 0, 1) * (2.0 / 255.0) - 1.0
    norm = np.linalg.norm(n, axis=0, keepdims=True)
    # 8-bit quantisation moves a unit vector's length by well under 1 %; 10 % separates data from no data.
    valid = np.abs(norm - 1.0) < 0.1
    return np.where(valid, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def nyudv2_edges(path: str | Path) -> np.ndarray:
    """NYUDv2 edges float32 [H,W] from edge/<id>.png (or MTI-Net's edge/<id>.npy): 1 where > 0."""
    path = Path(path)
    image = np.squeeze(read_npy(path, "edge")) if path.suffix == ".npy" else read_raw(path, "edge")
    if image.ndim == 3:
        image = image.max(axis=2)
    return (image > 0).astype(np.float32)


def nyudv2_intrinsics(width: int, height: int) -> np.ndarray:
    """NYUDv2 K for an image of width x height (standard Kinect intrinsics at 640x480, scaled)."""
    return intrinsics(*NYUDV2_INTRINSICS, width / NYUDV2_FULL_SIZE[0], height / NYUDV2_FULL_SIZE[1])


def nyudv2_normal_holes(normals: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Normals [3,H,W] with 0 (unknown) wherever depth [H,W] has no measurement (0): the ground-truth normals
    of the multi-task NYUDv2 data are filled in over the Kinect's holes, where they are no measurement."""
    return np.where(depth[None] > 0, normals, np.float32(0.0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# PASCAL-Context, multi-task layout (ASTMT / MTI-Net / ATRC "PASCALContext" folder)
# ---------------------------------------------------------------------------------------------------------

PASCAL_PERSON = 15  # the person class of PASCAL VOC / PASCAL-Part (class_ind of human_parts/*.mat objects)


def _loadmat(path: Path, what: str) -> dict:
    """A MATLAB file as scipy.io.loadmat returns it; missing, truncated or foreign files raise DataError."""
    if not path.is_file():
        raise DataError(f"{path}: missing {what} file (partial dataset?); re-extract the dataset")
    from scipy.io import loadmat  # scipy comes with scikit-learn; imported here to keep decode light

    try:
        return loadmat(str(path))
    except Exception as e:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError, MatReadError, ...
        reason = " ".join(str(e).split())[:100] or type(e).__name__
        raise DataError(f"{path}: unreadable .mat {what} ({reason}); re-extract the file") from None


def pascal_label_map(path: str | Path) -> np.ndarray:
    """The PASCAL-Context 459-class label map int32 [H,W] ('LabelMap' of pascal-context/trainval/<id>.mat)."""
    path = Path(path)
    mat = _loadmat(path, "context label")
    label = mat.get("LabelMap")
    if not isinstance(label, np.ndarray) or label.ndim != 2 or not np.issubdtype(label.dtype, np.number):
        raise DataError(
            f"{path}: no 2-D 'LabelMap' in the .mat file; use pascal-context/trainval of the dataset"
        )
    return label.astype(np.int32)


def pascal_edges(label_map: np.ndarray) -> np.ndarray:
    """PASCAL-Context boundaries float32 [H,W] in {0,1} from the 459-class LabelMap, as ASTMT / MTI-Net / ATRC:
    pixels where the 4-neighbour Laplacian (OpenCV, reflected border) of the label ids is non-zero, thinned."""
    # MATLAB's bwmorph 'thin' (= skimage's thin, Lam, Lee & Suen), the benchmark's own thinning.
    from uda.boundary import thin

    lap = cv2.Laplacian(label_map.astype(np.float64), cv2.CV_64F)
    return thin(np.abs(lap) > 0).astype(np.float32)


def pascal_semseg(path: str | Path) -> np.ndarray:
    """PASCAL-Context 21-class ids uint8 [H,W] (0 background, 1..20 VOC, 255 void) of semseg/*/<id>.png."""
    return read_label8(path, "segmentation")


def pascal_human_parts(path: str | Path, groups: dict[str, int]) -> np.ndarray | None:
    """Human-part ids uint8 [H,W] from human_parts/<id>.mat (PASCAL-Part 'anno'): the parts of every person
    (class 15) with part annotations, each part name mapped through `groups` (e.g. 'luarm' -> 3), 0 elsewhere.
    None when the image has no person with parts (the reader then ignores the whole map, as the literature)."""
    path = Path(path)
    mat = _loadmat(path, "human parts")
    try:
        objects = mat["anno"][0][0][1][0]
        target = None
        for obj in objects:
            if int(np.asarray(obj[1]).ravel()[0]) != PASCAL_PERSON or len(obj[3]) == 0:
                continue
            if target is None:
                target = np.zeros(np.asarray(obj[2]).shape, np.uint8)
            for part in obj[3][0]:
                name = str(np.asarray(part[0]).ravel()[0])
                if name not in groups:
                    raise DataError(
                        f"{path}: unknown part name {name!r}; add it to uda/catalogue/pascal_context/part_groups.json"
                    )
                target[np.asarray(part[1]).astype(bool)] = groups[name]
        return target
    except DataError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise DataError(
            f"{path}: not a PASCAL-Part annotation ({type(e).__name__}: {e}); use human_parts of the dataset"
        ) from None


def pascal_normals(path: str | Path, label_map: np.ndarray, valid_ids: np.ndarray) -> np.ndarray:
    """Distilled normals float32 [3,H,W] from normals_distill/<id>.png (2x/255 - 1 per channel, channels as
    stored R, G, B -> x, y, z; scaled to unit length), kept only on pixels whose LabelMap class is in
    valid_ids (the classes the NYUDv2 normal estimator knows, as the literature), 0 elsewhere."""
    path = Path(path)
    image = read_raw(path, "normals")
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DataError(
            f"{path}: normals PNG must be 8-bit RGB, got {image.dtype} {image.shape}; re-extract the file"
        )
    if image.shape[:2] != label_map.shape:
        raise DataError(
            f"{path}: size {image.shape[1]}x{image.shape[0]} differs from the LabelMap's "
            f"({label_map.shape[1]}x{label_map.shape[0]}); use files of the same resolution"
        )
    n = image[:, :, 2::-1].astype(np.float32).transpose(2, 0, 1) * (2.0 / 255.0) - 1.0
    norm = np.linalg.norm(n, axis=0, keepdims=True)
    keep = np.isin(label_map, valid_ids)[None] & (norm > 0.5)
    return np.where(keep, n / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


def pascal_saliency(path: str | Path) -> np.ndarray:
    """Distilled saliency float32 [H,W] in {0,1} from sal_distill/<id>.png: 1 where png / 255 > 0.5."""
    path = Path(path)
    image = read_raw(path, "saliency")
    if image.dtype != np.uint8:
        raise DataError(f"{path}: saliency PNG must be 8-bit, got {image.dtype}; re-extract the file")
    if image.ndim == 3:
        image = image[:, :, 0]
    return (image > 127).astype(np.float32)
