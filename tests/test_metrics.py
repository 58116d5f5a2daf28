"""Streaming metrics against scikit-learn and numpy loops, and exact reduction of their summed state."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from uda.boundary import evaluate_boundaries, synthetic_edge_maps
from uda.metrics import (
    METRIC_DIRECTIONS,
    NO_DIRECTION,
    PRIMARY_METRICS,
    BoundaryOdsF,
    DepthMetric,
    EdgesMetric,
    MissingBaselineError,
    MultiTaskMetrics,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
    delta_keys,
    metric_direction,
    multitask_delta,
)


def random_segmentation(seed: int, num_present: int, batch: int = 3, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_present, (batch, h, w), generator=g)
    pred = torch.randint(0, num_present, (batch, h, w), generator=g)
    target[torch.rand(batch, h, w, generator=g) < 0.2] = 255
    return pred, target


def test_confusion_and_miou_match_sklearn():
    metric = SegmentationMetric(num_classes=6)  # classes 4 and 5 never occur
    preds, targets = [], []
    for seed in range(3):
        pred, target = random_segmentation(seed, num_present=4)
        metric.update(pred, target)
        preds.append(pred.reshape(-1).numpy())
        targets.append(target.reshape(-1).numpy())
    p, t = np.concatenate(preds), np.concatenate(targets)
    keep = t != 255
    cm = confusion_matrix(t[keep], p[keep], labels=list(range(6)))
    np.testing.assert_array_equal(metric.state()["confusion"].numpy(), cm)

    result = metric.compute()
    present = sorted(set(t[keep]) | set(p[keep]))
    assert present == [0, 1, 2, 3]
    assert result["miou"] == pytest.approx(jaccard_score(t[keep], p[keep], labels=present, average="macro"))
    assert result["pixel_acc"] == pytest.approx(accuracy_score(t[keep], p[keep]))
    per_class = jaccard_score(t[keep], p[keep], labels=present, average=None)
    for c, iou in zip(present, per_class):
        assert result[f"iou/{c}"] == pytest.approx(iou)
    assert "iou/4" not in result and "iou/5" not in result
    subset = [0, 2, 5]
    assert metric.miou_subset(subset) == pytest.approx(
        jaccard_score(t[keep], p[keep], labels=[0, 2], average="macro")
    )


def test_class_only_predicted_counts_with_iou_zero():
    metric = SegmentationMetric(num_classes=3)
    metric.update(torch.tensor([[[0, 2]]]), torch.tensor([[[0, 0]]]))
    result = metric.compute()
    assert result["iou/0"] == pytest.approx(0.5) and result["iou/2"] == 0.0
    assert result["miou"] == pytest.approx(0.25) and "iou/1" not in result


def test_segmentation_accepts_logits_and_low_resolution_labels():
    pred, target = random_segmentation(4, num_present=5, h=4, w=6)
    from_labels = SegmentationMetric(5)
    from_labels.update(pred, target)
    from_logits = SegmentationMetric(5)
    from_logits.update(F.one_hot(pred, 5).permute(0, 3, 1, 2).float() * 3.0, target)
    torch.testing.assert_close(from_logits.state()["confusion"], from_labels.state()["confusion"])

    low = pred[:, ::2, ::2]  # nearest upsampling by 2 must replicate each label into a 2x2 block
    upsampled = torch.from_numpy(np.repeat(np.repeat(low.numpy(), 2, axis=1), 2, axis=2))
    from_low = SegmentationMetric(5)
    from_low.update(low, target)
    expected = SegmentationMetric(5)
    expected.update(upsampled, target)
    torch.testing.assert_close(from_low.state()["confusion"], expected.state()["confusion"])


def numpy_depth(preds, gts, median_scaling, per_image, lo=1e-3, hi=80.0):
    per_img, pooled, ratios = [], {k: [] for k in ("p", "g")}, []
    for p, g in zip(preds, gts):
        valid = (g > lo) & (g < hi)
        if not valid.any():
            continue
        p, g = p[valid], g[valid]
        if median_scaling:
            ratios.append(np.median(g) / np.median(p))
            p = p * ratios[-1]
        p = np.clip(p, lo, hi)
        thresh = np.maximum(p / g, g / p)
        per_img.append(
            {
                "abs_rel": np.mean(np.abs(p - g) / g),
                "abs_err": np.mean(np.abs(p - g)),
                "sq_rel": np.mean((p - g) ** 2 / g),
                "mse": np.mean((p - g) ** 2),
                "log_mse": np.mean((np.log(p) - np.log(g)) ** 2),
                "a1": np.mean(thresh < 1.25),
                "a2": np.mean(thresh < 1.25**2),
                "a3": np.mean(thresh < 1.25**3),
            }
        )
        pooled["p"].append(p)
        pooled["g"].append(g)
    if per_image:
        out = {k: np.mean([m[k] for m in per_img]) for k in per_img[0]}
        # The DenseMTL authors' RMSE: sqrt of the mean over images of the per-image MSE.
        out["rmse"] = np.sqrt(out.pop("mse"))
        out["rmse_log"] = np.sqrt(out.pop("log_mse"))
    else:
        p, g = np.concatenate(pooled["p"]), np.concatenate(pooled["g"])
        thresh = np.maximum(p / g, g / p)
        out = {
            "abs_rel": np.mean(np.abs(p - g) / g),
            "abs_err": np.mean(np.abs(p - g)),
            "sq_rel": np.mean((p - g) ** 2 / g),
            "rmse": np.sqrt(np.mean((p - g) ** 2)),
            "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
            "a1": np.mean(thresh < 1.25),
            "a2": np.mean(thresh < 1.25**2),
            "a3": np.mean(thresh < 1.25**3),
        }
    out["rmse_per_image"] = np.mean([np.sqrt(m["mse"]) for m in per_img])
    out["rmse_log_per_image"] = np.mean([np.sqrt(m["log_mse"]) for m in per_img])
    if median_scaling:
        out["median_scale"] = np.mean(ratios)
    return out


def random_depth(seed: int, batch: int = 4, h: int = 5, w: int = 6):
    g = torch.Generator().manual_seed(seed)
    gt = 100 * torch.rand(batch, 1, h, w, generator=g, dtype=torch.float64)  # some above the 80 m cap
    gt[torch.rand(batch, 1, h, w, generator=g) < 0.2] = 0
    gt[0, 0, 0, :4] = 0  # an even number of valid pixels in image 0 (numpy's two-middle median)
    gt[-1] = 0  # an image without any valid pixel is skipped
    pred = 0.5 * gt + 40 * torch.rand(batch, 1, h, w, generator=g, dtype=torch.float64)
    pred[0, 0, 1, 1] = 200.0  # clamped to max_depth
    return pred, gt


@pytest.mark.parametrize("median_scaling", [False, True])
@pytest.mark.parametrize("per_image", [True, False])
def test_depth_metrics_match_numpy(median_scaling, per_image):
    metric = DepthMetric(median_scaling=median_scaling, per_image=per_image)
    preds, gts = [], []
    for seed in (0, 1):
        pred, gt = random_depth(seed)
        metric.update(pred, gt)
        preds += list(pred.numpy()[:, 0])
        gts += list(gt.numpy()[:, 0])
    expected = numpy_depth(preds, gts, median_scaling, per_image)
    result = metric.compute()
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key


def test_depth_prediction_is_resized_to_ground_truth():
    gt = torch.full((1, 1, 4, 4), 10.0)
    metric = DepthMetric()
    metric.update(torch.full((1, 1, 2, 2), 12.0), gt)
    assert metric.compute()["rmse"] == pytest.approx(2.0)


@pytest.mark.parametrize("per_image", [True, False])
def test_depth_rmse_aggregation_by_hand(per_image):
    """Image 0: 4 pixels off by 1 m; image 1: 2 valid pixels off by 3 m (two have no GT)."""
    gt = torch.full((2, 1, 2, 2), 10.0)
    gt[1, 0, 0] = 0
    pred = gt + torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    metric = DepthMetric(per_image=per_image)
    metric.update(pred, gt)
    result = metric.compute()
    # Per image: sqrt((1 + 9) / 2); pooled: sqrt((4 * 1 + 2 * 9) / 6). Mean of per-image RMSE: (1 + 3) / 2.
    assert result["rmse"] == pytest.approx(math.sqrt(5.0) if per_image else math.sqrt(22 / 6))
    assert result["rmse_per_image"] == pytest.approx(2.0)


def numpy_angles(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    p = np.moveaxis(pred, 1, -1).reshape(-1, 3)
    g = np.moveaxis(gt, 1, -1).reshape(-1, 3)
    keep = np.linalg.norm(g, axis=1) > 0.5
    p = p[keep] / np.linalg.norm(p[keep], axis=1, keepdims=True)
    g = g[keep] / np.linalg.norm(g[keep], axis=1, keepdims=True)
    return np.degrees(np.arccos(np.clip((p * g).sum(axis=1), -1, 1)))


def random_normals(seed: int, batch: int = 2, h: int = 7, w: int = 5):
    g = torch.Generator().manual_seed(seed)
    gt = F.normalize(torch.randn(batch, 3, h, w, generator=g, dtype=torch.float64), dim=1)
    gt[torch.rand(batch, 1, h, w, generator=g).expand_as(gt) < 0.2] = 0
    pred = 3 * gt + torch.randn(batch, 3, h, w, generator=g, dtype=torch.float64)
    return pred, gt


def numpy_normals(preds, gts):
    """Per-image (averaged over images) and pooled angular metrics from independent numpy code."""
    per_img, pooled = [], []
    for pred, gt in zip(preds, gts):
        a = numpy_angles(pred[None], gt[None])
        if a.size == 0:
            continue
        pooled.append(a)
        per_img.append(
            {"mean": a.mean(), "median": np.median(a), "mse": np.mean(a**2)}
            | {f"within_{t}": np.mean(a < t) for t in (11.25, 22.5, 30.0)}
        )
    out = {k: np.mean([m[k] for m in per_img]) for k in per_img[0]}
    out["rmse"] = np.sqrt(out.pop("mse"))
    a = np.concatenate(pooled)
    out |= {"mean_pooled": a.mean(), "median_pooled": np.median(a), "rmse_pooled": np.sqrt(np.mean(a**2))}
    out |= {f"within_{t}_pooled": np.mean(a < t) for t in (11.25, 22.5, 30.0)}
    return out


@pytest.mark.parametrize("halves", [1, 2])  # odd and even pixel counts for the median
def test_normals_metrics_match_numpy(halves):
    metric = NormalsMetric()
    preds, gts = [], []
    for seed in range(halves):
        pred, gt = random_normals(seed, batch=3)
        gt[-1] = 0  # an image without any known normal is skipped
        metric.update(pred, gt)
        preds += list(pred.numpy())
        gts += list(gt.numpy())
    expected = numpy_normals(preds, gts)
    result = metric.compute()
    assert set(result) == set(expected)
    for key, value in expected.items():
        if key == "median_pooled":
            assert abs(result[key] - value) <= 0.01  # histogram resolution
        else:
            assert result[key] == pytest.approx(value, rel=1e-6), key
    # The two aggregations differ on this data: the test tells them apart.
    assert abs(result["mean"] - result["mean_pooled"]) > 1e-6


def numpy_edges(prob, target, threshold):
    """Edge F1 as the DenseMTL authors compute it: 2-class confusion, nanmean of per-class F1."""
    keep = (target == 0) | (target == 1)
    y = target[keep].astype(int)
    p = (prob[keep] > threshold).astype(int)
    cm = np.bincount(2 * y + p, minlength=4).reshape(2, 2).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * np.diag(cm) / (cm.sum(0) + cm.sum(1))
    return {"f1": np.nanmean(f1), "f1_bg": f1[0], "f1_edge": f1[1]}, y, p


def test_edges_f1_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    prob = torch.sigmoid(torch.randn(3, 1, 6, 8, generator=g))  # TaskDef.predict's output
    target = (torch.rand(3, 1, 6, 8, generator=g) > 0.7).float()
    target[0, 0, 0] = 255  # ignored
    metric = EdgesMetric(threshold=0.6)
    metric.update(prob, target)
    expected, y, p = numpy_edges(prob.numpy(), target.numpy(), 0.6)
    result = metric.compute()
    assert set(result) == {"f1", "f1_edge", "f1_bg", "precision_edge", "recall_edge"}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key
    assert result["f1_edge"] == pytest.approx(f1_score(y, p))
    assert result["f1_bg"] == pytest.approx(f1_score(y, p, pos_label=0))
    assert result["precision_edge"] == pytest.approx(precision_score(y, p))
    assert result["recall_edge"] == pytest.approx(recall_score(y, p))
    assert result["f1"] == pytest.approx(f1_score(y, p, average="macro"))


def test_edges_f1_skips_a_class_absent_from_gt_and_prediction():
    metric = EdgesMetric()
    metric.update(torch.full((1, 1, 3, 3), 0.01), torch.zeros(1, 1, 3, 3))  # no edge anywhere
    result = metric.compute()
    assert math.isnan(result["f1_edge"]) and result["f1_bg"] == 1.0 and result["f1"] == 1.0


def make_multitask_batch(seed: int, batch: int = 4):
    pred_s, target_s = random_segmentation(seed, num_present=5, batch=batch)
    pred_d, gt_d = random_depth(seed, batch=batch, h=6, w=7)
    pred_n, gt_n = random_normals(seed, batch=batch, h=6, w=7)
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "semseg": pred_s,
        "depth": pred_d,
        "normals": pred_n,
        "edges": torch.rand(batch, 1, 6, 7, generator=g),  # probabilities, as TaskDef.predict gives
    }
    labels = {
        "semseg": target_s,
        "depth": gt_d,
        "normals": gt_n,
        "edges": (torch.rand(batch, 1, 6, 7, generator=g) > 0.7).float(),
    }
    return outputs, labels


@pytest.mark.parametrize("per_image", [True, False])
def test_two_process_states_sum_to_the_whole(per_image):
    def new():
        return MultiTaskMetrics(
            ["semseg", "depth", "normals", "edges"],
            num_classes=5,
            median_scaling=True,
            per_image=per_image,
        )

    outputs, batch = make_multitask_batch(3)
    whole, rank0, rank1 = new(), new(), new()
    whole.update(outputs, batch)
    rank0.update({k: v[:2] for k, v in outputs.items()}, {k: v[:2] for k, v in batch.items()})
    rank1.update({k: v[2:] for k, v in outputs.items()}, {k: v[2:] for k, v in batch.items()})

    other = rank1.state()
    # The merge path: a fresh accumulator loads rank 0's state and adds rank 1's, task by task.
    merged = new()
    merged.load_state(rank0.state())
    for task, metric in merged.metrics.items():
        metric.merge({k[len(task) + 1 :]: v for k, v in other.items() if k.startswith(f"{task}/")})
    rank0.sync(lambda s: {k: v + other[k] for k, v in s.items()})  # what a sum all-reduce returns
    expected = whole.compute()
    for combined in (rank0, merged):
        for key, value in whole.state().items():
            torch.testing.assert_close(combined.state()[key], value, rtol=1e-12, atol=1e-12, msg=key)
        assert set(combined.compute()) == set(expected)
        for key, value in combined.compute().items():
            assert value == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
    for key in (
        "semseg/miou",
        "depth/rmse",
        "depth/rmse_per_image",
        "normals/mean",
        "normals/median",
        "normals/mean_pooled",
        "normals/median_pooled",
        "edges/f1",
        "edges/f1_edge",
    ):
        assert key in expected and not math.isnan(expected[key]), key

    whole.reset()
    assert all(float(v.abs().sum()) == 0 for v in whole.state().values())


def test_multitask_metrics_skip_tasks_without_labels():
    outputs, batch = make_multitask_batch(5)
    metrics = MultiTaskMetrics(["semseg", "depth"], num_classes=5)
    metrics.update(outputs, {"semseg": batch["semseg"]})
    result = metrics.compute()
    assert math.isnan(result["depth/rmse"]) and not math.isnan(result["semseg/miou"])


def test_multitask_delta_mixed_directions():
    metrics = {"semseg/miou": 0.5, "depth/rmse": 4.0, "normals/mean": 22.0}
    baselines = {"semseg/miou": 0.4, "depth/rmse": 5.0, "normals/mean": 20.0}
    # (+25% for mIoU up) + (+20% for RMSE down) + (-10% for the angle up), averaged.
    assert multitask_delta(metrics, baselines) == pytest.approx((25.0 + 20.0 - 10.0) / 3)
    assert multitask_delta(metrics, baselines, keys=["semseg/miou", "depth/rmse"]) == pytest.approx(22.5)
    with pytest.raises(KeyError, match="baseline"):
        multitask_delta(metrics, {"semseg/miou": 0.4, "depth/rmse": 5.0})


def test_every_reported_metric_has_a_direction_and_no_direction_is_stale():
    outputs, batch = make_multitask_batch(2)
    reported = set()
    for per_image in (True, False):
        metrics = MultiTaskMetrics(
            ["semseg", "depth", "normals", "edges"], num_classes=5, median_scaling=True, per_image=per_image
        )
        metrics.update(outputs, batch)
        reported |= set(metrics.compute())
    # The PASCAL-Context tasks and odsF edges.
    g = torch.Generator().manual_seed(4)
    pascal = MultiTaskMetrics(["parts", "saliency", "edges"], edge_metric="odsf")
    parts_target = torch.randint(0, 7, (2, 12, 16), generator=g)
    pascal.update(
        {
            "parts": torch.randn(2, 7, 12, 16, generator=g),
            "saliency": torch.rand(2, 1, 12, 16, generator=g),
            "edges": torch.rand(2, 1, 12, 16, generator=g),
        },
        {
            "parts": parts_target,
            "saliency": (torch.rand(2, 1, 12, 16, generator=g) > 0.5).float(),
            "edges": (torch.rand(2, 1, 12, 16, generator=g) > 0.8).float(),
        },
    )
    reported |= set(pascal.compute())
    for key in reported - set(NO_DIRECTION):  # diagnostics, neither better nor worse
        assert metric_direction(key) in (+1, -1), key
    assert set(METRIC_DIRECTIONS) <= reported
    assert set(PRIMARY_METRICS.values()) <= reported


@pytest.mark.parametrize("per_image", [True, False])
def test_multitask_delta_on_primary_metrics_matches_numpy(per_image):
    """Delta_T of the evaluated metrics against those of other predictions on the same labels."""
    outputs, batch = make_multitask_batch(7)
    baseline_outputs, _ = make_multitask_batch(8)
    tasks = ["semseg", "depth", "normals", "edges"]
    evaluated = {}
    for name, preds in (("mtl", outputs), ("stl", baseline_outputs)):
        metrics = MultiTaskMetrics(tasks, num_classes=5, per_image=per_image)
        metrics.update(preds, batch)
        evaluated[name] = metrics.compute()

    def numpy_primary(preds):
        p, t = preds["semseg"].numpy().ravel(), batch["semseg"].numpy().ravel()
        keep = t != 255
        present = sorted(set(t[keep]) | set(p[keep]))
        depth = numpy_depth(
            list(preds["depth"].numpy()[:, 0]), list(batch["depth"].numpy()[:, 0]), False, per_image
        )
        normals = numpy_normals(list(preds["normals"].numpy()), list(batch["normals"].numpy()))
        edges, _, _ = numpy_edges(preds["edges"].numpy(), batch["edges"].numpy(), 0.5)
        return {
            "semseg/miou": jaccard_score(t[keep], p[keep], labels=present, average="macro"),
            "depth/rmse": depth["rmse"],
            "normals/mean": normals["mean"],
            "edges/f1": edges["f1"],
        }

    m, b = numpy_primary(outputs), numpy_primary(baseline_outputs)
    for key in m:
        assert evaluated["mtl"][key] == pytest.approx(m[key], rel=1e-6), key
        assert evaluated["stl"][key] == pytest.approx(b[key], rel=1e-6), key
    signs = {"semseg/miou": 1, "depth/rmse": -1, "normals/mean": -1, "edges/f1": 1}
    expected = 100 * np.mean([signs[k] * (m[k] - b[k]) / b[k] for k in m])
    assert {PRIMARY_METRICS[t] for t in tasks} == set(m)
    assert multitask_delta(evaluated["mtl"], evaluated["stl"]) == pytest.approx(expected, rel=1e-5)


def numpy_saliency(probs, gts, beta2=0.3):
    """ATRC's pooled max-F and MTI-Net's per-image mIoU / maxF, written directly with numpy loops."""
    valid = gts != 255
    best_f = 0.0
    for t in np.arange(1, 20) * 0.05:
        pred = (probs >= t - 1e-12) & valid  # the metric's thresholds are round(0.05 * i, 2)
        gt = (gts == 1) & valid
        tp, pp, ap = (pred & gt).sum(), pred.sum(), gt.sum()
        p, r = (tp / pp if pp else np.nan), (tp / ap if ap else np.nan)
        f = (1 + beta2) * p * r / (beta2 * p + r)
        best_f = max(best_f, 0.0 if np.isnan(f) else f)
    ious, precs, recs = [], [], []
    for t in np.linspace(0.2, 0.9, 15):
        row_iou, row_p, row_r = [], [], []
        for prob, gt_img, v in zip(probs, gts, valid, strict=True):
            pred, gt = (prob > t) & v, (gt_img == 1) & v
            union = (pred | gt).sum()
            row_iou.append((pred & gt).sum() / union if union else 1.0)
            tp = (pred & gt).sum()
            row_p.append(tp / (pred.sum() + 1e-12))
            row_r.append(tp / (gt.sum() + 1e-12))
        ious.append(np.mean(row_iou))
        precs.append(np.mean(row_p))
        recs.append(np.mean(row_r))
    precs, recs = np.array(precs), np.array(recs)
    return {
        "maxf": best_f,
        "miou": max(ious),
        "maxf_per_image": float(np.max(2 * precs * recs / (precs + recs + 1e-12))),
    }


def test_saliency_maxf_and_miou_match_numpy_and_reduce_by_summing():
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(4, 1, 9, 11, generator=g) > 0.6).float()
    prob = (0.6 * target + 0.5 * torch.rand(4, 1, 9, 11, generator=g)).clamp(0, 1)
    target[0, 0, :2] = 255  # ignored
    target[3] = 0  # an image without salient pixels
    whole, first, second = SaliencyMetric(), SaliencyMetric(), SaliencyMetric()
    whole.update(prob, target)
    first.update(prob[:2], target[:2])
    second.update(prob[2:], target[2:])
    first.merge(second.state())
    expected = numpy_saliency(prob[:, 0].numpy(), target[:, 0].numpy())
    result = whole.compute()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9), key
        assert first.compute()[key] == pytest.approx(value, rel=1e-9), key
    assert 0.5 < result["maxf"] < 1 and result["maxf_threshold"] in SaliencyMetric.ATRC_THRESHOLDS


def test_boundary_odsf_streams_like_the_offline_evaluation():
    pairs = [synthetic_edge_maps(40, 56, seed) for seed in range(3)]
    prob = torch.stack([torch.from_numpy(p)[None] for p, _ in pairs])
    gt = torch.stack([torch.from_numpy(g)[None].float() for _, g in pairs])
    gt[2, 0, :5] = 255  # padding rows
    whole, first, second = BoundaryOdsF(0.03), BoundaryOdsF(0.03), BoundaryOdsF(0.03)
    whole.update(prob, gt)
    first.update(prob[:1], gt[:1])
    second.update(prob[1:], gt[1:])
    first.sync(lambda s: {k: v + second.state()[k] for k, v in s.items()})
    expected = evaluate_boundaries(list(prob[:, 0].numpy()), list(gt[:, 0].numpy()), 0.03)
    for key, value in expected.items():
        assert whole.compute()[key] == pytest.approx(value), key
        assert first.compute()[key] == pytest.approx(value), key
    assert math.isnan(BoundaryOdsF().compute()["odsf"])


def test_multitask_metrics_builds_the_pascal_tasks_and_the_edge_metric_choice():
    metrics = MultiTaskMetrics(
        ["parts", "saliency", "edges"], num_parts=5, edge_metric="odsf", edge_max_dist=0.0075
    )
    assert metrics.metrics["parts"].num_classes == 5
    assert isinstance(metrics.metrics["saliency"], SaliencyMetric)
    assert isinstance(metrics.metrics["edges"], BoundaryOdsF) and metrics.metrics["edges"].max_dist == 0.0075
    assert isinstance(MultiTaskMetrics(["edges"]).metrics["edges"], EdgesMetric)
    with pytest.raises(ValueError, match="edge_metric"):
        MultiTaskMetrics(["edges"], edge_metric="ods")


# Δ_m of printed table rows, recomputed from the printed metrics (percent; lower-is-better metrics negated).
def test_primary_delta_reproduces_atrc_tables():
    # ATRC Tab. 2 (NYUD-v2, HRNet18), ATRC + FPM vs single task: mIoU 40.80 vs 38.02 (+7.312 %), RMSE 0.5826
    # vs 0.6104 (+4.554 %), mErr 20.51 vs 20.94 (+2.053 %), odsF 76.50 vs 76.22 (+0.367 %): mean +3.572, printed 3.57.
    st = {"semseg/miou": 38.02, "depth/rmse": 0.6104, "normals/mean": 20.94, "edges/odsf": 76.22}
    atrc_fpm = {"semseg/miou": 40.80, "depth/rmse": 0.5826, "normals/mean": 20.51, "edges/odsf": 76.50}
    assert multitask_delta(atrc_fpm, st) == pytest.approx(3.57, abs=0.005)
    # ATRC Tab. 4 (PASCAL-Context, HRNet18), MT baseline vs single task: semseg 51.48 vs 62.23 (-17.275 %),
    # parts 57.23 vs 61.66 (-7.185 %), saliency maxF 83.43 vs 85.08 (-1.939 %), normals 14.10 vs 13.69
    # (-2.995 %), odsF 69.76 vs 73.06 (-4.517 %): mean -6.782, printed -6.77 (from unrounded means).
    st = {
        "semseg/miou": 62.23,
        "parts/miou": 61.66,
        "saliency/maxf": 85.08,
        "normals/mean": 13.69,
        "edges/odsf": 73.06,
        "edges/f1": 50.0,  # odsF is preferred over F1 when both are there
    }
    mt = {
        "semseg/miou": 51.48,
        "parts/miou": 57.23,
        "saliency/maxf": 83.43,
        "normals/mean": 14.10,
        "edges/odsf": 69.76,
        "edges/f1": 60.0,
    }
    assert multitask_delta(mt, st) == pytest.approx(-6.77, abs=0.015)
    assert "edges/odsf" in delta_keys(["edges"], mt) and "edges/f1" in delta_keys(["edges"], {"edges/f1": 1})


def test_ctal_delta_uses_depth_relative_error():
    # CTAL Tab. 1 (NYUv2, HRNet18), MTI-Net vs STL: mIoU 51.51 vs 49.23 (+4.631 %), relErr 0.1538 vs 0.1636
    # (+5.990 %), normals mErr 23.50 vs 23.15 (-1.512 %): mean +3.036, printed +3.04. CTAL_MS: 52.70 (+7.048 %),
    # 0.1529 (+6.540 %), 22.99 (+0.691 %): +4.760, printed +4.76. RMSE is in the dicts to show it is not used.
    stl = {"semseg/miou": 49.23, "depth/abs_rel": 0.1636, "depth/rmse": 1.0, "normals/mean": 23.15}
    mti = {"semseg/miou": 51.51, "depth/abs_rel": 0.1538, "depth/rmse": 2.0, "normals/mean": 23.50}
    ctal = {"semseg/miou": 52.70, "depth/abs_rel": 0.1529, "depth/rmse": 2.0, "normals/mean": 22.99}
    assert multitask_delta(mti, stl, metric_set="ctal") == pytest.approx(3.04, abs=0.005)
    assert multitask_delta(ctal, stl, metric_set="ctal") == pytest.approx(4.76, abs=0.005)


def test_all_metrics_delta_averages_every_headline_metric():
    # XTasC Tab. I (Cityscapes 7 classes), XTasC-Net vs Base ST-Net over its four metrics: mIoU 66.51 vs 66.40
    # (+0.166 %), PixAcc 93.56 vs 93.48 (+0.086 %), AbsErr 0.0122 vs 0.0124 (+1.613 %), RelErr 19.40 vs 19.78
    # (+1.921 %): mean +0.946. The printed 1.58 does not follow from the printed means (seeds digest §4.4).
    st = {"semseg/miou": 66.40, "semseg/pixel_acc": 93.48, "depth/abs_err": 0.0124, "depth/abs_rel": 19.78}
    xtasc = {"semseg/miou": 66.51, "semseg/pixel_acc": 93.56, "depth/abs_err": 0.0122, "depth/abs_rel": 19.40}
    assert multitask_delta(xtasc, st, metric_set="all") == pytest.approx(0.946, abs=0.0005)
    keys = delta_keys(["semseg", "depth", "normals"], {}, "all")
    assert (
        keys[:4] == ["semseg/miou", "semseg/pixel_acc", "depth/abs_err", "depth/abs_rel"] and len(keys) == 9
    )


def test_a_missing_baseline_metric_says_which_and_how_to_get_it():
    metrics = {"semseg/miou": 0.5, "edges/odsf": 0.7}
    with pytest.raises(MissingBaselineError) as err:
        multitask_delta(metrics, {"semseg/miou": 0.4, "edges/f1": 0.6}, baseline_name="nyud-stl")
    message = str(err.value)
    assert (
        "'edges/odsf'" in message and "nyud-stl" in message and "STL" in message and "--baseline" in message
    )
    with pytest.raises(ValueError, match="choose among"):
        multitask_delta(metrics, metrics, metric_set="xtasc")


LABELS = torch.randint(0, 4, (2, 6, 6))
WRONG_SHAPES = [
    # A label map with a channel axis (argmax(keepdim=True)): read as 1-channel logits it gave mIoU 0.066.
    (SegmentationMetric(4), LABELS[:, None], LABELS, "logits [2,4,h,w] or labels [2,h,w]", "[2,1,6,6]"),
    (SegmentationMetric(4), torch.rand(2, 3, 6, 6), LABELS, "logits [2,4,h,w]", "[2,3,6,6]"),
    (SegmentationMetric(4), torch.rand(3, 4, 6, 6), LABELS, "logits [2,4,h,w]", "[3,4,6,6]"),
    (SegmentationMetric(4), LABELS, LABELS[:, None], "a target [B,H,W]", "[2,1,6,6]"),
    (DepthMetric(), torch.rand(2, 6, 6), torch.rand(2, 1, 6, 6), "depth [2,1,h,w]", "[2,6,6]"),
    (DepthMetric(), torch.rand(2, 1, 6, 6), torch.rand(2, 6, 6), "a target [B,1,H,W]", "[2,6,6]"),
    (NormalsMetric(), torch.rand(2, 1, 6, 6), torch.rand(2, 3, 6, 6), "normals [2,3,h,w]", "[2,1,6,6]"),
    (NormalsMetric(), torch.rand(2, 6, 6, 3), torch.rand(2, 3, 6, 6), "normals [2,3,h,w]", "[2,6,6,3]"),
    (
        EdgesMetric(),
        torch.rand(2, 2, 6, 6),
        torch.rand(2, 1, 6, 6),
        "edge probabilities [2,1,h,w]",
        "[2,2,6,6]",
    ),
    (EdgesMetric(), torch.rand(2, 6, 6), torch.rand(2, 1, 6, 6), "edge probabilities [2,1,h,w]", "[2,6,6]"),
    (
        BoundaryOdsF(),
        torch.rand(1, 2, 6, 6),
        torch.rand(2, 1, 6, 6),
        "edge probabilities [2,1,h,w]",
        "[1,2,6,6]",
    ),
    (SaliencyMetric(), torch.rand(2, 1, 6, 6), torch.rand(2, 6, 6), "a target [B,1,H,W]", "[2,6,6]"),
]


@pytest.mark.parametrize(("metric", "pred", "target", "expected", "given"), WRONG_SHAPES)
def test_a_wrongly_shaped_prediction_or_target_is_refused_naming_both_shapes(
    metric, pred, target, expected, given
):
    before = {k: v.clone() for k, v in metric.state().items()}
    with pytest.raises(ValueError) as err:
        metric.update(pred, target)
    assert f"expected {expected}" in str(err.value) and str(err.value).endswith(f"got {given}")
    for key, value in metric.state().items():
        torch.testing.assert_close(value, before[key])


def test_multitask_metrics_name_the_task_of_a_wrongly_shaped_prediction():
    metrics = MultiTaskMetrics(["semseg", "parts"], num_classes=4, num_parts=7)
    parts = torch.randint(0, 7, (2, 6, 6))
    with pytest.raises(ValueError, match=r"^parts: SegmentationMetric: expected logits \[2,7,h,w\]"):
        metrics.update({"semseg": LABELS, "parts": parts[:, None]}, {"semseg": LABELS, "parts": parts})


def test_ground_truth_ids_outside_the_label_set_are_refused_not_dropped():
    """A 19-class id (or another ignore id, e.g. the released code's 250) in the GT of a 16-class metric used to be
    dropped silently: here pixel 1 would vanish and mIoU read 1.0 instead of failing."""
    metric = SegmentationMetric(num_classes=16)
    with pytest.raises(ValueError, match=r"ground-truth ids \[18, 250\] outside \[0, 16\)"):
        metric.update(torch.tensor([[[0, 1, 2, 255]]]), torch.tensor([[[0, 18, 250, 255]]]))
    assert float(metric.state()["confusion"].sum()) == 0.0  # nothing was counted
    metric.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 255, 2]]]))  # the ignore id stays ignored
    assert metric.compute()["miou"] == 1.0 and metric.compute()["pixel_acc"] == 1.0
