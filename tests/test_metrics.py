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

from uda.metrics import (
    METRIC_DIRECTIONS,
    PRIMARY_METRICS,
    DepthMetric,
    EdgesMetric,
    MultiTaskMetrics,
    NormalsMetric,
    SegmentationMetric,
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


def numpy_edges(logit, target, threshold):
    """Edge F1 as the DenseMTL authors compute it: 2-class confusion, nanmean of per-class F1."""
    keep = (target == 0) | (target == 1)
    y = target[keep].astype(int)
    p = (1 / (1 + np.exp(-logit[keep])) > threshold).astype(int)
    cm = np.bincount(2 * y + p, minlength=4).reshape(2, 2).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * np.diag(cm) / (cm.sum(0) + cm.sum(1))
    return {"f1": np.nanmean(f1), "f1_bg": f1[0], "f1_edge": f1[1]}, y, p


def test_edges_f1_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(3, 1, 6, 8, generator=g)
    target = (torch.rand(3, 1, 6, 8, generator=g) > 0.7).float()
    target[0, 0, 0] = 255  # ignored
    metric = EdgesMetric(threshold=0.6)
    metric.update(logit, target)
    expected, y, p = numpy_edges(logit.numpy(), target.numpy(), 0.6)
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
    metric.update(torch.full((1, 1, 3, 3), -5.0), torch.zeros(1, 1, 3, 3))  # no edge anywhere
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
        "edges": torch.randn(batch, 1, 6, 7, generator=g),
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
    for key in reported - {"depth/median_scale"}:  # a diagnostic ratio, neither better nor worse
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
    assert set(PRIMARY_METRICS.values()) == set(m)
    assert multitask_delta(evaluated["mtl"], evaluated["stl"]) == pytest.approx(expected, rel=1e-5)
