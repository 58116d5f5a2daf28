"""Boundary odsF (uda/boundary.py): thinning, one-to-one matching and the counts on cases with exact answers.

The constructed images are 60x80, whose diagonal is exactly 100 px, so max_dist = 0.03 is a tolerance of
r = 3 px (a pair matches when dy^2 + dx^2 <= 9).
"""

import numpy as np
import pytest
from scipy.ndimage import label
from scipy.optimize import linear_sum_assignment

from uda.boundary import (
    BSDS_THRESHOLDS,
    average_precision,
    boundary_counts,
    evaluate_boundaries,
    f_measure,
    match_count,
    synthetic_edge_maps,
    thin,
)

H, W, TOL = 60, 80, 0.03  # r = 0.03 * 100 = 3 px


def line(row: int, width: int = 1, value: float = 1.0) -> np.ndarray:
    """A horizontal band of `width` rows starting at `row`, columns 10..69 (60 px long)."""
    m = np.zeros((H, W))
    m[row : row + width, 10:70] = value
    return m


GT = line(30).astype(np.uint8)  # 60 boundary pixels


def counts_at_half(prob: np.ndarray, gt: np.ndarray, **kw) -> list[int]:
    return boundary_counts(prob, gt, TOL, thresholds=[0.5], **kw)[0].tolist()


def test_thresholds_are_the_bsds_ones():
    # linspace(1/(K+1), 1-1/(K+1), K) with K = 99 = 0.01, 0.02, ..., 0.99 (MTI-Net's parameter file).
    assert len(BSDS_THRESHOLDS) == 99
    np.testing.assert_allclose(BSDS_THRESHOLDS, np.arange(1, 100) / 100)


def test_thinning_matches_the_published_example_and_keeps_topology():
    # scikit-image's `thin` docstring example (the MATLAB bwmorph 'thin' algorithm): a 5x3 block with a tail.
    square = np.zeros((7, 7), dtype=bool)
    square[1:-1, 2:-2] = True
    square[0, 1] = True
    expected = np.zeros((7, 7), dtype=bool)
    expected[[0, 1, 2, 3, 4], [1, 2, 3, 3, 3]] = True
    np.testing.assert_array_equal(thin(square), expected)

    rng = np.random.default_rng(0)
    maps = rng.random((5, 40, 50)) < 0.55
    thinned = thin(maps)
    eight = np.ones((3, 3))
    for m, t in zip(maps, thinned, strict=True):
        np.testing.assert_array_equal(t, thin(m))  # a stack is thinned map by map
        assert not (t & ~m).any()  # only deletes
        np.testing.assert_array_equal(thin(t), t)  # a skeleton is stable
        assert label(t, eight)[1] == label(m, eight)[1]  # 8-connected components survive


def test_a_thick_bar_thins_to_its_middle_row():
    # A 3x60 bar loses its top and bottom rows and the two end pixels of the middle row: 58 pixels remain.
    skeleton = thin(line(29, width=3) > 0)
    rows, cols = np.nonzero(skeleton)
    assert set(rows) == {30} and (cols.min(), cols.max(), len(cols)) == (11, 68, 58)


def test_shift_within_and_beyond_the_tolerance():
    # Shifted by 2 rows: every pixel has its partner at distance 2 <= 3: all 60 match, F = 1.
    assert counts_at_half(line(32), GT) == [60, 60, 60, 60]
    # Shifted by 3 rows: distance 3 = r still matches (BSDS tests d^2 <= r^2).
    assert counts_at_half(line(33), GT) == [60, 60, 60, 60]
    # Shifted by 4 rows: the nearest GT pixel is 4 > 3 away: nothing matches, F = 0.
    shifted = counts_at_half(line(34), GT)
    assert shifted == [0, 60, 0, 60] and f_measure(np.array(shifted)) == 0


def test_thick_prediction_against_thin_gt():
    # Thinned: the 58-pixel middle row lies on the GT: cntR = cntP = 58, sumR = 60, sumP = 58,
    # P = 1, R = 58/60, F = 2 * 58 / (58 + 60) = 116/118.
    thick = line(29, width=3)
    counts = counts_at_half(thick, GT)
    assert counts == [58, 60, 58, 58]
    assert f_measure(np.array(counts)) == pytest.approx(116 / 118)
    # Without thinning (MTI-Net's reader): 180 predicted pixels, at most 60 matched one-to-one:
    # P = 60/180, R = 1, F = 2 * (1/3) / (4/3) = 0.5.
    raw = counts_at_half(thick, GT, thin_prediction=False)
    assert raw == [60, 60, 60, 180] and f_measure(np.array(raw)) == pytest.approx(0.5)


def test_empty_prediction_and_empty_gt():
    # No prediction: SEISM sets P = 1, R = 0, so F = 0; the GT still counts in sumR.
    assert counts_at_half(np.zeros((H, W)), GT) == [0, 60, 0, 0]
    assert f_measure(np.array([0, 60, 0, 0])) == 0
    # No GT boundary: R = 1, P = 0, F = 0; the predicted pixels count in sumP.
    assert counts_at_half(line(30), np.zeros((H, W))) == [0, 0, 0, 60]
    assert f_measure(np.array([0, 0, 0, 60])) == 0


def test_matching_is_one_to_one():
    # One GT pixel, two predicted pixels 1 px left and right of it: both are within r, only one may match.
    # cntR = 1 of sumR = 1, cntP = 1 of sumP = 2: P = 1/2, R = 1, F = 2/3.
    gt = np.zeros((H, W), dtype=np.uint8)
    gt[30, 40] = 1
    prob = np.zeros((H, W))
    prob[30, [39, 41]] = 1.0
    counts = counts_at_half(prob, gt)
    assert counts == [1, 1, 1, 2] and f_measure(np.array(counts)) == pytest.approx(2 / 3)


def test_maximum_matching_equals_an_exact_assignment():
    # The count is the maximum one-to-one matching; a dense Hungarian assignment that rewards pairs within r
    # gives the same number, on random sparse maps where greedy matching would fall short.
    rng = np.random.default_rng(1)
    for _ in range(20):
        pred, gt = rng.random((2, 25, 30)) < 0.08
        radius = float(rng.choice([1.0, 1.5, 2.5]))
        p, g = np.argwhere(pred), np.argwhere(gt)
        within = ((p[:, None] - g[None]) ** 2).sum(-1) <= radius**2
        rows, cols = linear_sum_assignment(-within.astype(float))
        assert match_count(pred, gt, radius) == int(within[rows, cols].sum())


def test_ignored_padding_is_cropped_away():
    # The 60x80 image pasted into a 100x120 canvas padded with 255 (PASCAL-Context's pad-to-512): the same
    # counts as the unpadded image, because the tolerance follows the valid area's diagonal (100 px, r = 3)
    # rather than the canvas' (156 px, r = 4.7, which would match the 4-row shift), and a prediction on the
    # padding is dropped.
    def padded(m: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((100, 120), fill)
        out[20:80, 30:110] = m
        return out

    gt = padded(GT, 255)
    prob = padded(line(34), 0.0)
    prob[:10, :] = 1.0  # on the padding
    assert counts_at_half(prob, gt) == [0, 60, 0, 60]
    assert counts_at_half(padded(line(32), 0.0), gt) == [60, 60, 60, 60]


def test_ods_ois_and_ap_over_thresholds_and_images():
    # Image A: the GT line at probability 0.85 and a spurious line 10 rows away at 0.25.
    #   t <= 0.25: 60 of 120 predicted pixels match; 0.25 < t <= 0.85: P = R = 1; above: nothing predicted.
    # Image B: the GT line at probability 0.55 only: P = R = 1 for t <= 0.55, nothing above.
    # Summed (R, P): t <= 0.25: (1, 120/180); 0.26 ... 0.55: (1, 1); 0.56 ... 0.85: (60/120, 1); above: sumP = 0,
    # so (0, 1). odsF = 1, first reached at t = 0.26; each image's own best F is 1 too: oisF = 1.
    a = line(30, value=0.85) + line(40, value=0.25)
    b = line(30, value=0.55)
    result = evaluate_boundaries([a, b], [GT, GT], TOL)
    assert result["odsf"] == pytest.approx(1.0) and result["oisf"] == pytest.approx(1.0)
    assert result["ods_threshold"] == pytest.approx(0.26)
    # AP (SEISM's general_ap): MATLAB's unique keeps the first (lowest-threshold) point of each recall value:
    # (R, P) = (0, 1), (0.5, 1), (1, 2/3); precision interpolated linearly over R = 0, 0.01, ..., 1 and summed / 100:
    # P = 1 up to R = 0.5, then linear down to 2/3 at R = 1.
    grid = np.linspace(0, 1, 101)
    expected = np.where(grid <= 0.5, 1.0, 1.0 - (grid - 0.5) / 0.5 * (1 / 3)).sum() / 100
    counts = sum(boundary_counts(p, GT, TOL) for p in (a, b))
    assert average_precision(counts) == pytest.approx(expected)
    assert result["ap"] == pytest.approx(expected)


def test_a_wider_tolerance_never_matches_fewer_pixels():
    # On realistic maps (shifted blurred ridges): a larger radius only adds candidate pairs, so every matched
    # count grows or stays, while the predicted and GT sums do not change; per-image thresholds (oisF) are at
    # least as good as one threshold for the set (odsF).
    probs, gts = zip(*(synthetic_edge_maps(48, 64, seed) for seed in range(2)), strict=True)
    tight = sum(boundary_counts(p, g, 0.011) for p, g in zip(probs, gts, strict=True))
    loose = sum(boundary_counts(p, g, 0.05) for p, g in zip(probs, gts, strict=True))
    np.testing.assert_array_equal(tight[:, [1, 3]], loose[:, [1, 3]])
    assert (loose[:, 0] >= tight[:, 0]).all() and (loose[:, 0] > tight[:, 0]).any()
    result = evaluate_boundaries(probs, gts, 0.05)
    assert 0 < result["odsf"] <= result["oisf"] <= 1 and 0 < result["ap"] <= 1
    assert evaluate_boundaries(probs, gts, 0.05, workers=2) == result  # images are independent
