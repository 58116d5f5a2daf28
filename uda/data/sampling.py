"""Rare-class sampling of a labelled training stream (DAFormer, Hoyer et al. 2022, §3.3).

Class c is drawn with p(c) = softmax_c((1 - f_c) / T), f_c the share of the split's labelled pixels that are of
class c (T = 0.01 by default), then an image uniformly among those holding at least `min_pixels` pixels of c.
Classes no image holds that often are left out of the draw.

The per-image class pixel counts are computed once per (dataset folder, split, label set) by reading every label
file of the split, and cached as JSON in the run-independent cache folder
`$UDA_CACHE_DIR/class_stats/` (default `$XDG_CACHE_HOME/uda` or `~/.cache/uda`), named
`<dataset>-<split>-<label_set>-<key>.json` where `key` hashes the dataset folder, the split's ids, the path, size
and modification time of each label file and the class map (a changed split, label file or class map is counted
again; a VKITTI2 variation has its own label files). The cache is not next to the split file because the split files of SYNTHIA and VKITTI2
ship inside the package and a dataset folder is often read-only.

The draw of stream position `pos` depends on (seed, pos) alone, so a resumed run draws what an uninterrupted
one draws.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from uda.files import write_text_atomic

IGNORE_INDEX = 255


def cache_dir() -> Path:
    """The run-independent cache folder of uda ($UDA_CACHE_DIR, else $XDG_CACHE_HOME/uda, else ~/.cache/uda)."""
    if os.environ.get("UDA_CACHE_DIR"):
        return Path(os.environ["UDA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uda"


def class_pixel_counts(dataset, num_classes: int) -> np.ndarray:
    """[N, num_classes] int64 pixel counts of each class (label-set ids) in each image of a reader's split
    (ignore excluded), at the label files' resolution; an unknown label id is a DataError naming its file."""
    rows = []
    for split, id in dataset.items:
        ids, path = dataset.label_ids(split, id)
        train_ids = np.asarray(dataset.to_train_ids(ids, path)).ravel()
        valid = train_ids[train_ids != IGNORE_INDEX].astype(np.int64)
        rows.append(np.bincount(valid, minlength=num_classes)[:num_classes])
    return np.stack(rows)


def _label_file_state(path: Path) -> list:
    """(path, size, mtime in ns) of a label file; a missing one is recorded as such (reading it will fail)."""
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None]
    return [str(path), st.st_size, st.st_mtime_ns]


def stats_path(dataset) -> Path:
    """Where the class statistics of a reader's split are cached (see the module docstring)."""
    # Everything the counts depend on: the label files themselves (their paths carry e.g. the VKITTI2
    # variation; size and mtime change when a file is rewritten) and the class map they are read through.
    files = [_label_file_state(dataset.label_path(s, i)) for s, i in dataset.items]
    mapping = sorted(dataset.class_map.mapping.items())
    key = hashlib.sha256(
        json.dumps(
            [str(Path(dataset.root).resolve()), [list(i) for i in dataset.items], files, mapping]
        ).encode()
    ).hexdigest()[:16]
    name = f"{dataset.name}-{dataset.split}-{dataset.label_set}-{key}.json"
    return cache_dir() / "class_stats" / name


def class_stats(dataset, num_classes: int) -> np.ndarray:
    """[N, num_classes] class pixel counts of a reader's split, from the cache or computed once and cached
    (written atomically, so concurrent processes never read a partial file)."""
    path = stats_path(dataset)
    try:
        data = json.loads(path.read_text())
        counts = np.asarray(data["counts"], dtype=np.int64)
        if counts.shape == (len(dataset.items), num_classes):
            return counts
    except (OSError, ValueError, KeyError):
        pass
    counts = class_pixel_counts(dataset, num_classes)
    record = {"dataset": dataset.name, "split": dataset.split, "label_set": dataset.label_set}
    record["ids"] = [i for _, i in dataset.items]
    record["counts"] = counts.tolist()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record))
    except OSError:
        pass  # an unwritable cache only costs the count again next run
    return counts


def class_probabilities(
    counts: np.ndarray, temperature: float, drawn: np.ndarray | None = None
) -> np.ndarray:
    """DAFormer's p(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T) over the classes with pixels
    (f_c: class c's share of all labelled pixels); 0 for absent classes, and for those `drawn` (bool [C])
    leaves out: they still count in every f_c. float64 [C]."""
    totals = counts.sum(axis=0).astype(np.float64)
    freq = totals / max(1.0, totals.sum())
    keep = totals > 0 if drawn is None else (totals > 0) & drawn
    logits = np.where(keep, (1.0 - freq) / temperature, -np.inf)
    logits -= logits[np.isfinite(logits)].max()
    p = np.exp(logits)
    return p / p.sum()


class RareClassDraw:
    """position -> image index of a rare-class-sampled stream: a class by `class_probabilities` (restricted to
    classes some image holds >= min_pixels of), then uniformly one of those images; seeded by (seed, pos)."""

    def __init__(self, counts: np.ndarray, temperature: float, min_pixels: int, seed: int) -> None:
        self.images = [np.flatnonzero(counts[:, c] >= max(1, min_pixels)) for c in range(counts.shape[1])]
        eligible = np.array([len(i) > 0 for i in self.images])
        if not eligible.any():
            raise ValueError(
                f"rare-class sampling: no image holds {min_pixels} pixels of any class; lower "
                "self_training.rcs_min_pixels"
            )
        # Only the draw leaves ineligible classes out: their pixels still belong to the split, so f_c stays
        # the share of all labelled pixels (zeroing their counts would inflate every other f_c).
        p = class_probabilities(counts, temperature, eligible)
        self.probabilities = torch.as_tensor(p)
        self.seed = seed

    def __call__(self, pos: int) -> int:
        """The dataset index drawn at stream position `pos`."""
        g = torch.Generator().manual_seed((self.seed * 7919 + pos) % (2**63 - 1))
        c = int(torch.multinomial(self.probabilities, 1, generator=g))
        images = self.images[c]
        return int(images[int(torch.randint(len(images), (1,), generator=g))])


class RareClassSampling:
    """How a stream draws its samples (StreamNeeds.sampling): (dataset, seed) -> RareClassDraw."""

    def __init__(self, num_classes: int, temperature: float = 0.01, min_pixels: int = 3000) -> None:
        self.num_classes, self.temperature, self.min_pixels = num_classes, temperature, min_pixels

    def __call__(self, dataset, seed: int) -> RareClassDraw:
        return RareClassDraw(class_stats(dataset, self.num_classes), self.temperature, self.min_pixels, seed)
