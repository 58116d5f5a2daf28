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
    DepthMetric,
    EdgesMetric,
    MultiTaskMetrics,
    NormalsMetric,
    SegmentationMetric,
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
                "sq_rel": np.mean((p - g) ** 2 / g),
                "rmse": np.sqrt(np.mean((p - g) ** 2)),
                "mse": np.mean((p - g) ** 2),
                "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
                "a1": np.mean(thresh < 1.25),
                "a2": np.mean(thresh < 1.25**2),
                "a3": np.mean(thresh < 1.25**3),
            }
        )
        pooled["p"].append(p)
        pooled["g"].append(g)
    if per_image:
        out = {k: np.mean([m[k] for m in per_img]) for k in per_img[0] if k != "mse"}
        out["rmse_of_mean_mse"] = np.sqrt(np.mean([m["mse"] for m in per_img]))
    else:
        p, g = np.concatenate(pooled["p"]), np.concatenate(pooled["g"])
        thresh = np.maximum(p / g, g / p)
        out = {
            "abs_rel": np.mean(np.abs(p - g) / g),
            "sq_rel": np.mean((p - g) ** 2 / g),
            "rmse": np.sqrt(np.mean((p - g) ** 2)),
            "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
            "a1": np.mean(thresh < 1.25),
            "a2": np.mean(thresh < 1.25**2),
            "a3": np.mean(thresh < 1.25**3),
        }
        out["rmse_of_mean_mse"] = out["rmse"]
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


@pytest.mark.parametrize("halves", [1, 2])  # odd and even pixel counts for the median
def test_normals_metrics_match_numpy(halves):
    metric = NormalsMetric()
    angles = []
    for seed in range(halves):
        pred, gt = random_normals(seed)
        metric.update(pred, gt)
        angles.append(numpy_angles(pred.numpy(), gt.numpy()))
    a = np.concatenate(angles)
    result = metric.compute()
    assert result["mean"] == pytest.approx(a.mean(), rel=1e-6)
    assert result["rmse"] == pytest.approx(np.sqrt(np.mean(a**2)), rel=1e-6)
    assert abs(result["median"] - np.median(a)) <= 0.01  # histogram resolution
    for t in (11.25, 22.5, 30.0):
        assert result[f"within_{t}"] == pytest.approx(np.mean(a < t))


def test_edges_f1_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    logit = torch.randn(3, 1, 6, 8, generator=g)
    target = (torch.rand(3, 1, 6, 8, generator=g) > 0.7).float()
    target[0, 0, 0] = 255  # ignored
    metric = EdgesMetric(threshold=0.6)
    metric.update(logit, target)
    keep = (target != 255).numpy().ravel()
    y = target.numpy().ravel()[keep].astype(int)
    p = (1 / (1 + np.exp(-logit.numpy().ravel()[keep])) > 0.6).astype(int)
    result = metric.compute()
    assert result["f1"] == pytest.approx(f1_score(y, p))
    assert result["precision"] == pytest.approx(precision_score(y, p))
    assert result["recall"] == pytest.approx(recall_score(y, p))
    assert result["f1_mean_bg_edge"] == pytest.approx(f1_score(y, p, average="macro"))


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
    rank0.sync(lambda s: {k: v + other[k] for k, v in s.items()})  # what a sum all-reduce returns
    for key, value in whole.state().items():
        torch.testing.assert_close(rank0.state()[key], value, rtol=1e-12, atol=1e-12, msg=key)
    expected = whole.compute()
    assert set(rank0.compute()) == set(expected)
    for key, value in rank0.compute().items():
        assert value == pytest.approx(expected[key], rel=1e-12, nan_ok=True), key
    for key in ("semseg/miou", "depth/rmse", "normals/median", "edges/f1"):
        assert key in expected

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
