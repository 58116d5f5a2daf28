"""Cluster a dataset's training normals on the unit sphere: the label regions of ATRC's normals label context.

    uda-normal-clusters --dataset nyudv2 --data-root /data --out nyudv2_normal_clusters.json
    uda-normal-clusters --dataset synthia -k 40 --samples-per-image 1000 --limit 500 --out clusters.json

Reads the normals of the split with the dataset reader (NYUD-v2 from its files; the others derived from metric
depth), samples up to --samples-per-image valid normals (|n| > 0.5) of each image, runs scikit-learn KMeans on
them (unit vectors: Euclidean k-means, the centroids then normalised back onto the sphere — spherical k-means'
assignment, since for unit vectors the nearest centroid by distance is the one of largest cosine), and writes
{"centroids": [[x, y, z], ...], "dataset", "split", "samples"} as JSON. Pass the file as model.normal_clusters.
Usage errors print one line `error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def sample_normals(dataset, samples_per_image: int, limit: int | None, seed: int, progress: bool = False):
    """Up to samples_per_image valid unit normals of each of the first `limit` samples -> array [N,3]."""
    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    chunks = []
    for i in tqdm(range(n), desc="normals", unit="image", disable=not progress, file=sys.stderr):
        normals = dataset[i]["normals"].reshape(3, -1).T.numpy()
        norm = np.linalg.norm(normals, axis=1)
        valid = normals[norm > 0.5] / norm[norm > 0.5, None]
        if len(valid) > samples_per_image:
            valid = valid[rng.choice(len(valid), samples_per_image, replace=False)]
        chunks.append(valid)
    return np.concatenate(chunks) if chunks else np.zeros((0, 3))


def cluster(normals, k: int, seed: int):
    """KMeans (scikit-learn, n_init 4) on unit normals [N,3] -> k unit centroids [k,3]."""
    import numpy as np
    from sklearn.cluster import KMeans

    centres = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(normals).cluster_centers_
    return centres / np.linalg.norm(centres, axis=1, keepdims=True).clip(min=1e-12)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uda-normal-clusters",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="(in a clone without installing: python tools/normal_clusters.py ...)",
    )
    from uda.data.labels import DATASETS

    p.add_argument("--dataset", required=True, choices=DATASETS, help="the dataset whose normals to cluster")
    p.add_argument(
        "--data-root",
        type=Path,
        help="the folder holding the dataset folders (default: $UDA_DATA_ROOT if set, else datasets/)",
    )
    p.add_argument("--split", default="train", help="split to read (default: train)")
    p.add_argument("-k", "--clusters", type=int, default=40, help="number of clusters (default: 40, ATRC's)")
    p.add_argument("--samples-per-image", type=int, default=2000, help="valid normals sampled per image")
    p.add_argument("--limit", type=int, default=None, help="read at most this many images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling and k-means seed (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """uda-normal-clusters: write the centroids; 2 on a usage error, 1 when the data cannot be read."""
    args = build_parser().parse_args(argv)
    if args.clusters < 1 or args.samples_per_image < 1 or (args.limit is not None and args.limit < 1):
        print("error: -k, --samples-per-image and --limit must be >= 1", file=sys.stderr)
        return 2
    from uda.data.decode import DataError
    from uda.data.readers import build_dataset
    from uda.data.roots import dataset_folder

    try:
        root = dataset_folder(args.data_root, args.dataset)
        dataset = build_dataset(args.dataset, args.split, ["normals"], None, root)
        normals = sample_normals(dataset, args.samples_per_image, args.limit, args.seed, not args.quiet)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    if len(normals) < args.clusters:
        print(f"error: {len(normals)} valid normals found, fewer than -k {args.clusters}", file=sys.stderr)
        return 1
    centroids = cluster(normals, args.clusters, args.seed)
    record = {
        "centroids": [[round(float(x), 7) for x in c] for c in centroids],
        "dataset": args.dataset,
        "split": args.split,
        "samples": len(normals),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.clusters} centroids of {len(normals)} normals ({args.dataset} {args.split}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
