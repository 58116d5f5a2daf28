"""Tests for uda/geometry.py: intrinsics, (back-)projection, normals, depth codes, poses and warping."""

import pytest
import torch
from scipy.spatial.transform import Rotation

from uda.geometry import (
    backproject,
    crop_intrinsics,
    depth_to_disparity,
    depth_to_inverse_normalised,
    disparity_to_depth,
    hflip_intrinsics,
    inverse_normalised_to_depth,
    normals_from_depth,
    pose_vec_to_mat,
    project,
    resize_intrinsics,
    warp_frame,
)


def make_K(fx: float, fy: float, cx: float, cy: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)


def project_point(K: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Independent pinhole projection of one 3-D point (no kornia)."""
    p = K @ X
    return p[:2] / p[2]


def plane_depth(n: torch.Tensor, c: float, K: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Exact depth [1,1,H,W] of the plane n.X + c = 0 seen through K (rays through integer pixel centres)."""
    H, W = hw
    v, u = torch.meshgrid(torch.arange(H, dtype=K.dtype), torch.arange(W, dtype=K.dtype), indexing="ij")
    rays = torch.linalg.inv(K) @ torch.stack((u, v, torch.ones_like(u))).reshape(3, -1)  # z = 1
    depth = -c / (n @ rays)
    return depth.reshape(1, 1, H, W)


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.rad2deg(torch.acos((a * b).sum(dim=1).clamp(-1, 1)))


# --- projection conventions ------------------------------------------------------------------------------


def test_backproject_uses_integer_pixel_centres():
    K = make_K(50.0, 40.0, 7.3, 5.1)
    depth = torch.full((1, 1, 9, 13), 2.0, dtype=torch.float64)
    depth[0, 0, 6, 4] = 3.0
    points = backproject(depth, K)
    expected = torch.tensor([(4 - 7.3) * 3.0 / 50.0, (6 - 5.1) * 3.0 / 40.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(points[0, :, 6, 4], expected)
    torch.testing.assert_close(points[0, :, 0, 0], torch.tensor([-7.3 * 2 / 50, -5.1 * 2 / 40, 2.0]).double())


def test_project_inverts_backproject_with_batched_K():
    K = torch.stack((make_K(50.0, 40.0, 7.3, 5.1), make_K(30.0, 33.0, 2.0, 8.0)))
    depth = torch.rand(2, 1, 9, 13, dtype=torch.float64) + 0.5
    uv = project(backproject(depth, K), K)
    v, u = torch.meshgrid(torch.arange(9.0), torch.arange(13.0), indexing="ij")
    grid = torch.stack((u, v)).double().expand(2, 2, 9, 13)
    torch.testing.assert_close(uv, grid)
    # The second sample really used its own K: with the first K it would land elsewhere.
    assert not torch.allclose(project(backproject(depth, K[1]), K[0]), grid)


# --- intrinsics under image operations --------------------------------------------------------------------


@pytest.mark.parametrize("src_hw, dst_hw", [((12, 18), (4, 6)), ((8, 8), (24, 24)), ((10, 16), (7, 23))])
def test_resize_intrinsics_maps_pixel_edges_and_centres(src_hw, dst_hw):
    K = make_K(20.0, 25.0, 7.2, 4.4)
    K2 = resize_intrinsics(K, src_hw, dst_hw)
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    for u, v in [(-0.5, -0.5), (src_hw[1] - 0.5, src_hw[0] - 0.5), (3.0, 2.0)]:
        # A 3-D point on the ray of source coordinate (u, v): the image edges map to edges, any
        # coordinate scales about the outer edge of the image.
        X = torch.linalg.inv(K) @ torch.tensor([u, v, 1.0], dtype=torch.float64) * 2.5
        expected = torch.tensor([(u + 0.5) * sx - 0.5, (v + 0.5) * sy - 0.5], dtype=torch.float64)
        torch.testing.assert_close(project_point(K2, X), expected)


def test_resize_intrinsics_factor_three_centres_coincide():
    K = make_K(20.0, 25.0, 7.2, 4.4)
    K2 = resize_intrinsics(K, (12, 18), (4, 6))
    # Downscaling by 3: destination pixel 1 is the centre of source pixels 3..5, i.e. source pixel 4.
    X = torch.linalg.inv(K) @ torch.tensor([4.0, 7.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(project_point(K2, X), torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_crop_intrinsics_shifts_principal_point():
    K = make_K(20.0, 25.0, 7.2, 4.4)
    K2 = crop_intrinsics(K, top=3, left=5)
    X = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    torch.testing.assert_close(project_point(K2, X), project_point(K, X) - torch.tensor([5.0, 3.0]).double())
    # Negative offsets (padding) move the other way.
    torch.testing.assert_close(crop_intrinsics(K, -2, -1)[:2, 2], torch.tensor([8.2, 6.4]).double())


def test_hflip_intrinsics_moves_cx_only_and_mirrors_points():
    K = torch.stack((make_K(20.0, 25.0, 7.2, 4.4), make_K(21.0, 22.0, 3.0, 1.0)))
    W = 16
    Kf = hflip_intrinsics(K, W)
    torch.testing.assert_close(Kf[:, 0, 2], (W - 1) - K[:, 0, 2])
    torch.testing.assert_close(Kf[:, 1, 2], K[:, 1, 2])  # cy never changes (the released code's bug)
    torch.testing.assert_close(Kf[:, :2, :2], K[:, :2, :2])
    X = torch.tensor([0.3, -0.2, 2.0], dtype=torch.float64)
    Xm = X * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    u, v = project_point(K[0], X)
    torch.testing.assert_close(project_point(Kf[0], Xm), torch.stack((W - 1 - u, v)))
    torch.testing.assert_close(hflip_intrinsics(Kf, W), K)


# --- normals from depth -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normals_of_tilted_plane_match_analytic(dtype):
    H, W = 24, 32
    K = make_K(30.0, 26.0, 14.3, 10.8)
    n_true = torch.nn.functional.normalize(torch.tensor([0.4, -0.5, -0.75], dtype=torch.float64), dim=0)
    depth = plane_depth(n_true, 6.0, K, (H, W))
    assert (depth > 0).all()
    normals, valid = normals_from_depth(depth.to(dtype), K.to(dtype))
    assert normals.dtype == dtype and valid.dtype == torch.bool
    # Every interior pixel is valid (a plane has no discontinuity), the border never is.
    assert valid[0, 0, 1:-1, 1:-1].all()
    assert not valid[0, 0, 0].any() and not valid[0, 0, -1].any()
    assert not valid[0, 0, :, 0].any() and not valid[0, 0, :, -1].any()
    err = angle_deg(normals.double(), n_true.view(1, 3, 1, 1))[0][valid[0, 0]]
    assert err.max() < 1.0
    assert (normals[:, :, ~valid[0, 0]] == 0).all()


def test_normals_face_the_camera():
    K = make_K(30.0, 30.0, 7.5, 5.5)
    depth = torch.full((1, 1, 12, 16), 4.0, dtype=torch.float64)
    normals, valid = normals_from_depth(depth, K)
    torch.testing.assert_close(normals[0, :, 5, 7], torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64))
    points = backproject(depth, K)
    assert ((normals * points).sum(1)[valid[:, 0]] < 0).all()


def test_normals_of_ground_plane_stay_valid_up_to_the_horizon():
    # Ground 1.5 m below the camera: depth = fy * 1.5 / (v - cy), jumping by large ratios near the horizon.
    H, W = 20, 16
    K = make_K(20.0, 20.0, 7.5, 4.0)
    n_true = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64)
    depth = plane_depth(n_true, 1.5, K, (H, W))
    depth[depth <= 0] = 0.0  # sky (rows at or above the horizon) has no depth
    depth[~torch.isfinite(depth)] = 0.0
    normals, valid = normals_from_depth(depth, K)
    # Row 5 is the first ground row (its upper neighbours are sky); rows 6.. must all be valid.
    assert not valid[0, 0, 5].any()
    assert valid[0, 0, 6:-1, 1:-1].all()
    assert angle_deg(normals, n_true.view(1, 3, 1, 1))[valid[:, 0]].max() < 1.0


def test_normals_invalid_across_discontinuities_and_holes():
    K = make_K(20.0, 20.0, 7.5, 5.5)
    depth = torch.full((1, 1, 12, 16), 5.0, dtype=torch.float64)
    depth[..., 8:] = 5.6  # a 12% step between columns 7 and 8
    depth[..., 2, 3] = 0.0  # a missing measurement
    normals, valid = normals_from_depth(depth, K)
    v = valid[0, 0]
    assert not v[:, 7].any() and not v[:, 8].any()  # both sides of the step
    assert v[1:-1, 5].all() and v[1:-1, 10].all()  # flat away from the step and the hole
    assert not v[1:4, 2:5].any()  # the hole and its 8 neighbours
    assert (normals[0, :, ~v] == 0).all()
    assert torch.allclose(normals[0].norm(dim=0)[v], torch.ones(()).double())


def test_normals_need_metric_depth_not_inverse_depth():
    # Guards against the released code's bug: normals of g = 655.36/d are not the plane's normals.
    K = make_K(30.0, 26.0, 14.3, 10.8)
    n_true = torch.nn.functional.normalize(torch.tensor([0.4, -0.5, -0.75], dtype=torch.float64), dim=0)
    depth = plane_depth(n_true, 6.0, K, (16, 20))
    wrong, valid = normals_from_depth(depth_to_inverse_normalised(depth), K)
    assert angle_deg(wrong, n_true.view(1, 3, 1, 1))[valid[:, 0]].min() > 10.0


# --- depth parametrisations -------------------------------------------------------------------------------


def test_inverse_normalised_round_trip():
    depth = torch.tensor([0.0, 0.5, 1.0, 10.0, 80.0, 300.0])
    g = depth_to_inverse_normalised(depth)
    torch.testing.assert_close(g[1:], 655.36 / depth[1:])
    assert g[0] == 0
    torch.testing.assert_close(inverse_normalised_to_depth(g[1:]), depth[1:])
    torch.testing.assert_close(inverse_normalised_to_depth(torch.tensor([65.536])), torch.tensor([10.0]))
    # A raw regression can be <= 0: the decoded depth stays finite and positive.
    far = inverse_normalised_to_depth(torch.tensor([0.0, -3.0]))
    assert torch.isfinite(far).all() and (far > 1e3).all()


def test_disparity_round_trip_and_range():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    depth = disparity_to_depth(s, 0.1, 100.0)
    torch.testing.assert_close(depth[[0, -1]], torch.tensor([100.0, 0.1], dtype=torch.float64))
    assert (depth[1:] < depth[:-1]).all()
    torch.testing.assert_close(depth_to_disparity(depth, 0.1, 100.0), s)
    d = torch.tensor([1e-3, 0.5, 30.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(disparity_to_depth(depth_to_disparity(d, 1e-3, 80.0), 1e-3, 80.0), d)


# --- poses ----------------------------------------------------------------------------------------------


def test_pose_vec_to_mat_against_scipy():
    torch.manual_seed(0)
    aa = torch.randn(4, 3, dtype=torch.float64)
    aa[0] = 0.0
    aa[1] *= 1e-5  # near-identity branch
    t = torch.randn(4, 3, dtype=torch.float64)
    T = pose_vec_to_mat(aa, t)
    R_ref = torch.from_numpy(Rotation.from_rotvec(aa.numpy()).as_matrix())
    torch.testing.assert_close(T[:, :3, :3], R_ref)
    torch.testing.assert_close(T[:, :3, 3], t)
    torch.testing.assert_close(T[:, 3], torch.tensor([0.0, 0, 0, 1]).double().expand(4, 4))
    T_inv = pose_vec_to_mat(aa, t, invert=True)
    torch.testing.assert_close(T_inv @ T, torch.eye(4, dtype=torch.float64).expand(4, 4, 4))
    torch.testing.assert_close(T_inv, torch.linalg.inv(T))


# --- warping --------------------------------------------------------------------------------------------


def test_warp_identity_returns_the_image():
    torch.manual_seed(0)
    K = make_K(20.0, 22.0, 6.1, 4.7, torch.float32)
    image = torch.rand(2, 3, 10, 14)
    depth = torch.rand(2, 1, 10, 14) * 5 + 1
    warped, in_bounds = warp_frame(image, depth, torch.eye(4).expand(2, 4, 4), K)
    torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)
    assert in_bounds.all()


@pytest.mark.parametrize("tx, ty", [(0.4, 0.0), (0.0, -0.2), (0.1, 0.0)])
def test_warp_translation_of_fronto_parallel_plane_shifts_pixels(tx, ty):
    # Plane at Z = 4 m, fx = fy = 20 px: moving points by (tx, ty) moves them by 20 * t / 4 = 5 t pixels.
    H, W = 8, 12
    K = make_K(20.0, 20.0, 5.5, 3.5, torch.float32)
    torch.manual_seed(1)
    source = torch.rand(1, 2, H, W)
    depth = torch.full((1, 1, H, W), 4.0)
    T = torch.eye(4)[None].clone()
    T[0, 0, 3], T[0, 1, 3] = tx, ty
    warped, in_bounds = warp_frame(source, depth, T, K)
    du, dv = 5 * tx, 5 * ty
    v, u = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    expected_in = (u + du >= 0) & (u + du <= W - 1) & (v + dv >= 0) & (v + dv <= H - 1)
    assert torch.equal(in_bounds[0, 0], expected_in)
    # Independent bilinear sampling at (u + du, v + dv) for in-bounds pixels.
    uu, vv = (u + du)[expected_in], (v + dv)[expected_in]
    u0, v0 = uu.floor().long().clamp(max=W - 2), vv.floor().long().clamp(max=H - 2)
    a, b = uu - u0, vv - v0
    s = source[0]
    ref = (
        s[:, v0, u0] * (1 - a) * (1 - b)
        + s[:, v0, u0 + 1] * a * (1 - b)
        + s[:, v0 + 1, u0] * (1 - a) * b
        + s[:, v0 + 1, u0 + 1] * a * b
    )
    torch.testing.assert_close(warped[0][:, expected_in], ref, atol=1e-5, rtol=0)


def test_warp_general_pose_samples_where_the_camera_sees():
    # A source image that stores its own pixel coordinates: bilinear sampling of a linear ramp is exact, so
    # the warped values must be the projected coordinates, computed here without kornia.
    H, W = 9, 11
    K = make_K(15.0, 14.0, 5.2, 3.9)
    v, u = torch.meshgrid(torch.arange(H).double(), torch.arange(W).double(), indexing="ij")
    source = torch.stack((u, v))[None]
    torch.manual_seed(2)
    depth = torch.rand(1, 1, H, W, dtype=torch.float64) * 2 + 3
    T = pose_vec_to_mat(
        torch.tensor([[0.02, -0.05, 0.03]]).double(), torch.tensor([[0.1, 0.05, -0.2]]).double()
    )
    warped, in_bounds = warp_frame(source, depth, T, K)
    assert 0.5 * H * W < in_bounds.sum() < H * W
    for vi, ui in [(4, 5), (2, 3), (6, 8)]:
        X = torch.linalg.inv(K) @ torch.tensor([ui, vi, 1.0]).double() * depth[0, 0, vi, ui]
        Xs = T[0, :3, :3] @ X + T[0, :3, 3]
        uv = project_point(K, Xs)
        inside = bool((uv >= 0).all() and uv[0] <= W - 1 and uv[1] <= H - 1)
        assert in_bounds[0, 0, vi, ui] == inside
        if inside:
            torch.testing.assert_close(warped[0, :, vi, ui], uv)


def test_warp_marks_points_behind_the_camera():
    K = make_K(10.0, 10.0, 3.5, 3.5, torch.float32)
    depth = torch.full((1, 1, 8, 8), 1.0)
    T = torch.eye(4)[None].clone()
    T[0, 2, 3] = -2.0  # every point ends up 1 m behind the source camera
    _, in_bounds = warp_frame(torch.rand(1, 3, 8, 8), depth, T, K)
    assert not in_bounds.any()
