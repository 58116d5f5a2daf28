"""Dataset readers (torch Datasets) for SYNTHIA RAND_CITYSCAPES, Cityscapes, Virtual KITTI 2, NYUDv2 and the
multi-task PASCAL-Context.

Each item is the sample dict of DESIGN.md: `image`, `K`, `domain`, `meta`, plus only the requested tasks
(`semseg`, `depth`, `normals`, `edges`; PASCAL-Context also `parts` int64 [H,W] (human_parts7 ids, 255 =
ignore) and `saliency` float32 [1,H,W] in {0,1} (255 = ignore)) and `frames` when neighbouring frames are
requested. Readers never write 255 into edges; the transforms pad edges, parts and saliency with 255. File formats are
decoded by uda.data.decode; this module knows the folder layouts and split files.

Splits: `<dataset root>/splits/<split>.txt` if present (the toy data writes its own), else the official
split (Cityscapes: the split folders; NYUDv2: gt_sets/) or the split file shipped in the package,
uda/catalogue/<name>/splits/ (SYNTHIA, VKITTI2). Split "all" is train + val.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from uda import TASKS
from uda.data import decode
from uda.data.decode import DataError
from uda.data.labels import (
    CATALOGUE_DIR,
    DEFAULT_LABEL_SETS,
    IGNORE_INDEX,
    ClassMap,
    get_class_map,
    get_id_table,
    pascal_part_groups,
)
from uda.data.splits import read_split_file
from uda.geometry import normals_from_depth

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2] / "datasets"  # the clone's datasets/ folder

Sample = dict[str, Any]


def _missing_folder(path: Path, what: str, dataset: str) -> DataError:
    return DataError(
        f"{path}: missing folder ({what}); see datasets/{dataset}/README.md for the expected layout"
    )


class DenseDataset(Dataset):
    """Common reader logic: split resolution, task selection, decoding order, validation, transform."""

    name: ClassVar[str]
    supports_frames: ClassVar[bool] = False
    supported_tasks: ClassVar[tuple[str, ...]] = ("semseg", "depth", "normals", "edges")
    image_folder: ClassVar[str]  # glob of the folder(s) whose absence means the dataset is not there at all
    # The form the file paths need of a split id (a regular expression, and its description for the user);
    # None where any id is a file name.
    id_form: ClassVar[tuple[str, str] | None] = None

    def __init__(
        self,
        split: str,
        tasks: Sequence[str] = (),
        label_set: str | None = None,
        root: str | Path | None = None,
        transform: Callable[[Sample], Sample] | None = None,
        frames: Sequence[int] = (),
        domain: int = 0,
    ) -> None:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown} for {self.name}; valid tasks: {', '.join(TASKS)}")
        unsupported = [t for t in tasks if t not in self.supported_tasks]
        if unsupported:
            raise DataError(
                f"{self.name} has no ground truth for {', '.join(unsupported)}; choose among its tasks "
                f"{', '.join(self.supported_tasks)} (--tasks)"
            )
        self.tasks = tuple(dict.fromkeys(tasks))
        self.frames = tuple(int(f) for f in frames)
        if self.frames and not self.supports_frames:
            raise ValueError(
                f"{self.name} has no video frames; use frames=() (only cityscapes and vkitti2 have them)"
            )
        if 0 in self.frames or len(set(self.frames)) != len(self.frames):
            raise ValueError(f"frames must be distinct non-zero offsets, got {self.frames}")
        self.split = split
        self.domain = int(domain)
        self.transform = transform
        self.label_set = label_set or DEFAULT_LABEL_SETS[self.name]
        self.class_map: ClassMap = get_class_map(self.name, self.label_set)
        self.root = Path(root) if root is not None else DEFAULT_DATA_ROOT / self.name
        if not any(p.is_dir() for p in self.root.glob(self.image_folder)):
            raise DataError(
                f"{self.root}: {self.name} not found (no {self.image_folder}/ folder); place or symlink the dataset "
                f"there or pass --data-root, see datasets/{self.name}/README.md"
            )
        self.items = self._resolve_split(split)
        if not self.items:
            raise DataError(
                f"{self.root}: split {split!r} of {self.name} is empty; check the split file or folders"
            )
        self._check_layout()
        self._check_images_exist()

    # ------------------------------------------------------------------ split resolution

    def _resolve_split(self, split: str) -> list[tuple[str, str]]:
        """Sorted (split folder, id) pairs of a split; "all" is the union of train and val."""
        if split == "all":
            items = {i: (s, i) for s in ("train", "val") for _, i in self._resolve_split(s)}
            return [items[i] for i in sorted(items)]
        ids, source = self._split_ids(split)
        if split in ("train", "val"):
            self._check_disjoint(split, ids, source)
        return [(split, i) for i in ids]

    def _split_ids(self, split: str) -> tuple[list[str], Path]:
        """Ids of a split and the file (or folder) listing them: <root>/splits/<split>.txt if present, else the
        official split; an id the file paths cannot be made of is an error naming that file."""
        local = self.root / "splits" / f"{split}.txt"
        ids, source = (read_split_file(local), local) if local.is_file() else self._official_split(split)
        if self.id_form is not None:
            pattern, form = self.id_form
            bad = next((i for i in ids if not re.fullmatch(pattern, i)), None)
            if bad is not None:
                raise DataError(f"{source}: {bad!r} is not a {self.name} id; ids have the form {form}")
        return ids, source

    def _check_disjoint(self, split: str, ids: list[str], source: Path) -> None:
        """Refuse ids of train (or val) that the other lists too (evaluation on training samples); no other
        split is no error."""
        other = "val" if split == "train" else "train"
        try:
            other_ids, other_source = self._split_ids(other)
        except (DataError, FileNotFoundError):
            return  # reading that split reports its own problem
        shared = sorted(set(ids) & set(other_ids))
        if shared:
            # The same message whichever split is read: train's file first.
            train, val = (source, other_source) if split == "train" else (other_source, source)
            raise DataError(
                f"{train} and {val} both list {len(shared)} id(s), e.g. {shared[0]!r}; train and val must be "
                "disjoint: remove them from one of the two, or regenerate both with `uda-make-splits`"
            )

    def _official_split(self, split: str) -> tuple[list[str], Path]:
        """Ids of a split from the dataset's own split definition (or our shipped split file), and that file."""
        path = CATALOGUE_DIR / self.name / "splits" / f"{split}.txt"
        if not path.is_file():
            valid = sorted(p.stem for p in path.parent.glob("*.txt")) + ["all"]
            raise DataError(f"{path}: no split {split!r} for {self.name}; valid splits: {', '.join(valid)}")
        return read_split_file(path), path

    @property
    def ids(self) -> list[str]:
        """The sample ids, in order."""
        return [i for _, i in self.items]

    def _check_layout(self) -> None:
        """Raise if a folder needed by the requested tasks is missing."""
        for rel, what in self._required_folders():
            if not (self.root / rel).is_dir():
                raise _missing_folder(self.root / rel, what, self.name)

    def _required_folders(self) -> list[tuple[str, str]]:
        """(folder relative to root, what it holds) for every folder the requested tasks need."""
        return []

    def _check_images_exist(self) -> None:
        """Every split id must have its image: a partial dataset is an error, never a silently shorter split."""
        missing = [self.image_path(s, i) for s, i in self.items if not self.image_path(s, i).is_file()]
        if missing:
            raise DataError(
                f"{missing[0]}: missing image for {len(missing)} of {len(self.items)} ids of split {self.split!r} "
                f"(partial dataset?); complete the dataset or regenerate its split files"
            )

    # ------------------------------------------------------------------ dataset-specific hooks

    def image_path(self, split: str, id: str) -> Path:
        """The RGB image file of a sample."""
        raise NotImplementedError

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        """Dataset class ids [H,W] of a sample and the file they came from."""
        raise NotImplementedError

    def label_path(self, split: str, id: str) -> Path:
        """The file label_ids reads for a sample (without reading it)."""
        raise NotImplementedError

    def depth_m(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        """Depth in metres [H,W] (0 = none) of a sample and the file it came from."""
        raise NotImplementedError

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        """K [3,3] of a sample at its image size."""
        raise NotImplementedError

    def frame_path(self, split: str, id: str, offset: int) -> Path:
        """The RGB file of the video frame `offset` frames from the sample's."""
        raise NotImplementedError

    def normals(
        self, split: str, id: str, depth: np.ndarray | None, K: np.ndarray
    ) -> tuple[np.ndarray, Path | None]:
        """Unit normals [3,H,W] in the camera frame (0 = unknown) and their file; by default from metric depth."""
        n, valid = normals_from_depth(torch.from_numpy(depth)[None, None], torch.from_numpy(K)[None])
        return (n * valid)[0].numpy(), None

    def edges(self, split: str, id: str, train_ids: np.ndarray | None) -> tuple[np.ndarray, Path | None]:
        """Edges [H,W] in {0,1} and their file; by default the boundaries of the label map in train ids."""
        return decode.semantic_edges(train_ids), None

    def parts(self, split: str, id: str, shape: tuple[int, int]) -> tuple[np.ndarray, Path]:
        """Human-part ids uint8 [H,W] (255 = ignore) and their file."""
        raise NotImplementedError

    def saliency(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        """Saliency float32 [H,W] in {0,1} and its file."""
        raise NotImplementedError

    # NYUDv2 reads normals and edges from files; the others derive them from depth and labels.
    needs_depth_for_normals: ClassVar[bool] = True
    needs_labels_for_edges: ClassVar[bool] = True

    # ------------------------------------------------------------------ loading

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def to_train_ids(self, ids: np.ndarray, path: Path) -> np.ndarray:
        """Dataset class ids [H,W] read from the label file `path` as uint8 train ids of the label set (255 =
        ignore); an id the dataset does not have is a DataError naming the file."""
        try:
            return self.class_map.apply(ids)
        except ValueError as e:
            raise DataError(f"{path}: {e}; use the original label files of the dataset") from None

    def load(self, index: int) -> Sample:
        """The untransformed sample dict of item index, decoding only the files its tasks need."""
        split, id = self.items[index]
        image_path = self.image_path(split, id)
        image = decode.read_rgb(image_path)
        h, w = image.shape[:2]
        K = self.intrinsics(split, id, w, h)
        sample: Sample = {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0),
            "K": torch.from_numpy(K),
        }
        tasks = set(self.tasks)
        train_ids = None
        if "semseg" in tasks or ("edges" in tasks and self.needs_labels_for_edges):
            ids, path = self.label_ids(split, id)
            decode.check_same_size(path, ids.shape, image.shape, image_path)
            train_ids = self.to_train_ids(ids, path)
            if "semseg" in tasks:
                sample["semseg"] = torch.from_numpy(train_ids.astype(np.int64))
        depth = None
        if "depth" in tasks or ("normals" in tasks and self.needs_depth_for_normals):
            depth, path = self.depth_m(split, id)
            decode.check_same_size(path, depth.shape, image.shape, image_path)
            if "depth" in tasks:
                sample["depth"] = torch.from_numpy(depth)[None]
        if "normals" in tasks:
            normals, path = self.normals(split, id, depth, K)
            if path is not None:
                decode.check_same_size(path, normals.shape[1:], image.shape, image_path)
            sample["normals"] = torch.from_numpy(np.ascontiguousarray(normals))
        if "edges" in tasks:
            edges, path = self.edges(split, id, train_ids)
            if path is not None:
                decode.check_same_size(path, edges.shape, image.shape, image_path)
            sample["edges"] = torch.from_numpy(edges)[None]
        if "parts" in tasks:
            parts, path = self.parts(split, id, (h, w))
            decode.check_same_size(path, parts.shape, image.shape, image_path)
            sample["parts"] = torch.from_numpy(parts.astype(np.int64))
        if "saliency" in tasks:
            sal, path = self.saliency(split, id)
            decode.check_same_size(path, sal.shape, image.shape, image_path)
            sample["saliency"] = torch.from_numpy(sal)[None]
        if self.frames:
            sample["frames"] = {}
            for k in self.frames:
                path = self.frame_path(split, id, k)
                frame = decode.read_rgb(path)
                decode.check_same_size(path, frame.shape, image.shape, image_path)
                sample["frames"][k] = torch.from_numpy(frame).permute(2, 0, 1).float().div_(255.0)
        sample["domain"] = self.domain
        sample["meta"] = {"dataset": self.name, "id": id, "split": self.split}
        return sample


# -------------------------------------------------------------------------------------------------------------
# SYNTHIA RAND_CITYSCAPES: RGB/<id>.png, GT/LABELS/<id>.png, Depth/Depth/<id>.png, ids "0000000"
# -------------------------------------------------------------------------------------------------------------


class SynthiaDataset(DenseDataset):
    """SYNTHIA RAND_CITYSCAPES (1280x760; 16-bit labels with the id in R; depth PNG in centimetres)."""

    name = "synthia"
    image_folder = "RGB"

    def _required_folders(self) -> list[tuple[str, str]]:
        need = []
        if {"semseg", "edges"} & set(self.tasks):
            need.append(("GT/LABELS", "labels"))
        if {"depth", "normals"} & set(self.tasks):
            need.append(("Depth/Depth", "depth"))
        return need

    def image_path(self, split: str, id: str) -> Path:
        return self.root / "RGB" / f"{id}.png"

    def label_path(self, split: str, id: str) -> Path:
        return self.root / "GT" / "LABELS" / f"{id}.png"

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.label_path(split, id)
        return decode.synthia_label(path), path

    def depth_m(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.root / "Depth" / "Depth" / f"{id}.png"
        return decode.synthia_depth(path), path

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        return decode.synthia_intrinsics(width, height)


# -------------------------------------------------------------------------------------------------------------
# Cityscapes: <kind>/<split>/<city>/<city>_<seq>_<frame>_<suffix>, ids "<city>/<city>_<seq>_<frame>"
# -------------------------------------------------------------------------------------------------------------


class CityscapesDataset(DenseDataset):
    """Cityscapes (leftImg8bit, gtFine labelIds, disparity + camera json, leftImg8bit_sequence for frames)."""

    name = "cityscapes"
    image_folder = "leftImg8bit"
    supports_frames = True
    image_exts = (".png", ".jpg")  # .jpg: the downscaled copies some pipelines make
    id_form = (r"[^/]+/[^/]+_\d+", "<city>/<city>_<sequence>_<frame>, e.g. aachen/aachen_000000_000019")

    def _official_split(self, split: str) -> tuple[list[str], Path]:
        folder = self.root / "leftImg8bit" / split
        if not folder.is_dir():
            valid = sorted(p.name for p in (self.root / "leftImg8bit").iterdir() if p.is_dir()) + ["all"]
            raise DataError(f"{folder}: no split {split!r} in Cityscapes; valid splits: {', '.join(valid)}")
        suffix = "_leftImg8bit"
        # A set: a frame with both a .png and a .jpg copy is one sample (image_path prefers the .png).
        ids = {
            f"{p.parent.name}/{p.name[: -len(suffix + p.suffix)]}"
            for ext in self.image_exts
            for p in folder.glob(f"*/*{suffix}{ext}")
        }
        return sorted(ids), folder

    def _required_folders(self) -> list[tuple[str, str]]:
        need = []
        for split in sorted({s for s, _ in self.items}):
            if {"semseg", "edges"} & set(self.tasks):
                need.append((f"gtFine/{split}", "labels"))
            if {"depth", "normals"} & set(self.tasks):
                need.append((f"disparity/{split}", "depth"))
            if {"depth", "normals"} & set(self.tasks) or self.frames:
                need.append((f"camera/{split}", "camera intrinsics"))
            if self.frames:
                need.append((f"leftImg8bit_sequence/{split}", "video frames"))
        return need

    def _file(self, kind: str, split: str, id: str, suffix: str) -> Path:
        return self.root / kind / split / f"{id}_{suffix}"

    def image_path(self, split: str, id: str) -> Path:
        png = self._file("leftImg8bit", split, id, "leftImg8bit.png")
        jpg = png.with_suffix(".jpg")
        return jpg if not png.is_file() and jpg.is_file() else png

    def label_path(self, split: str, id: str) -> Path:
        return self._file("gtFine", split, id, "gtFine_labelIds.png")

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.label_path(split, id)
        return decode.read_label8(path, "labelIds"), path

    def camera(self, split: str, id: str) -> dict[str, float]:
        return decode.cityscapes_camera(self._file("camera", split, id, "camera.json"))

    def depth_m(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self._file("disparity", split, id, "disparity.png")
        return decode.cityscapes_depth(path, self.camera(split, id)), path

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        if (self.root / "camera" / split).is_dir():
            return decode.cityscapes_intrinsics(self.camera(split, id), width, height)
        # Without camera files (labels only) the typical full-resolution intrinsics are close enough.
        fx, fy, u0, v0 = decode.CITYSCAPES_INTRINSICS
        full_w, full_h = decode.CITYSCAPES_FULL_SIZE
        return decode.intrinsics(fx, fy, u0, v0, width / full_w, height / full_h)

    def frame_path(self, split: str, id: str, offset: int) -> Path:
        city_seq, frame = id.rsplit("_", 1)
        neighbour = f"{city_seq}_{int(frame) + offset:0{len(frame)}d}"
        png = self._file("leftImg8bit_sequence", split, neighbour, "leftImg8bit.png")
        jpg = png.with_suffix(".jpg")
        return jpg if not png.is_file() and jpg.is_file() else png


# -------------------------------------------------------------------------------------------------------------
# Virtual KITTI 2: Scene*/<variation>/frames/{rgb,depth,classSegmentation}/Camera_0/..., ids "Scene01/00000"
# -------------------------------------------------------------------------------------------------------------


class VKitti2Dataset(DenseDataset):
    """Virtual KITTI 2, one variation (default 'clone'), Camera_0; colour-coded labels, depth PNG in cm.

    sky_depth: what the depth PNG's sky value (65535 cm) becomes: "far" = 655.35 m, supervised like any
    depth (as the DenseMTL code does; the < 80 m evaluation cap removes it), or "none" = 0, no measurement.
    Normals derived from depth are 0 (unknown) on sky either way: sky is no surface.
    """

    name = "vkitti2"
    image_folder = "Scene*"
    supports_frames = True
    camera_id = 0
    id_form = (r"[^/]+/\d+", "<scene>/<frame number>, e.g. Scene01/00000")

    def __init__(self, *args: Any, variation: str = "clone", sky_depth: str = "none", **kwargs: Any) -> None:
        if sky_depth not in decode.SKY_DEPTH_MODES:
            raise ValueError(
                f"sky_depth={sky_depth!r} for vkitti2: use one of {', '.join(decode.SKY_DEPTH_MODES)}"
            )
        self.variation = variation
        self.sky_depth = sky_depth
        self._colors: dict[str, dict[tuple[int, int, int], int]] = {}
        self._K: dict[str, dict[tuple[int, int], np.ndarray]] = {}
        super().__init__(*args, **kwargs)
        if self.frames:
            self._drop_ids_without_neighbours()

    def _scene(self, id: str) -> Path:
        scene, _ = id.split("/")
        return self.root / scene / self.variation

    def _frame_file(self, id: str, kind: str, prefix: str, ext: str, offset: int = 0) -> Path:
        scene, frame = id.split("/")
        return (
            self._scene(id)
            / "frames"
            / kind
            / f"Camera_{self.camera_id}"
            / f"{prefix}_{int(frame) + offset:05d}{ext}"
        )

    def _required_folders(self) -> list[tuple[str, str]]:
        need = []
        for scene in sorted({i.split("/")[0] for _, i in self.items}):
            base = f"{scene}/{self.variation}"
            need.append((f"{base}/frames/rgb/Camera_{self.camera_id}", "images"))
            if {"semseg", "edges"} & set(self.tasks):
                need.append((f"{base}/frames/classSegmentation/Camera_{self.camera_id}", "labels"))
            if {"depth", "normals"} & set(self.tasks):
                need.append((f"{base}/frames/depth/Camera_{self.camera_id}", "depth"))
        return need

    def _drop_ids_without_neighbours(self) -> None:
        """Frames at the ends of a scene have no neighbours; leave them out (and say so), never fail at run time."""
        keep = [(s, i) for s, i in self.items if all(self.frame_path(s, i, k).is_file() for k in self.frames)]
        if len(keep) < len(self.items):
            warnings.warn(
                f"vkitti2 {self.split}: {len(self.items) - len(keep)} of {len(self.items)} ids lack the frames "
                f"{self.frames} (scene ends) and are left out",
                stacklevel=3,
            )
        if not keep:
            raise DataError(f"{self.root}: no id of split {self.split!r} has the frames {self.frames}")
        self.items = keep

    def image_path(self, split: str, id: str) -> Path:
        return self._frame_file(id, "rgb", "rgb", ".jpg")

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        scene = str(self._scene(id))
        if scene not in self._colors:
            names = dict(zip(get_id_table("vkitti2").names, get_id_table("vkitti2").ids))
            self._colors[scene] = decode.vkitti2_colors(self._scene(id) / "colors.txt", names)
        path = self.label_path(split, id)
        return decode.vkitti2_label(path, self._colors[scene]), path

    def label_path(self, split: str, id: str) -> Path:
        return self._frame_file(id, "classSegmentation", "classgt", ".png")

    def depth_m(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self._frame_file(id, "depth", "depth", ".png")
        return decode.vkitti2_depth(path, self.sky_depth), path

    def normals(
        self, split: str, id: str, depth: np.ndarray | None, K: np.ndarray
    ) -> tuple[np.ndarray, Path | None]:
        # Far sky would otherwise pass as a fronto-parallel plane at 655.35 m with normal (0, 0, -1). As 0 it
        # is unknown, and so are its neighbours (their 3x3 window lacks depth), whatever sky_depth is.
        if depth is not None and self.sky_depth == "far":
            depth = np.where(decode.vkitti2_sky(depth), np.float32(0.0), depth)
        return super().normals(split, id, depth, K)

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        txt = self._scene(id) / "intrinsic.txt"
        needs_exact = bool({"depth", "normals"} & set(self.tasks) or self.frames)
        if not txt.is_file() and not needs_exact:
            # Labels only and no intrinsic.txt: the published intrinsics are close enough.
            full_w, full_h = decode.VKITTI2_FULL_SIZE
            return decode.intrinsics(*decode.VKITTI2_INTRINSICS, width / full_w, height / full_h)
        if str(txt) not in self._K:
            self._K[str(txt)] = decode.vkitti2_intrinsics(txt)
        frame = int(id.split("/")[1])
        K = self._K[str(txt)].get((frame, self.camera_id))
        if K is None:
            raise DataError(
                f"{txt}: no intrinsics for frame {frame} camera {self.camera_id}; re-extract the file"
            )
        # intrinsic.txt holds 1242x375 values for real VKITTI2, also next to downscaled copies of the frames.
        (fx, cx), (fy, cy) = K[0, [0, 2]], K[1, [1, 2]]
        return decode.stored_intrinsics(fx, fy, cx, cy, width, height, decode.VKITTI2_FULL_SIZE)

    def frame_path(self, split: str, id: str, offset: int) -> Path:
        return self._frame_file(id, "rgb", "rgb", ".jpg", offset)


# -------------------------------------------------------------------------------------------------------------
# NYUDv2 (ATRC / MTI-Net multi-task layout): images/, segmentation/, depth/, normals/, edge/, gt_sets/
# -------------------------------------------------------------------------------------------------------------


class NYUDv2Dataset(DenseDataset):
    """NYUDv2 with 40 (or 13) classes, Kinect depth (.npy, metres; 0 = no measurement), and ground-truth normals
    and edges as PNGs. Normals are 0 (unknown) wherever depth has a hole: the multi-task data fills them in
    there, where they are no measurement (so normals read the depth file too)."""

    name = "nyudv2"
    image_folder = "images"
    needs_depth_for_normals = True
    needs_labels_for_edges = False

    def _official_split(self, split: str) -> tuple[list[str], Path]:
        path = self.root / "gt_sets" / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"{path}: no split {split!r} for NYUDv2 (expected gt_sets/train.txt, val.txt)")
        return read_split_file(path), path

    def _required_folders(self) -> list[tuple[str, str]]:
        folders = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edges": "edge"}
        need = [(folders[t], t) for t in self.tasks]
        return need + ([("depth", "depth (holes of the normals)")] if "normals" in self.tasks else [])

    def image_path(self, split: str, id: str) -> Path:
        png = self.root / "images" / f"{id}.png"
        jpg = png.with_suffix(".jpg")
        return jpg if not png.is_file() and jpg.is_file() else png

    def label_path(self, split: str, id: str) -> Path:
        return self.root / "segmentation" / f"{id}.png"

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.label_path(split, id)
        return decode.read_label8(path, "segmentation"), path

    def depth_m(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.root / "depth" / f"{id}.npy"
        return decode.nyudv2_depth(path), path

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        return decode.nyudv2_intrinsics(width, height)

    def normals(
        self, split: str, id: str, depth: np.ndarray | None, K: np.ndarray
    ) -> tuple[np.ndarray, Path | None]:
        path = self._png_or_npy("normals", id)
        normals = decode.nyudv2_normals(path)
        if depth is not None and depth.shape == normals.shape[1:]:
            normals = decode.nyudv2_normal_holes(normals, depth)
        return normals, path

    def edges(self, split: str, id: str, train_ids: np.ndarray | None) -> tuple[np.ndarray, Path | None]:
        path = self._png_or_npy("edge", id)
        return decode.nyudv2_edges(path), path

    def _png_or_npy(self, folder: str, id: str) -> Path:
        """<folder>/<id>.png (ATRC's release), or <folder>/<id>.npy where only that exists (MTI-Net's NYUD_MT)."""
        png = self.root / folder / f"{id}.png"
        npy = png.with_suffix(".npy")
        return npy if not png.is_file() and npy.is_file() else png


# -------------------------------------------------------------------------------------------------------------
# PASCAL-Context, multi-task (ASTMT / MTI-Net / ATRC "PASCALContext"): JPEGImages/, semseg/pascal-context/,
# human_parts/, sal_distill/, normals_distill/, pascal-context/trainval/, json/, ImageSets/Context/
# -------------------------------------------------------------------------------------------------------------


class PASCALContextDataset(DenseDataset):
    """PASCAL-Context for dense multi-task learning (4,998 train / 5,105 val images of at most 500x500).

    semseg: 21 classes (background + VOC) from semseg/VOC12/<id>.png if present, else semseg/pascal-context/;
    parts: PASCAL-Part persons from human_parts/<id>.mat grouped into human_parts7 (background, head, torso,
    upper/lower arms, upper/lower legs); images without an annotated person are ignored whole (255), as the
    literature; saliency: sal_distill/<id>.png > 0.5; normals: normals_distill/<id>.png, 2x/255 - 1, kept only on
    the PASCAL-Context classes that also are NYUDv2 classes (json/context_classes.json, json/nyu_classes.json:
    the names in both but "unknown", plus tvmonitor); edges: the thinned Laplacian of the 459-class LabelMap of
    pascal-context/trainval/<id>.mat. No depth. K is nominal (focal length = the longer side, centred): the
    photos have no calibration, and K only matters to geometric objectives.
    """

    name = "pascal_context"
    image_folder = "JPEGImages"
    supported_tasks = ("semseg", "parts", "saliency", "normals", "edges")
    needs_depth_for_normals = False
    needs_labels_for_edges = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._label_map_cache: tuple[str, np.ndarray] | None = None
        self._normal_classes: np.ndarray | None = None
        super().__init__(*args, **kwargs)

    def _official_split(self, split: str) -> tuple[list[str], Path]:
        path = self.root / "ImageSets" / "Context" / f"{split}.txt"
        if not path.is_file():
            raise DataError(
                f"{path}: no split {split!r} for PASCAL-Context (expected ImageSets/Context/train.txt, val.txt)"
            )
        return read_split_file(path), path

    def _required_folders(self) -> list[tuple[str, str]]:
        folders = {
            "parts": [("human_parts", "human parts")],
            "saliency": [("sal_distill", "saliency")],
            "normals": [("normals_distill", "normals"), ("pascal-context/trainval", "context labels")],
            "edges": [("pascal-context/trainval", "context labels")],
        }
        need = [f for t in self.tasks for f in folders.get(t, [])]
        if "semseg" in self.tasks and not (self.root / "semseg" / "VOC12").is_dir():
            need.append(("semseg/pascal-context", "segmentation"))
        return list(dict.fromkeys(need))

    def image_path(self, split: str, id: str) -> Path:
        return self.root / "JPEGImages" / f"{id}.jpg"

    def label_path(self, split: str, id: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{id}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{id}.png"

    def label_ids(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.label_path(split, id)
        return decode.pascal_semseg(path), path

    def intrinsics(self, split: str, id: str, width: int, height: int) -> np.ndarray:
        f = float(max(width, height))
        return decode.intrinsics(f, f, (width - 1) / 2.0, (height - 1) / 2.0)

    def label_map(self, id: str) -> tuple[np.ndarray, Path]:
        """The 459-class LabelMap of a sample (cached for the one sample being loaded) and its file."""
        path = self.root / "pascal-context" / "trainval" / f"{id}.mat"
        if self._label_map_cache is None or self._label_map_cache[0] != id:
            self._label_map_cache = (id, decode.pascal_label_map(path))
        return self._label_map_cache[1], path

    def normal_classes(self) -> np.ndarray:
        """Context class ids whose distilled normals are used: the names of json/context_classes.json that are
        in json/nyu_classes.json too (but "unknown"), plus tvmonitor."""
        if self._normal_classes is None:
            tables = []
            for name in ("context_classes", "nyu_classes"):
                path = self.root / "json" / f"{name}.json"
                try:
                    tables.append(json.loads(path.read_text()))
                except (OSError, ValueError) as e:
                    reason = " ".join(str(getattr(e, "strerror", None) or e).split())[:80]
                    raise DataError(
                        f"{path}: cannot read the class table the normals need ({reason}); copy "
                        "data/db_info/{context,nyu}_classes.json of the MTI-Net / ATRC code there, see "
                        "datasets/pascal_context/README.md"
                    ) from None
            context, nyu = tables
            ids = [int(context[n]) for n in nyu if n in context and n != "unknown"]
            if "tvmonitor" in context:
                ids.append(int(context["tvmonitor"]))
            self._normal_classes = np.array(sorted(set(ids)), np.int32)
        return self._normal_classes

    def normals(
        self, split: str, id: str, depth: np.ndarray | None, K: np.ndarray
    ) -> tuple[np.ndarray, Path | None]:
        label_map, _ = self.label_map(id)
        path = self.root / "normals_distill" / f"{id}.png"
        return decode.pascal_normals(path, label_map, self.normal_classes()), path

    def edges(self, split: str, id: str, train_ids: np.ndarray | None) -> tuple[np.ndarray, Path | None]:
        label_map, path = self.label_map(id)
        return decode.pascal_edges(label_map), path

    def parts(self, split: str, id: str, shape: tuple[int, int]) -> tuple[np.ndarray, Path]:
        path = self.root / "human_parts" / f"{id}.mat"
        parts = decode.pascal_human_parts(path, pascal_part_groups())
        if parts is None:  # no annotated person: the whole map is ignored (the literature's AddIgnoreRegions)
            parts = np.full(shape, IGNORE_INDEX, np.uint8)
        return parts, path

    def saliency(self, split: str, id: str) -> tuple[np.ndarray, Path]:
        path = self.root / "sal_distill" / f"{id}.png"
        return decode.pascal_saliency(path), path


# -------------------------------------------------------------------------------------------------------------

DATASET_CLASSES: dict[str, type[DenseDataset]] = {
    "synthia": SynthiaDataset,
    "cityscapes": CityscapesDataset,
    "vkitti2": VKitti2Dataset,
    "nyudv2": NYUDv2Dataset,
    "pascal_context": PASCALContextDataset,
}


def read_label_file(dataset: str, path: str | Path, colors_txt: str | Path | None = None) -> np.ndarray:
    """Dataset class ids [H,W] of one label file, decoded as the reader does (VKITTI2: colors.txt or uda/catalogue/classes/vkitti2.json)."""
    path = Path(path)
    if dataset == "synthia":
        return decode.synthia_label(path)
    if dataset == "vkitti2":
        table = get_id_table("vkitti2")
        if colors_txt is not None:
            colors = decode.vkitti2_colors(colors_txt, dict(zip(table.names, table.ids)))
        else:
            colors = {tuple(int(v) for v in c): i for c, i in zip(table.colors, table.ids)}
        return decode.vkitti2_label(path, colors)
    if dataset in ("cityscapes", "nyudv2", "pascal_context"):
        return decode.read_label8(path)
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASET_CLASSES)}")


def build_dataset(
    name: str,
    split: str,
    tasks: Sequence[str],
    label_set: str | None = None,
    root: str | Path | None = None,
    transform: Callable[[Sample], Sample] | None = None,
    frames: Sequence[int] = (),
    domain: int = 0,
    variation: str = "clone",
    sky_depth: str = "none",
) -> DenseDataset:
    """The reader for dataset `name` (root = its folder; default datasets/<name>) serving the given tasks.

    variation and sky_depth ("far": sky = 655.35 m, "none": sky = 0) are VKITTI2's; other datasets ignore
    them (their depth files have no sky code; uda.config.DataConfig refuses sky_depth="none" for them).
    """
    if name not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_CLASSES)}")
    kwargs: dict[str, Any] = {"variation": variation, "sky_depth": sky_depth} if name == "vkitti2" else {}
    return DATASET_CLASSES[name](split, tasks, label_set, root, transform, frames, domain, **kwargs)
