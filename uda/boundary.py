"""Boundary detection benchmark in Python: optimal-dataset-scale F-measure (odsF), oisF and AP, equivalent to
the BSDS / SEISM MATLAB tools that MTI-Net, ATRC and their successors run on PASCAL-Context and NYUD-v2.

The protocol, per image and per threshold t of `BSDS_THRESHOLDS` (99 values 0.01 ... 0.99, both the BSDS
`linspace(1/(K+1), 1-1/(K+1), K)` with K = 99 and the parameter file MTI-Net's `eval_edge.py` writes):

1. binarise the edge probability map, `prob >= t` (Piotr Dollar's `edgesEvalImg` and MTI-Net's SEISM reader;
   SEISM's own `read_one_cont_png` uses `>`, which differs only for probabilities exactly on a threshold);
2. thin the binary map to a one-pixel skeleton with MATLAB's `bwmorph(.., 'thin', Inf)` (`thin` below; the
   BSDS benchmark and SEISM's reader thin, MTI-Net's custom reader does not: `thin=False`);
3. match predicted boundary pixels one-to-one to ground-truth boundary pixels that lie within
   `max_dist * diagonal` pixels (Euclidean, `d^2 <= r^2` as in BSDS `match.cc`), with `max_dist` = 0.0075 on
   PASCAL-Context and 0.011 on NYUD-v2 (the values the ATRC README gives for SEISM);
4. count cntR (matched GT pixels), sumR (GT pixels), cntP (matched predicted pixels), sumP (predicted pixels).

odsF is the best F over thresholds of the counts summed over the dataset; oisF sums, over images, the counts at
each image's own best threshold; AP integrates precision over recall 0:0.01:1 (SEISM's general_ods / ois / ap).

Matching. BSDS's `correspondPixels` solves a minimum-cost perfect matching (Goldberg's CSA) on the pairs within
the tolerance plus outlier nodes that cost `100 * r` per unmatched pixel. With one ground truth per image (the
case of PASCAL-Context and NYUD-v2) only the number of matched pixels enters the counts, and one more match
saves 2 * 100 r minus at most the length of its augmenting path, so the optimum is a maximum-cardinality
matching: we compute exactly that on the sparse graph of candidate pairs, as a unit-capacity maximum flow
(Dinic's algorithm, scipy.sparse.csgraph.maximum_flow; scipy's maximum_bipartite_matching took 20 s on some
480x640 thresholds where Dinic takes 10 ms). BSDS connects each pixel to only 6 random outlier nodes, so CSA
occasionally leaves a matchable pair unmatched: against the BSDS C++ code (pyEdgeEval 0.2.8's build of it) on
the same thinned maps, 8 synthetic 120x160 images x 99 thresholds, 121 of 792 (image, threshold) counts
differed, by at most 3 pixels and always in our favour, and odsF differed by +0.0004 (0.6976 vs 0.6973, same
threshold).

Ignore regions. SEISM evaluates the whole original image: its ground truth is `seg2bmap` of the full label map,
there is no ignore label. Here pixels labelled 255 are where the benchmark has no image (the padding of the
512x512 PASCAL-Context pipeline): the maps are cropped to the bounding box of the non-ignored pixels (so the
tolerance is relative to the original image's diagonal), predictions on ignored pixels inside it are dropped
before thresholding, and they are never ground truth. The ground-truth boundary map (label 1) is used as is
(SEISM's `seg2bmap` boundaries and the PASCAL-Context/NYUD edge labels are already one pixel wide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow
from scipy.spatial import cKDTree

IGNORE_LABEL = 255
# 0.01, 0.02, ..., 0.99: BSDS's linspace(1/100, 99/100, 99) and MTI-Net's SEISM parameter file.
BSDS_THRESHOLDS = np.linspace(1 / 100, 99 / 100, 99)
# The tolerance of the literature, as a fraction of the image diagonal (ATRC README, for SEISM's maxDist).
MAX_DIST = {"pascal_context": 0.0075, "nyudv2": 0.011}
COUNTS = ("cntR", "sumR", "cntP", "sumP")


def _thinning_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of MATLAB's bwmorph 'thin' (Lam, Lee & Suen 1992, p. 879).

    Bit i of the index is neighbour x_{i+1}: x1 east, then counter-clockwise (x2 north-east, x3 north, ...,
    x8 south-east). A pixel is deleted when G1 (crossing number X_H = 1), G2 (2 <= min(n1, n2) <= 3) and G3 (first
    sub-iteration: the expression (x2 | x3 | ~x8) & x1 is 0; second: (x6 | x7 | ~x4) & x5 is 0) hold.
    """
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> i) & 1 for i in range(8)] + [code & 1]  # x[8] = x1 closes the ring
        crossing = sum(1 for k in range(4) if not x[2 * k] and (x[2 * k + 1] or x[2 * k + 2]))
        n1 = sum(1 for k in range(4) if x[2 * k] or x[2 * k + 1])
        n2 = sum(1 for k in range(4) if x[2 * k + 1] or x[2 * k + 2])
        g12 = crossing == 1 and 2 <= min(n1, n2) <= 3
        first[code] = g12 and not ((x[1] or x[2] or not x[7]) and x[0])
        second[code] = g12 and not ((x[5] or x[6] or not x[3]) and x[4])
    return first, second


_LUTS = _thinning_luts()


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin binary maps [..., H, W] to one-pixel skeletons, as MATLAB's `bwmorph(mask, 'thin', Inf)`.

    Each map: two sub-iterations with parallel deletion, repeated until nothing changes. Only pixels next to
    a pixel deleted in the last two sub-iterations are re-examined (a pixel whose 3x3 neighbourhood did not
    change keeps the decision it got under the same table), so the cost follows the deleted area, not
    iterations x image size. Maps go one at a time: a single map's arrays stay in cache (a whole 99-map
    stack at once was 2.5x slower).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim < 2:
        raise ValueError(f"thin expects maps [..., H, W], got shape {mask.shape}")
    out = np.empty_like(mask)
    flat_maps = mask.reshape(-1, *mask.shape[-2:])
    for i, single in enumerate(flat_maps):
        out.reshape(-1, *mask.shape[-2:])[i] = _thin_one(single)
    return out


def _thin_one(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1).astype(np.uint8)
    flat = padded.reshape(-1)  # a view: the zero border keeps every neighbour inside the map
    width = padded.shape[-1]
    # x1 ... x8: east, then counter-clockwise.
    neighbours = np.array([1, 1 - width, -width, -width - 1, -1, width - 1, width, width + 1], dtype=np.int64)
    stamp = np.zeros(flat.size, dtype=np.int32)  # scratch for de-duplicating candidates without sorting
    pixels = np.flatnonzero(flat)
    last_deleted = np.empty(0, dtype=np.int64)
    sub, quiet, first_round = 0, 0, True
    while quiet < 2 and (pixels.size or last_deleted.size):
        code = np.zeros(pixels.size, dtype=np.uint8)
        for bit, offset in enumerate(neighbours):
            code |= flat[pixels + offset] << bit
        deleted = pixels[_LUTS[sub][code]]
        flat[deleted] = 0  # parallel: every decision above saw the map before this sub-iteration
        quiet = quiet + 1 if deleted.size == 0 else 0
        if first_round:  # the second sub-iteration of the first round still examines every pixel
            pixels = pixels[flat[pixels] != 0]
            first_round = False
        else:
            changed = np.concatenate([deleted, last_deleted])
            near = (changed[:, None] + neighbours).reshape(-1)
            near = near[flat[near] != 0]
            order = np.arange(near.size, dtype=np.int32)
            stamp[near] = order  # the last write wins: keep each pixel once
            pixels = near[stamp[near] == order]
        last_deleted = deleted
        sub = 1 - sub
    return padded[1:-1, 1:-1].astype(bool)


def _candidate_pairs(pred_yx: np.ndarray, gt_yx: np.ndarray, radius: float) -> csr_matrix:
    """Sparse [n_pred, n_gt] graph of the pairs with squared distance <= radius^2 (integer pixel offsets)."""
    n_pred, n_gt = len(pred_yx), len(gt_yx)
    if n_pred == 0 or n_gt == 0:
        return csr_matrix((n_pred, n_gt), dtype=np.int8)
    # A slightly larger search radius, then the exact integer test of BSDS's match.cc.
    pairs = cKDTree(pred_yx).sparse_distance_matrix(cKDTree(gt_yx), radius + 1e-6, output_type="ndarray")
    i, j = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64)
    d2 = ((pred_yx[i] - gt_yx[j]) ** 2).sum(1)
    keep = d2 <= radius * radius
    ones = np.ones(int(keep.sum()), dtype=np.int8)
    return csr_matrix((ones, (i[keep], j[keep])), shape=(n_pred, n_gt))


def _max_matching(graph: csr_matrix) -> int:
    """Size of a maximum matching of a bipartite graph [n1, n2], as the unit-capacity flow source -> rows ->
    columns -> sink (Dinic: the Hopcroft-Karp bound O(E sqrt(V)) on such networks)."""
    n1, n2 = graph.shape
    if graph.nnz == 0:
        return 0
    pairs = graph.tocoo()
    sink = n1 + n2 + 1
    src = np.concatenate([np.zeros(n1, np.int64), 1 + pairs.row, np.arange(1 + n1, 1 + n1 + n2)])
    dst = np.concatenate([np.arange(1, 1 + n1), 1 + n1 + pairs.col, np.full(n2, sink)])
    network = csr_matrix((np.ones(src.size, np.int32), (src, dst)), shape=(sink + 1, sink + 1))
    return int(maximum_flow(network, 0, sink, method="dinic").flow_value)


def match_count(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """Size of a maximum one-to-one matching between the True pixels of two [H,W] maps within `radius` pixels."""
    return _max_matching(_candidate_pairs(np.argwhere(pred), np.argwhere(gt), radius))


def _valid_box(valid: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(valid.any(1)), np.flatnonzero(valid.any(0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def boundary_counts(
    prob: np.ndarray,
    gt: np.ndarray,
    max_dist: float,
    thresholds: Sequence[float] | np.ndarray = BSDS_THRESHOLDS,
    thin_prediction: bool = True,
) -> np.ndarray:
    """Counts [K, 4] (cntR, sumR, cntP, sumP) of one image at each of the K thresholds.

    prob: edge probability [H,W] in [0,1]; gt: [H,W] with 1 on boundaries, 0 elsewhere, 255 ignored (see the
    module docstring); max_dist: matching tolerance as a fraction of the image diagonal.
    """
    prob = np.asarray(prob, dtype=np.float64)
    gt = np.asarray(gt)
    if prob.shape != gt.shape or prob.ndim != 2:
        raise ValueError(f"prob {prob.shape} and gt {gt.shape} must be [H,W] maps of the same size")
    thresholds = np.asarray(thresholds, dtype=np.float64)
    counts = np.zeros((len(thresholds), 4), dtype=np.int64)
    valid = gt != IGNORE_LABEL
    box = _valid_box(valid)
    prob, gt, valid = prob[box], gt[box], valid[box]
    if prob.size == 0:
        return counts
    gt_edges = (gt == 1) & valid
    counts[:, 1] = int(gt_edges.sum())
    prob = np.where(valid, prob, 0.0)
    # edgesEvalImg binarises with E >= max(eps, t): a zero probability is never a boundary.
    binary = prob[None] >= np.maximum(thresholds, np.finfo(np.float64).eps)[:, None, None]
    if thin_prediction:
        binary = thin(binary)
    ks, flat = np.nonzero(binary.reshape(len(thresholds), -1))
    counts[:, 3] = np.bincount(ks, minlength=len(thresholds))
    if flat.size == 0 or counts[0, 1] == 0:
        return counts
    height, width = gt.shape
    radius = max_dist * math.hypot(height, width)
    # One candidate graph for the union of all thresholds' pixels; each threshold takes its rows.
    union = np.unique(flat)
    gt_flat = np.flatnonzero(gt_edges)
    graph = _candidate_pairs(
        np.stack(np.divmod(union, width), 1), np.stack(np.divmod(gt_flat, width), 1), radius
    )
    rows_of = np.searchsorted(union, flat)
    matchable = np.diff(graph.indptr) > 0
    starts = np.searchsorted(ks, np.arange(len(thresholds) + 1))
    for k in range(len(thresholds)):
        rows = rows_of[starts[k] : starts[k + 1]]
        rows = rows[matchable[rows]]
        if rows.size:
            matched = _max_matching(graph[rows])
            counts[k, 0] = counts[k, 2] = matched  # one ground truth: matched GT = matched predicted pixels
    return counts


def precision_recall(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall [...] from counts [..., 4], with SEISM's conventions for empty maps: no GT boundary
    gives recall 1 and precision 0, no predicted boundary gives recall 0 and precision 1."""
    counts = np.asarray(counts, dtype=np.float64)
    cnt_r, sum_r, cnt_p, sum_p = np.moveaxis(counts, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(sum_r > 0, cnt_r / sum_r, 1.0)
        precision = np.where(sum_r > 0, cnt_p / sum_p, 0.0)
    no_pred = (sum_p == 0) & (sum_r > 0)
    recall = np.where(no_pred, 0.0, recall)
    precision = np.where(no_pred, 1.0, precision)
    return precision, recall


def f_measure(counts: np.ndarray) -> np.ndarray:
    """F = 2PR / (P + R) [...] from counts [..., 4]; 0 where P + R = 0."""
    precision, recall = precision_recall(counts)
    total = precision + recall
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * precision * recall / total, 0.0)


def average_precision(counts: np.ndarray) -> float:
    """SEISM's general_ap: precision interpolated linearly over recall at 0, 0.01, ..., 1 (points outside the
    recall range of the curve count as 0) and averaged over the 101 points, from dataset counts [K, 4]."""
    precision, recall = precision_recall(counts)
    recall_values, first = np.unique(recall, return_index=True)  # first occurrence, as MATLAB's unique
    if recall_values.size < 2:
        return 0.0
    grid = np.linspace(0, 1, 101)
    inside = (grid >= recall_values[0]) & (grid <= recall_values[-1])
    return float(np.interp(grid[inside], recall_values, precision[first]).sum() / 100)


def ods_ois_ap(
    dataset_counts: np.ndarray, ois_counts: np.ndarray, thresholds: np.ndarray = BSDS_THRESHOLDS
) -> dict[str, float]:
    """odsF, its precision, recall and threshold, oisF and AP from summed counts [K, 4] and the sum [4] of each
    image's counts at its best threshold."""
    f = f_measure(dataset_counts)
    best = int(np.argmax(f))  # the first maximum, as MATLAB's max
    precision, recall = precision_recall(dataset_counts[best])
    return {
        "odsf": float(f[best]),
        "ods_precision": float(precision),
        "ods_recall": float(recall),
        "ods_threshold": float(thresholds[best]),
        "oisf": float(f_measure(ois_counts)),
        "ap": average_precision(dataset_counts),
    }


def _image_counts(args: tuple) -> np.ndarray:
    return boundary_counts(*args)


def evaluate_boundaries(
    probs: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    max_dist: float,
    thresholds: Sequence[float] | np.ndarray = BSDS_THRESHOLDS,
    thin_prediction: bool = True,
    workers: int = 1,
) -> dict[str, float]:
    """odsF, oisF and AP (fractions) of edge probability maps against boundary maps; `workers` > 1 spreads
    the images over that many processes (each image is independent)."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    jobs = [(p, g, max_dist, thresholds, thin_prediction) for p, g in zip(probs, gts, strict=True)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            per_image = list(pool.map(_image_counts, jobs, chunksize=4))
    else:
        per_image = [_image_counts(job) for job in jobs]
    total = np.zeros((len(thresholds), 4), dtype=np.int64)
    ois = np.zeros(4, dtype=np.int64)
    for counts in per_image:
        total += counts
        ois += counts[int(np.argmax(f_measure(counts)))]
    return ods_ois_ap(total, ois, thresholds)


def synthetic_edge_maps(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A realistic-looking test pair: (edge probability [H,W] float32 in [0,1], boundary map [H,W] uint8).

    The ground truth is the one-pixel boundary of a random Voronoi partition (as SEISM's seg2bmap of a label
    map); the prediction is a blurred ridge along a slightly shifted copy of it, with per-region strength,
    spurious ridges and noise, like a network's sigmoid output. For benchmarks and tests.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    rng = np.random.default_rng(seed)
    seeds = rng.uniform([0, 0], [height, width], size=(int(rng.integers(6, 16)), 2))
    yy, xx = np.mgrid[0:height, 0:width]
    labels = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, axis=-1)
    gt = np.zeros((height, width), dtype=np.uint8)
    gt[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    gt[:-1, :] |= labels[:-1, :] != labels[1:, :]
    shifted = np.roll(gt, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
    distance = distance_transform_edt(shifted == 0)
    strength = rng.uniform(0.3, 1.0, size=len(seeds))[labels]
    prob = strength * np.exp(-(distance**2) / (2 * rng.uniform(1.0, 2.5) ** 2))
    spurious = np.zeros((height, width))
    for _ in range(int(rng.integers(1, 5))):
        r0, c0 = rng.integers(0, [height, width])
        length = int(rng.integers(10, max(11, min(height, width) // 2)))
        angle = rng.uniform(0, np.pi)
        t = np.arange(length)
        rows = np.clip((r0 + t * np.sin(angle)).astype(int), 0, height - 1)
        cols = np.clip((c0 + t * np.cos(angle)).astype(int), 0, width - 1)
        spurious[rows, cols] = rng.uniform(0.2, 0.8)
    noise = 0.05 * gaussian_filter(rng.random((height, width)), 2)  # a low background floor, mean 0.025
    prob = prob + gaussian_filter(spurious, 1.5) * 3 + noise
    return np.clip(prob, 0, 1).astype(np.float32), gt
