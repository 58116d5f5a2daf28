"""Where the datasets are: `--data-root` names the folder HOLDING the dataset folders (`datasets/` with
`datasets/cityscapes/` inside). Torch-free, so command lines can resolve and check paths before importing torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import uda
from uda.data.decode import DataError

# The top-level folder (a glob) of each dataset's on-disk layout whose presence means "this is the dataset's
# folder"; the same globs the readers check (uda.data.readers: DenseDataset.image_folder).
DATASET_LAYOUT = {
    "synthia": "RGB",
    "cityscapes": "leftImg8bit",
    "vkitti2": "Scene*",
    "nyudv2": "images",
    "pascal_context": "JPEGImages",
}


def default_root() -> Path:
    """$UDA_DATA_ROOT if set, else the clone's datasets/ folder (or ./datasets outside a clone)."""
    env = os.environ.get("UDA_DATA_ROOT")
    if env:
        return Path(env)
    clone = Path(uda.__file__).resolve().parents[1] / "datasets"
    return clone if clone.is_dir() else Path("datasets")


def has_layout(folder: Path, dataset: str) -> bool:
    """True when `folder` holds the top-level layout folder of `dataset` (e.g. cityscapes: leftImg8bit/)."""
    pattern = DATASET_LAYOUT.get(dataset)
    return pattern is not None and folder.is_dir() and any(p.is_dir() for p in folder.glob(pattern))


def dataset_folder(root: Path | str | None, dataset: str) -> Path:
    """The folder of `dataset` under the data root `root` (None: default_root()). A root that is the dataset's
    folder itself is accepted with a note on stderr; anything else raises DataError with a one-line fix."""
    root = default_root() if root is None else Path(root)
    if (root / dataset).is_dir():
        return root / dataset
    if root.is_dir() and (root.name == dataset or has_layout(root, dataset)):
        print(
            f"note: {root} is the {dataset} folder itself; using it "
            "(--data-root names the folder that holds the dataset folders)",
            file=sys.stderr,
        )
        return root
    raise DataError(
        f"{root}: no {dataset} folder here; --data-root names the folder holding the dataset folders "
        f"(e.g. datasets/ with datasets/{dataset}/ inside); see datasets/{dataset}/README.md for how to obtain it"
    )
