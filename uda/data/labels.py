"""Label sets and class mappings, read from the catalogue shipped in the package: uda/catalogue/
{labelsets,mappings,classes}/*.json (and the fixed split files uda/catalogue/<dataset>/splits/*.txt).

A *dataset id table* lists the ids a dataset stores on disk (e.g. Cityscapes labelIds -1..33).
A *label set* is the experiment's class list (train ids 0..C-1, 255 = ignore).
A *class map* sends dataset ids to train ids through a lookup table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# Package data (pyproject: [tool.setuptools.package-data]), so an installed wheel has it too. Torch-free on
# purpose: the command-line tools import this module to build their --help before importing torch.
CATALOGUE_DIR = Path(__file__).resolve().parents[1] / "catalogue"
IGNORE_INDEX = 255
DATASETS = ("synthia", "cityscapes", "vkitti2", "nyudv2", "pascal_context")
# The label set a dataset's ground truth is read in when none is named.
DEFAULT_LABEL_SETS = {
    "synthia": "synthia16",
    "cityscapes": "cityscapes16",
    "vkitti2": "vkitti2_14",
    "nyudv2": "nyudv2_40",
    "pascal_context": "pascal_context21",
}
LABEL_SETS: tuple[str, ...] = tuple(sorted(p.stem for p in (CATALOGUE_DIR / "labelsets").glob("*.json")))


def _read_json(path: Path) -> dict:
    """Read a catalogue JSON file; a missing or malformed file names itself."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: catalogue file missing; the installed uda package is incomplete (reinstall it)"
        ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}); fix the file") from None


def _check_name(kind: str, name: str, valid: tuple[str, ...]) -> None:
    if name not in valid:
        raise ValueError(f"unknown {kind} {name!r}; valid names: {', '.join(valid)}")


@dataclass(frozen=True, eq=False)
class LabelSet:
    """A named list of classes with train ids 0..C-1 and display colours; 255 is the ignore id."""

    name: str
    class_names: tuple[str, ...]
    colors: np.ndarray  # uint8 [C,3] RGB
    description: str = ""
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def same_classes(self, other: LabelSet) -> bool:
        """True if both sets have the same class names in the same order (e.g. synthia16 and cityscapes16)."""
        return self.class_names == other.class_names

    def colorize(self, label: np.ndarray | torch.Tensor) -> np.ndarray:
        """Colour a train-id map [H,W] as uint8 RGB [H,W,3]; ignore (255) and out-of-set ids are black."""
        if hasattr(label, "detach"):  # a torch.Tensor (torch is not imported here)
            label = label.detach().cpu().numpy()
        label = np.asarray(label)
        if label.ndim != 2:
            raise ValueError(f"colorize expects a [H,W] label map, got shape {label.shape}")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"colorize: train ids must lie in 0..255, got {label.min()}..{label.max()}")
        palette = np.zeros((256, 3), np.uint8)
        palette[: self.num_classes] = self.colors
        return palette[label.astype(np.intp)]


@dataclass(frozen=True, eq=False)
class IdTable:
    """The class ids a dataset stores on disk, with their names and colours."""

    dataset: str
    ids: tuple[int, ...]
    names: tuple[str, ...]
    colors: np.ndarray  # uint8 [N,3] RGB

    def name_of(self, dataset_id: int) -> str:
        """Class name of a dataset id."""
        return self.names[self.ids.index(dataset_id)]


@dataclass(frozen=True, eq=False)
class ClassMap:
    """Dataset ids -> train ids of a label set, as a lookup table over the dataset's id range."""

    dataset: str
    label_set: LabelSet
    id_table: IdTable
    mapping: dict[int, int]  # only the mapped ids; the other dataset ids go to 255
    _lut: np.ndarray  # uint8, index = dataset id - _offset
    _known: np.ndarray  # bool, which indices are ids of the dataset
    _offset: int

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Map an array of dataset ids to uint8 train ids (255 = ignore); ids unknown to the dataset raise ValueError."""
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"class ids must be integers, got dtype {ids.dtype}")
        if ids.size == 0:
            return np.zeros(ids.shape, np.uint8)
        idx = ids.astype(np.intp) - self._offset
        # The min/max test is cheap and guards the table look-up; the exact unknown ids are only listed on error.
        in_range = idx.min() >= 0 and idx.max() < len(self._lut)
        if not in_range or not self._known[idx].all():
            bad = sorted(int(v) for v in np.unique(ids) if int(v) not in self.id_table.ids)
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise ValueError(
                f"label ids {shown} are not {self.dataset} class ids "
                f"(valid: {min(self.id_table.ids)}..{max(self.id_table.ids)}, see uda/catalogue/classes/{self.dataset}.json)"
            )
        return self._lut[idx]


@cache
def get_label_set(name: str) -> LabelSet:
    """The label set called name, read from uda/catalogue/labelsets/<name>.json."""
    _check_name("label set", name, LABEL_SETS)
    path = CATALOGUE_DIR / "labelsets" / f"{name}.json"
    data = _read_json(path)
    classes = data["classes"]
    if [c["id"] for c in classes] != list(range(len(classes))):
        raise ValueError(f"{path}: class ids must be 0..{len(classes) - 1} in order; fix the file")
    return LabelSet(
        name=name,
        class_names=tuple(c["name"] for c in classes),
        colors=np.array([c["color"] for c in classes], np.uint8).reshape(-1, 3),
        description=data.get("description", ""),
    )


@cache
def get_id_table(dataset: str) -> IdTable:
    """The ids a dataset stores on disk, read from uda/catalogue/classes/<dataset>.json."""
    _check_name("dataset", dataset, DATASETS)
    path = CATALOGUE_DIR / "classes" / f"{dataset}.json"
    classes = _read_json(path)["classes"]
    ids = tuple(int(c["id"]) for c in classes)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate class ids; fix the file")
    return IdTable(
        dataset=dataset,
        ids=ids,
        names=tuple(c["name"] for c in classes),
        colors=np.array([c["color"] for c in classes], np.uint8).reshape(-1, 3),
    )


def available_label_sets(dataset: str) -> tuple[str, ...]:
    """Names of the label sets a dataset has a mapping to (uda/catalogue/mappings/<dataset>__<label set>.json)."""
    _check_name("dataset", dataset, DATASETS)
    return tuple(
        sorted(p.stem.split("__", 1)[1] for p in (CATALOGUE_DIR / "mappings").glob(f"{dataset}__*.json"))
    )


@cache
def get_class_map(dataset: str, label_set: str) -> ClassMap:
    """The map from a dataset's own ids to the train ids of label_set (unlisted dataset ids -> 255)."""
    _check_name("dataset", dataset, DATASETS)
    _check_name("label set", label_set, LABEL_SETS)
    valid = available_label_sets(dataset)
    if label_set not in valid:
        raise ValueError(
            f"no mapping from {dataset} to label set {label_set!r}; valid for {dataset}: {', '.join(valid)}"
        )
    path = CATALOGUE_DIR / "mappings" / f"{dataset}__{label_set}.json"
    labels = get_label_set(label_set)
    table = get_id_table(dataset)
    mapping = {int(k): int(v) for k, v in _read_json(path)["map"].items()}
    for k, v in mapping.items():
        if k not in table.ids:
            raise ValueError(f"{path}: {k} is not a {dataset} id; fix the file")
        if not 0 <= v < labels.num_classes:
            raise ValueError(
                f"{path}: train id {v} outside 0..{labels.num_classes - 1} of {label_set}; fix the file"
            )
    offset = min(table.ids)
    lut = np.full(max(table.ids) - offset + 1, IGNORE_INDEX, np.uint8)
    known = np.zeros(len(lut), bool)
    known[np.array(table.ids) - offset] = True
    for k, v in mapping.items():
        lut[k - offset] = v
    return ClassMap(dataset, labels, table, mapping, lut, known, offset)


@cache
def pascal_part_groups() -> dict[str, int]:
    """PASCAL-Part person part names -> human_parts7 ids (uda/catalogue/pascal_context/part_groups.json)."""
    return {
        str(k): int(v)
        for k, v in _read_json(CATALOGUE_DIR / "pascal_context" / "part_groups.json")["groups"].items()
    }
