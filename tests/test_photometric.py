"""Photometric loss pieces against independent computations, and view synthesis on the exact toy scenes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uda.geometry import backproject, depth_to_disparity, disparity_to_depth, warp_frame
from uda.losses.photometric import (
    PhotometricLoss,
    min_reprojection,
    photometric_error,
    smoothness_loss,
    ssim_dissimilarity,
)


def numpy_ssim_dissimilarity(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(1 - SSIM)/2 clipped to [0,1] for [C,H,W] images, one pixel at a time over reflected 3x3 windows."""
    C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    yp = np.pad(y, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    out = np.zeros_like(x)
    c1, c2 = 0.01**2, 0.03**2
    for c in range(C):
        for i in range(H):
            for j in range(W):
                a = xp[c, i : i + 3, j : j + 3]
                b = yp[c, i : i + 3, j : j + 3]
                ma, mb = a.mean(), b.mean()
                va, vb = ((a - ma) ** 2).mean(), ((b - mb) ** 2).mean()
                cov = ((a - ma) * (b - mb)).mean()
                s = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
                out[c, i, j] = np.clip((1 - s) / 2, 0, 1)
    return out


def test_ssim_matches_numpy_box_window():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)
    # Correlated with x so SSIM spans a useful range (not all near 0).
    y = (0.6 * x + 0.4 * torch.rand(2, 3, 6, 7, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim_dissimilarity(x, y)
    assert got.shape == x.shape
    for b in range(2):
        expected = numpy_ssim_dissimilarity(x[b].numpy(), y[b].numpy())
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-9, atol=1e-12)
    assert ssim_dissimilarity(x, x).abs().max() < 1e-12
    # Symmetric and bounded; an inverted image is far less similar than a noisy copy.
    torch.testing.assert_close(ssim_dissimilarity(y, x), got)
    assert got.min() >= 0 and got.max() <= 1
    assert ssim_dissimilarity(x, 1 - x).mean() > 3 * got.mean()


def test_photometric_error_mixes_ssim_and_l1():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64)
    y = torch.rand(1, 3, 5, 6, generator=g, dtype=torch.float64)
    l1 = np.abs(x.numpy() - y.numpy()).mean(axis=1, keepdims=True)
    ssim = numpy_ssim_dissimilarity(x[0].numpy(), y[0].numpy()).mean(axis=0)[None, None]
    got = photometric_error(x, y)
    assert got.shape == (1, 1, 5, 6)
    np.testing.assert_allclose(got.numpy(), 0.85 * ssim + 0.15 * l1, rtol=1e-9)
    np.testing.assert_allclose(photometric_error(x, y, alpha=0.0).numpy(), l1, rtol=1e-12)
    assert photometric_error(x, x).abs().max() < 1e-12


def _half_good_sources(g: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A target and two 'warped' sources: A is close on the left half, B on the right half."""
    target = torch.rand(1, 3, 8, 16, generator=g)
    close = (target + 0.02 * torch.randn(target.shape, generator=g)).clamp(0, 1)
    far = torch.rand(target.shape, generator=g)
    left = torch.zeros(1, 1, 8, 16, dtype=torch.bool)
    left[..., :8] = True
    a = torch.where(left, close, far)
    b = torch.where(left, far, close)
    return target, [a, b]


def test_min_reprojection_takes_per_pixel_minimum():
    g = torch.Generator().manual_seed(2)
    target, (a, b) = _half_good_sources(g)
    loss, keep, value = min_reprojection(target, [a, b], [a, b], automask=False)
    assert value is loss  # nothing masked: the value is the minimum
    err_a, err_b = photometric_error(a, target), photometric_error(b, target)
    assert keep.all()
    torch.testing.assert_close(loss, torch.minimum(err_a, err_b))
    # Away from the seam (the 3x3 SSIM window mixes the columns next to it) each half picks its good source.
    torch.testing.assert_close(loss[..., :7], err_a[..., :7])
    torch.testing.assert_close(loss[..., 9:], err_b[..., 9:])
    assert (err_b[..., :7] > 2 * err_a[..., :7]).all() and (err_a[..., 9:] > 2 * err_b[..., 9:]).all()
    # The mean of the minimum is well below the mean of either source.
    assert loss.mean() < 0.6 * min(err_a.mean(), err_b.mean())


def test_automask_removes_exactly_the_pixels_where_identity_wins():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 3, 12, 12, generator=g)
    warped = [(target + 0.05 * torch.randn(target.shape, generator=g)).clamp(0, 1) for _ in range(2)]
    # The unwarped sources differ from the target except in a static patch (as if nothing moved there).
    static = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    static[..., 3:8, 2:9] = True
    sources = [torch.where(static, target, torch.rand(target.shape, generator=g)) for _ in range(2)]

    loss, keep, value = min_reprojection(target, warped, sources, generator=torch.Generator().manual_seed(0))
    warped_min = torch.minimum(*(photometric_error(w, target) for w in warped))
    identity_min = torch.minimum(*(photometric_error(s, target) for s in sources))
    torch.testing.assert_close(loss, warped_min)
    # The 1e-5 noise cannot flip any pixel here: the two minima are far apart everywhere.
    assert ((warped_min - identity_min).abs() > 1e-3).all()
    assert torch.equal(keep, warped_min < identity_min)
    assert not keep[..., 4:7, 3:8].any()  # the static patch is masked (its rim mixes in SSIM windows)
    assert keep[..., 9:, :].all() and keep[..., :, 10:].all()  # far from the patch everything is kept
    # The value (Monodepth2's loss): the minimum over both kinds of error, identity noise up to 1e-5.
    torch.testing.assert_close(value, torch.minimum(warped_min, identity_min), atol=1e-4, rtol=0)


def test_automask_noise_breaks_ties_deterministically():
    g = torch.Generator().manual_seed(4)
    target = torch.rand(1, 3, 16, 16, generator=g)
    source = torch.rand(1, 3, 16, 16, generator=g)
    # A warp that changes nothing: warped and identity errors tie at every pixel.
    masks = [
        min_reprojection(target, [source], [source], generator=torch.Generator().manual_seed(7))[1]
        for _ in range(2)
    ]
    assert torch.equal(masks[0], masks[1])
    assert 0.3 < masks[0].float().mean() < 0.7
    other = min_reprojection(target, [source], [source], generator=torch.Generator().manual_seed(8))[1]
    assert not torch.equal(other, masks[0])


def numpy_smoothness(d: np.ndarray, img: np.ndarray) -> float:
    d = d / d.mean()
    gx = np.abs(np.diff(d, axis=1)) * np.exp(-np.abs(np.diff(img, axis=2)).mean(axis=0))
    gy = np.abs(np.diff(d, axis=0)) * np.exp(-np.abs(np.diff(img, axis=1)).mean(axis=0))
    return gx.mean() + gy.mean()


def test_smoothness_matches_numpy_and_is_scale_free_and_edge_aware():
    g = torch.Generator().manual_seed(5)
    disp = torch.rand(1, 1, 6, 9, generator=g, dtype=torch.float64) + 0.1
    image = torch.rand(1, 3, 6, 9, generator=g, dtype=torch.float64)
    got = smoothness_loss(disp, image).item()
    assert got == pytest.approx(numpy_smoothness(disp[0, 0].numpy(), image[0].numpy()), rel=1e-6)
    assert smoothness_loss(5 * disp, image).item() == pytest.approx(got, rel=1e-6)
    assert smoothness_loss(torch.full_like(disp, 0.3), image).item() == pytest.approx(0.0, abs=1e-12)
    # A disparity step costs less where the image has an edge at the same place.
    step = torch.ones(1, 1, 6, 9, dtype=torch.float64)
    step[..., 5:] = 2.0
    flat = torch.full((1, 3, 6, 9), 0.5, dtype=torch.float64)
    edge = flat.clone()
    edge[..., 5:] = 1.0
    assert smoothness_loss(step, edge) < 0.7 * smoothness_loss(step, flat)


def test_photometric_loss_identity_motion_and_logs():
    g = torch.Generator().manual_seed(6)
    target = torch.rand(1, 3, 16, 32, generator=g)
    shifted = torch.roll(target, 1, dims=-1)
    disparities = {s: torch.full((1, 1, 16 >> s, 32 >> s), 0.5, requires_grad=True) for s in (0, 1)}
    K = torch.tensor([[[20.0, 0, 15.5], [0, 20.0, 7.5], [0, 0, 1]]])
    eye = torch.eye(4)[None]
    loss_fn = PhotometricLoss(scales=(0, 1))
    torch.manual_seed(0)
    loss, logs = loss_fn(disparities, target, {-1: shifted, 1: target}, {-1: eye, 1: eye}, K)
    assert set(logs) == {"loss/photometric", "loss/smoothness", "automask_fraction"}
    # Source +1 equals the target and does not move: its warped error is 0 everywhere, and it ties with its
    # identity error, so the noise masks about half of the pixels.
    assert logs["loss/photometric"] < 1e-6 and logs["loss/smoothness"] == pytest.approx(0.0, abs=1e-6)
    assert 0.3 < logs["automask_fraction"] < 0.7
    loss.backward()
    assert all(d.grad is not None for d in disparities.values())


def test_photometric_term_averages_over_every_pixel_as_monodepth2():
    # Monodepth2 averages the minimum over identity and reprojection errors over all pixels: masked pixels
    # count with their identity error (no parameter changes it), so the term's gradient is the kept pixels'
    # sum over ALL pixels, not over the kept ones (which would scale the term up against smoothness as more is
    # masked), and its value does not rise when training keeps more pixels (as counting masked ones 0 would).
    g = torch.Generator().manual_seed(4)
    target = torch.rand(1, 3, 12, 16, generator=g)
    source = target.clone()
    source[..., 8:] = torch.rand(1, 3, 12, 8, generator=g)  # the right half differs
    disparities = {0: torch.full((1, 1, 12, 16), 0.5, requires_grad=True)}
    K = torch.tensor([[[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]]])
    eye = {1: torch.eye(4)[None]}
    torch.manual_seed(0)
    _, logs = PhotometricLoss(scales=(0,), smoothness_weight=0.0)(disparities, target, {1: source}, eye, K)
    torch.manual_seed(
        0
    )  # the same tie-breaking noise: warped error == identity error under the identity pose
    per_pixel, keep, value = min_reprojection(target, [source], [source])
    assert 0.2 < keep.float().mean() < 0.8
    # Under the identity pose the warped and identity errors are equal: the minimum over both is the error
    # itself at every pixel (up to the 1e-5 tie-breaking noise), kept or masked.
    error = photometric_error(source, target)
    torch.testing.assert_close(value, error, atol=1e-4, rtol=0)
    assert logs["loss/photometric"] == pytest.approx(error.mean().item(), abs=1e-4)
    assert logs["loss/photometric"] > 1.2 * (per_pixel * keep).mean().item()
    # Only kept pixels carry a gradient, each with weight 1/(all pixels).
    d = torch.rand(1, 1, 12, 16, requires_grad=True)
    torch.manual_seed(0)
    _, keep, value = min_reprojection(target, [source * d], [source])
    value.mean().backward()
    expected = torch.autograd.grad((photometric_error(source * d, target) * keep).sum() / keep.numel(), d)[0]
    torch.testing.assert_close(d.grad, expected)


def test_geometry_and_photometric_loss_stay_float32_under_bf16_autocast():
    # bf16 autocast is the training default on GPUs. Under it the warp of a 1024-wide frame would run its
    # matrix products in bf16 (pixel columns above 512 rounded to every 4th integer, rotations to steps of
    # 0.004: samples measured up to 13 px off, identical frames given a photometric loss of 0.33). Geometry
    # and the photometric loss must compute exactly what they compute in float32.
    from uda.geometry import pose_vec_to_mat

    g = torch.Generator().manual_seed(3)
    h, w = 8, 1024
    target = F.avg_pool2d(torch.rand(2, 3, h, w + 8, generator=g), (1, 9), stride=1)  # smooth along rows
    disparities = {
        s: (0.05 + 0.9 * torch.rand(2, 1, h >> s, w >> s, generator=g)).requires_grad_() for s in (0, 1)
    }
    K = torch.tensor([[[1104.0, 0, 511.5], [0, 1104.0, 3.5], [0, 0, 1]]]).expand(2, 3, 3)
    vec = (torch.tensor([[0.0, 0.0105, 0.0]] * 2), torch.tensor([[0.0, 0.0, 0.5]] * 2))  # 0.6 deg yaw, 0.5 m
    eye = {1: torch.eye(4).expand(2, 4, 4)}
    loss_fn = PhotometricLoss(scales=(0, 1))
    results = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pose = pose_vec_to_mat(*vec)
            depth = disparity_to_depth(disparities[0].detach(), 0.1, 100.0)
            warped, _ = warp_frame(target, depth, pose, K)
            torch.manual_seed(0)  # the auto-mask's tie-breaking noise
            _, same = loss_fn(disparities, target, {1: target}, eye, K)
            torch.manual_seed(0)
            loss, _ = loss_fn(disparities, target, {1: torch.roll(target, 2, dims=-1)}, {1: pose}, K)
        assert pose.dtype == warped.dtype == loss.dtype == torch.float32
        grads = torch.autograd.grad(loss, list(disparities.values()))
        results.append([pose, warped, torch.tensor(same["loss/photometric"]), loss, *grads])
    assert results[1][2] < 1e-6  # identical frames, identity pose: nothing to explain
    for fp32, bf16 in zip(*results, strict=True):
        torch.testing.assert_close(bf16, fp32, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# View synthesis on the toy scenes, whose depth and camera motion are exact
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tiny ops run far slower with intra-op threads fighting over 2 shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_triple(domain: str, index: int, height: int, width: int) -> dict:
    """Target frame, neighbours -1/+1, exact T_target_to_source, K, depth and a mask of sky/ego pixels."""
    from uda.data.toy import CLASS_NAMES, render_frame

    frames = {o: render_frame(domain, index, height=height, width=width, offset=o) for o in (-1, 0, 1)}
    target = frames[0]

    def image(f: dict) -> torch.Tensor:
        return torch.from_numpy(f["image"]).permute(2, 0, 1)[None].float() / 255

    # Camera-to-world poses: target camera -> world -> source camera.
    poses = {
        o: torch.from_numpy(np.linalg.inv(frames[o]["pose"]) @ target["pose"]).float()[None] for o in (-1, 1)
    }
    classes = target["classes"]
    # Sky has no finite depth and the ego bonnet moves with the camera: neither obeys the static-scene warp.
    scene = (classes != CLASS_NAMES.index("sky")) & (classes != CLASS_NAMES.index("ego vehicle"))
    return {
        "target": image(target),
        "sources": {o: image(frames[o]) for o in (-1, 1)},
        "source_depth": {o: torch.from_numpy(frames[o]["depth"])[None, None] for o in (-1, 1)},
        "poses": poses,
        "K": torch.from_numpy(target["K"])[None],
        "depth": torch.from_numpy(target["depth"])[None, None],
        "scene": torch.from_numpy(scene)[None, None],
    }


def warp_errors(t: dict, depth_scale: float) -> tuple[float, float]:
    """Mean photometric error of the neighbours warped with scaled depth, and of the unwarped neighbours,
    over the scene pixels that the correct warp keeps in bounds (both offsets pooled)."""
    warped_err, identity_err = [], []
    for o in (-1, 1):
        _, in_bounds = warp_frame(t["sources"][o], t["depth"], t["poses"][o], t["K"])
        mask = in_bounds & t["scene"]
        warped, _ = warp_frame(t["sources"][o], t["depth"] * depth_scale, t["poses"][o], t["K"])
        warped_err.append(photometric_error(warped, t["target"])[mask])
        identity_err.append(photometric_error(t["sources"][o], t["target"])[mask])
    return torch.cat(warped_err).mean().item(), torch.cat(identity_err).mean().item()


def test_toy_depth_maps_agree_under_the_exact_motion():
    t = toy_triple("cityscapes", 2, 96, 192)
    for o in (-1, 1):
        for scale, expect_consistent in ((1.0, True), (2.0, False)):
            depth = t["depth"] * scale
            points = backproject(depth, t["K"]).flatten(2)
            T = t["poses"][o]
            z = (T[:, 2:3, :3] @ points + T[:, 2:3, 3:]).reshape(depth.shape)
            source_depth, in_bounds = warp_frame(t["source_depth"][o], depth, T, t["K"])
            mask = in_bounds & t["scene"]
            rel = ((source_depth - z).abs() / z)[mask]
            if expect_consistent:
                # The z of every target point seen from the source camera is the source's own depth there,
                # except at occlusion edges and disocclusions.
                assert mask.float().mean() > 0.8
                assert rel.median() < 1e-3 and (rel < 0.01).float().mean() > 0.85
            else:
                assert (rel < 0.01).float().mean() < 0.2


def test_toy_warp_reproduces_clean_synthia_frame():
    # The SYNTHIA-like domain renders without sensor noise: the exact warp leaves only resampling and
    # occlusion errors. Measured at 96x162: correct 0.073, depth x2 0.129, unwarped 0.165.
    t = toy_triple("synthia", 0, 96, 192)
    correct, unwarped = warp_errors(t, 1.0)
    doubled, _ = warp_errors(t, 2.0)
    assert correct < 0.1
    assert doubled > 1.5 * correct
    assert unwarped > 2.0 * correct


def test_toy_warp_reproduces_noisy_cityscapes_frame_to_the_noise_floor():
    # The Cityscapes-like domain adds per-pixel sensor noise (std 0.008 + 0.02 sqrt(I)) and vignetting, so
    # two noise draws of the same render already differ by photometric error ~0.13-0.14 (3x3 SSIM is noise
    # sensitive). Measured at 96x192: correct 0.138 (at that floor), depth x2 0.160, unwarped 0.206.
    t = toy_triple("cityscapes", 2, 96, 192)
    correct, unwarped = warp_errors(t, 1.0)
    doubled, _ = warp_errors(t, 2.0)
    assert correct < 0.15
    assert doubled > 1.08 * correct
    assert unwarped > 1.3 * correct


def optimise_disparity_map(t: dict, steps: int = 40) -> tuple[list[float], float, float]:
    """Fits a free disparity map to one toy triple with the true poses; returns losses, depth abs rel
    (median over near scene pixels) before and after."""
    torch.manual_seed(0)  # the auto-mask's tie-breaking noise
    H, W = t["target"].shape[-2:]
    start = depth_to_disparity(torch.tensor(10.0))  # a flat 10 m guess
    logit = torch.full((1, 1, H, W), torch.logit(start).item(), requires_grad=True)
    loss_fn = PhotometricLoss()
    optimiser = torch.optim.Adam([logit], lr=0.1)
    near = t["scene"] & (t["depth"] < 80)

    def abs_rel() -> float:
        depth = disparity_to_depth(torch.sigmoid(logit.detach()))
        return ((depth - t["depth"]).abs() / t["depth"])[near].median().item()

    before = abs_rel()
    losses = []
    for _ in range(steps):
        disp = torch.sigmoid(logit)
        disparities = {s: F.avg_pool2d(disp, 2**s) if s else disp for s in (0, 1, 2, 3)}
        loss, _ = loss_fn(disparities, t["target"], t["sources"], t["poses"], t["K"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses, before, abs_rel()


def test_photometric_loss_trains_depth_on_toy_frames():
    # Measured at 64x108: loss 0.069 -> 0.032, depth abs rel 0.41 -> 0.23 (metric: the true poses fix scale).
    losses, before, after = optimise_disparity_map(toy_triple("synthia", 0, 64, 128))
    assert losses[-1] < 0.6 * losses[0]
    assert after < 0.75 * before
    # The noisy Cityscapes-like frames also lower the loss (0.115 -> 0.092).
    losses, _, _ = optimise_disparity_map(toy_triple("cityscapes", 2, 64, 128))
    assert losses[-1] < 0.9 * losses[0]


def test_pose_net_learns_the_toy_camera_motion_against_the_true_depth():
    # The pose half of self-supervised depth: with the depth known (here the toy's exact depth in units of
    # 30 m, a depth gauge the untrained disparity head could sit at), the photometric loss alone teaches the pose
    # net the camera's motion. It starts forward (as photometric.pose_init_forward does) at a third of the true
    # length (0.005 depth units against 0.5 m / 30 = 0.0167): from a near-identity start the outcome depends on
    # the seed (seeds 1 and 2 stayed at cosines <= 0.2 after 120 steps). Measured over seeds 0-3: cosine to the
    # true translation >= 0.998 for all 16 frames and both neighbours, lengths 0.79-1.24 of the true one after
    # 30 steps, 0.87-1.19 after 60.
    from uda.models.posenet import PoseNet, relative_pose

    torch.manual_seed(0)
    gauge = 30.0
    triples = [toy_triple("cityscapes", i, 96, 192) for i in range(0, 64, 4)]
    net = PoseNet("resnet18", forward_motion=0.005)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = PhotometricLoss(scales=(0,))

    def batch(items: list[dict]) -> tuple:
        target = torch.cat([t["target"] for t in items])
        sources = {o: torch.cat([t["sources"][o] for t in items]) for o in (-1, 1)}
        depth = torch.cat([t["depth"] for t in items]).clamp(max=100) / gauge
        return target, sources, depth, torch.cat([t["K"] for t in items])

    def length_ratios() -> torch.Tensor:
        target, sources, _, _ = batch(triples)
        with torch.no_grad():
            return torch.cat(
                [
                    relative_pose(net, target, sources[o], o)[:, :3, 3].norm(dim=1)
                    * gauge
                    / torch.cat([t["poses"][o][:, :3, 3] for t in triples]).norm(dim=1)
                    for o in (-1, 1)
                ]
            )

    assert length_ratios().max() < 0.5  # it has the length to learn
    rng = np.random.default_rng(0)
    for _ in range(60):
        target, sources, depth, K = batch([triples[i] for i in rng.choice(len(triples), 4, replace=False)])
        poses = {o: relative_pose(net, target, sources[o], o) for o in (-1, 1)}
        loss, _ = loss_fn({0: depth_to_disparity(depth)}, target, sources, poses, K)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    target, sources, _, _ = batch(triples)
    with torch.no_grad():
        for o in (-1, 1):
            predicted = relative_pose(net, target, sources[o], o)[:, :3, 3] * gauge
            true = torch.cat([t["poses"][o][:, :3, 3] for t in triples])
            assert F.cosine_similarity(predicted, true).min() > 0.98
            ratio = predicted.norm(dim=1) / true.norm(dim=1)
            assert ratio.min() > 0.7 and ratio.max() < 1.45
