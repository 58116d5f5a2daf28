"""Task losses, the multi-scale objective (Eq. 6) and adversarial helpers against independent computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uda.losses import (
    TASK_WEIGHT_PRESETS,
    MultiTaskLoss,
    bce_with_domain,
    berhu,
    default_task_weights,
    depth_loss,
    edges_loss,
    entropy_map,
    normalise_depth_for_discriminator,
    normals_loss,
    semseg_loss,
)


def numpy_berhu(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    diffs = [p - t for p, t, m in zip(pred.ravel(), target.ravel(), mask.ravel()) if m]
    c = 0.2 * max(abs(d) for d in diffs)
    total = 0.0
    for d in diffs:
        total += abs(d) if abs(d) <= c else (d * d + c * c) / (2 * c)
    return total / len(diffs)


def test_berhu_matches_numpy_loop():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64)
    target = torch.randn(2, 1, 5, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 6, generator=g) > 0.3
    got = berhu(pred, target, mask).item()
    assert got == pytest.approx(numpy_berhu(pred.numpy(), target.numpy(), mask.numpy()), rel=1e-12)


def test_berhu_averages_over_valid_pixels_only():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(1, 1, 4, 4, generator=g)
    target = torch.randn(1, 1, 4, 4, generator=g)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    base = berhu(pred, target, mask)
    # Appending invalid pixels with huge errors must change neither the threshold nor the mean.
    for extra in (4, 40):
        pred_x = torch.cat([pred, 100 * torch.randn(1, 1, extra, 4, generator=g)], dim=2)
        target_x = torch.cat([target, torch.zeros(1, 1, extra, 4)], dim=2)
        mask_x = torch.cat([mask, torch.zeros(1, 1, extra, 4, dtype=torch.bool)], dim=2)
        assert berhu(pred_x, target_x, mask_x).item() == pytest.approx(base.item(), rel=1e-6)


def test_berhu_degenerate_cases_keep_a_finite_graph():
    pred = torch.randn(1, 1, 3, 3, requires_grad=True)
    empty = berhu(pred, torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    exact = berhu(pred, pred.detach().clone(), torch.ones(1, 1, 3, 3, dtype=torch.bool))
    (empty + exact).backward()
    assert empty.item() == 0.0 and exact.item() == 0.0
    assert torch.isfinite(pred.grad).all()


def test_depth_loss_is_berhu_on_inverse_normalised_depth():
    g = torch.Generator().manual_seed(2)
    depth = 1 + 50 * torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64)
    depth[0, 0, 0, :3] = 0  # no measurement
    pred_g = 655.36 / (1 + 50 * torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64))
    valid = depth.numpy() > 0
    target_g = np.where(valid, 655.36 / np.where(valid, depth.numpy(), 1.0), 0.0)
    expected = numpy_berhu(pred_g.numpy(), target_g, valid)
    assert depth_loss(pred_g, depth).item() == pytest.approx(expected, rel=1e-10)


def test_low_resolution_prediction_is_upsampled_to_the_label():
    depth = torch.full((1, 1, 8, 8), 10.0)
    depth[..., :2, :] = 20.0
    const_low = torch.full((1, 1, 4, 4), 50.0)
    const_full = torch.full((1, 1, 8, 8), 50.0)
    assert depth_loss(const_low, depth).item() == pytest.approx(depth_loss(const_full, depth).item())


def test_semseg_loss_ignores_255():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 0] = 255
    target[1, :, 1] = 255
    lg = logits.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    tg = target.reshape(-1).numpy()
    keep = tg != 255
    lse = np.log(np.exp(lg[keep]).sum(axis=1))
    expected = np.mean(lse - lg[keep][np.arange(keep.sum()), tg[keep]])
    assert semseg_loss(logits, target).item() == pytest.approx(expected, rel=1e-10)


def test_normals_loss_direction_only_and_masked():
    g = torch.Generator().manual_seed(4)
    target = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    target[:, :, 0, :] = 0  # unknown normals
    scale = 0.1 + 5 * torch.rand(2, 1, 4, 4, generator=g)
    noise_where_unknown = torch.zeros_like(target)
    noise_where_unknown[:, :, 0, :] = torch.randn(2, 3, 4, generator=g)
    same = target * scale + noise_where_unknown
    assert normals_loss(same, target).item() == pytest.approx(0.0, abs=1e-6)
    assert normals_loss(-target * scale + noise_where_unknown, target).item() == pytest.approx(2.0, abs=1e-6)


def test_edges_loss_matches_weighted_two_class_cross_entropy():
    g = torch.Generator().manual_seed(5)
    logit = torch.randn(2, 1, 4, 6, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 1, 4, 6, generator=g) > 0.8).double()
    # Reference: the released code's 2-class CE with class weights [0.05, 0.95]; logits (0, z).
    two_class = torch.cat([torch.zeros_like(logit), logit], dim=1)
    weight = torch.tensor([0.05, 0.95], dtype=torch.float64)
    expected = F.cross_entropy(two_class, target[:, 0].long(), weight=weight)
    assert edges_loss(logit, target).item() == pytest.approx(expected.item(), rel=1e-10)
    # And by hand: weighted sum of -log p(y) divided by the summed weights.
    z, y = logit.numpy().ravel(), target.numpy().ravel()
    w = np.where(y == 1, 0.95, 0.05)
    nll = np.where(y == 1, np.log1p(np.exp(-z)), np.log1p(np.exp(z)))
    assert edges_loss(logit, target).item() == pytest.approx((w * nll).sum() / w.sum(), rel=1e-10)


def test_default_task_weights():
    assert default_task_weights(["depth", "semseg"]) == {"semseg": 50.0, "depth": 1.0}
    assert (
        default_task_weights(("semseg", "depth", "normals", "edges"))
        == TASK_WEIGHT_PRESETS[("semseg", "depth", "normals", "edges")]
    )
    assert default_task_weights(["depth"]) == {"depth": 1.0}
    assert default_task_weights(["semseg", "edges"]) == {"semseg": 1.0, "edges": 1.0}
    with pytest.raises(ValueError):
        default_task_weights(["segmentation"])


def make_outputs_and_batch(seed: int, batch: int = 3, h: int = 8, w: int = 8):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "semseg": {
            s: torch.randn(batch, 4, h >> s, w >> s, generator=g, requires_grad=True) for s in (0, 1, 2)
        },
        "depth": {s: 5 + 60 * torch.rand(batch, 1, h >> s, w >> s, generator=g) for s in (0, 1, 2)},
        "normals": {
            s: torch.randn(batch, 3, h >> s, w >> s, generator=g, requires_grad=True) for s in (0, 1)
        },
    }
    for s in outputs["depth"]:
        outputs["depth"][s].requires_grad_(True)
    labels = {
        "semseg": torch.randint(0, 4, (batch, h, w), generator=g),
        "depth": 1 + 60 * torch.rand(batch, 1, h, w, generator=g),
        "normals": F.normalize(torch.randn(batch, 3, h, w, generator=g), dim=1),
    }
    labels["semseg"][:, 0] = 255
    labels["depth"][:, :, :, 0] = 0
    return outputs, labels


def up(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_multitask_loss_is_eq6():
    outputs, batch = make_outputs_and_batch(6)
    weights = {"semseg": 50.0, "depth": 1.0, "normals": 7.0}
    criterion = MultiTaskLoss(["semseg", "depth", "normals"], weights, intermediate_scales=(1, 2))
    total, logs = criterion(outputs, batch)
    size = (8, 8)
    per = {
        "semseg": {s: semseg_loss(up(outputs["semseg"][s], size), batch["semseg"]) for s in (0, 1, 2)},
        "depth": {s: depth_loss(up(outputs["depth"][s], size), batch["depth"]) for s in (0, 1, 2)},
        "normals": {s: normals_loss(up(outputs["normals"][s], size), batch["normals"]) for s in (0, 1)},
    }
    expected = (
        50 * (per["semseg"][0] + (per["semseg"][1] + per["semseg"][2]) / 2)
        + 1 * (per["depth"][0] + (per["depth"][1] + per["depth"][2]) / 2)
        + 7 * (per["normals"][0] + per["normals"][1])  # scale 2 absent: S = {1} for normals
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["loss/total"].item() == pytest.approx(total.item())
    for task, scales in per.items():
        for s, value in scales.items():
            assert logs[f"loss/{task}/s{s}"].item() == pytest.approx(value.item(), rel=1e-5)
    assert not any(v.requires_grad for v in logs.values())


def test_multitask_loss_ignores_unconfigured_scales_and_missing_labels():
    outputs, batch = make_outputs_and_batch(7)
    del batch["normals"]
    criterion = MultiTaskLoss(["semseg", "depth", "normals"], {"semseg": 1.0, "depth": 2.0, "normals": 3.0})
    total, logs = criterion(outputs, batch)
    expected = (
        semseg_loss(outputs["semseg"][0], batch["semseg"])
        + semseg_loss(outputs["semseg"][1], batch["semseg"])
        + 2
        * (depth_loss(outputs["depth"][0], batch["depth"]) + depth_loss(outputs["depth"][1], batch["depth"]))
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(k.startswith("loss/normals") or k.endswith("/s2") for k in logs)


def test_only_labelled_samples_contribute():
    outputs, batch = make_outputs_and_batch(8, batch=4)
    criterion = MultiTaskLoss(
        ["semseg", "depth", "normals"], {"semseg": 50.0, "depth": 1.0, "normals": 100.0}
    )
    labelled = torch.tensor([True, False, True, False])
    total, _ = criterion(outputs, batch, labelled)

    changed = {k: v.clone() for k, v in batch.items()}
    changed["semseg"][1] = torch.randint(0, 4, changed["semseg"][1].shape)
    changed["depth"][3] = 3 * changed["depth"][3]
    changed["normals"][1] = -changed["normals"][1]
    assert criterion(outputs, changed, labelled)[0].item() == pytest.approx(total.item(), rel=1e-6)
    changed["depth"][2] = 3 * changed["depth"][2]
    assert criterion(outputs, changed, labelled)[0].item() != pytest.approx(total.item(), rel=1e-3)

    # Same as evaluating the labelled samples alone.
    idx = labelled.nonzero()[:, 0]
    sub_out = {t: {s: o[idx] for s, o in per.items()} for t, per in outputs.items()}
    sub_batch = {t: v[idx] for t, v in batch.items()}
    assert criterion(sub_out, sub_batch)[0].item() == pytest.approx(total.item(), rel=1e-6)


def test_gradients_reach_every_used_output():
    outputs, batch = make_outputs_and_batch(9)
    criterion = MultiTaskLoss(["semseg", "depth", "normals"], {"semseg": 1.0, "depth": 1.0, "normals": 1.0})
    total, _ = criterion(outputs, batch)
    total.backward()
    for task in outputs:
        for s in (0, 1):
            assert outputs[task][s].grad is not None and outputs[task][s].grad.abs().sum() > 0, (task, s)
        assert torch.isfinite(outputs[task][0].grad).all()


def test_no_labelled_sample_gives_zero_with_graph():
    outputs, batch = make_outputs_and_batch(10, batch=2)
    criterion = MultiTaskLoss(["semseg", "depth"], {"semseg": 1.0, "depth": 1.0})
    total, logs = criterion(outputs, batch, torch.tensor([False, False]))
    total.backward()
    assert total.item() == 0.0 and outputs["semseg"][0].grad is not None
    assert list(logs) == ["loss/total"]


def test_multitask_loss_rejects_missing_weights():
    with pytest.raises(KeyError):
        MultiTaskLoss(["semseg", "depth"], {"semseg": 1.0})


def test_entropy_map_range_and_extremes():
    g = torch.Generator().manual_seed(11)
    logits = 3 * torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    ent = entropy_map(logits)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ent.numpy(), -p * np.log(p) / math.log(5), rtol=1e-10)
    total = ent.sum(dim=1)
    assert (total >= 0).all() and (total <= 1 + 1e-12).all()
    assert (ent <= 1 / (math.e * math.log(5)) + 1e-12).all()

    uniform = entropy_map(torch.zeros(1, 5, 2, 2)).sum(dim=1)
    torch.testing.assert_close(uniform, torch.ones(1, 2, 2))
    one_hot = torch.full((1, 5, 2, 2), -1e4)
    one_hot[:, 2] = 1e4
    peaked = entropy_map(one_hot)
    assert torch.isfinite(peaked).all() and peaked.sum(dim=1).max().item() == pytest.approx(0.0, abs=1e-12)


def test_depth_normalisation_uses_the_fixed_range():
    pred = torch.tensor([[[[-3.0, 10.0, 20.0, 60.0]]]])
    out = normalise_depth_for_discriminator(pred, g_min=5.0, g_max=45.0)
    torch.testing.assert_close(out, torch.tensor([[[[0.0, 0.125, 0.375, 1.0]]]]))
    # The same map inside a different batch is normalised identically.
    other = torch.cat([pred, 1000 * torch.rand(1, 1, 1, 4)], dim=0)
    torch.testing.assert_close(normalise_depth_for_discriminator(other, 5.0, 45.0)[:1], out)


def test_bce_with_domain_labels():
    x = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float64)
    src = np.mean(np.log1p(np.exp(-x.numpy())))  # label 1
    tgt = np.mean(np.log1p(np.exp(x.numpy())))  # label 0
    assert bce_with_domain(x, is_source=True).item() == pytest.approx(src, rel=1e-12)
    assert bce_with_domain(x, is_source=False).item() == pytest.approx(tgt, rel=1e-12)
