"""Tests for uda/data/transforms.py: alignment of every map, K consistency, flips, padding, determinism."""

import pytest
import torch

from uda.data.transforms import EvalTransform, TrainTransform, crop_pad, resize_bilinear, resize_nearest
from uda.geometry import backproject, resize_intrinsics

H0, W0 = 8, 12


def make_K(fx: float = 10.0, fy: float = 11.0, cx: float = 5.3, cy: float = 3.6) -> torch.Tensor:
    return torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def coded_sample(h: int = H0, w: int = W0) -> dict:
    """A sample whose maps encode their own pixel coordinates, so alignment can be read back."""
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    pixel_id = v * w + u  # unique per source pixel, below 255 (the ignore id) for the sizes used here
    torch.manual_seed(123)
    normals = torch.nn.functional.normalize(torch.randn(3, h, w), dim=0)
    return {
        "image": torch.stack(((u + 1) / 100, (v + 1) / 100, torch.full_like(u, 0.5))),
        "semseg": pixel_id.long(),
        "depth": (1.0 + pixel_id / 10)[None],
        "normals": normals,
        "edges": (pixel_id % 2)[None],
        "K": make_K(),
        "frames": {-1: torch.stack(((u + 1) / 100, (v + 1) / 100, torch.full_like(u, 0.25)))},
        "domain": 1,
        "meta": {"dataset": "toy", "id": "x"},
    }


def source_coordinates(K_out: torch.Tensor, hw: tuple[int, int], K_src: torch.Tensor) -> torch.Tensor:
    """Continuous source pixel (u, v) [2,h,w] seen by each output pixel, according to the two K's."""
    h, w = hw
    v, u = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    rays = torch.linalg.inv(K_out) @ torch.stack((u, v, torch.ones_like(u))).reshape(3, -1)
    uv = K_src @ rays
    return (uv[:2] / uv[2]).reshape(2, h, w)


def decode_pixel(semseg: torch.Tensor) -> torch.Tensor:
    return torch.stack((semseg % W0, semseg // W0)).float()


def test_train_transform_keeps_all_maps_aligned_with_K():
    src = coded_sample()
    n_flipped = n_padded = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = TrainTransform((6, 10), scale_range=(0.6, 1.8), hflip=True, color_jitter=0.0)(src)
        assert out["image"].shape == (3, 6, 10) and out["semseg"].shape == (6, 10)
        assert out["depth"].shape == (1, 6, 10) and out["normals"].shape == (3, 6, 10)
        assert out["semseg"].dtype == torch.int64 and out["K"].dtype == torch.float32
        assert out["domain"] == 1 and out["meta"] == src["meta"]

        real = out["semseg"] != 255
        n_padded += int((~real).any())
        label_uv = decode_pixel(out["semseg"])
        # K of a flipped image describes the mirrored scene (x -> -x): mirror the ray back to compare.
        plain = source_coordinates(out["K"], (6, 10), src["K"])
        mirror = source_coordinates(out["K"] @ torch.diag(torch.tensor([-1.0, 1.0, 1.0])), (6, 10), src["K"])
        flipped = bool(((label_uv - mirror).abs()[:, real] <= 0.5 + 1e-4).all())
        n_flipped += flipped
        coords = mirror if flipped else plain
        # Labels: the source pixel each output pixel copied is the nearest one to where K says it looks.
        assert ((label_uv - coords).abs()[:, real] <= 0.5 + 1e-4).all()
        # Depth, normals and edges were copied from that same source pixel.
        sy, sx = label_uv[1].long()[real], label_uv[0].long()[real]
        assert torch.equal(out["depth"][0][real], src["depth"][0, sy, sx])
        assert torch.equal(out["edges"][0][real], src["edges"][0, sy, sx])
        expected_normals = src["normals"][:, sy, sx] * (torch.tensor([-1.0, 1, 1])[:, None] if flipped else 1)
        assert torch.equal(out["normals"][:, real], expected_normals)
        # Padding: ignore / no depth / no normal / black image.
        assert (out["depth"][0][~real] == 0).all() and (out["normals"][:, ~real] == 0).all()
        # Images and frames: bilinear samples of the coordinate ramp at the K-predicted location, away from
        # the borders, where antialiasing windows are truncated. Antialiased downscaling by a non-integer
        # ratio samples its triangle kernel on the pixel grid, which shifts a ramp by up to ~0.07 px; an
        # off-by-half-pixel convention error would be 0.2 px or more here.
        image_uv = out["image"][:2] * 100 - 1
        inner = real & (coords[0] > 2) & (coords[0] < W0 - 3) & (coords[1] > 2) & (coords[1] < H0 - 3)
        assert inner.any()
        torch.testing.assert_close(image_uv[:, inner], coords[:, inner], atol=0.1, rtol=0)
        torch.testing.assert_close(out["frames"][-1][:2], out["image"][:2])
        torch.testing.assert_close(out["frames"][-1][2], torch.where(real, 0.25, 0.0))
        assert (out["image"][:, ~real] == 0).all()
    assert 0 < n_flipped < 12 and n_padded > 0


def test_backprojection_is_preserved_by_resize_and_crop():
    # Scale x3 (8x12 -> 24x36, cropped to 8x12) and /3 (12x18 -> 4x6, padded to 12x18): nearest samples are
    # exact where pixel centres coincide, and there the transformed depth with the transformed K must give
    # the very same 3-D point.
    for (h, w), scale in [((8, 12), 3.0), ((12, 18), 1 / 3)]:
        src = coded_sample(h, w)
        points_src = backproject(src["depth"][None], src["K"])[0]
        torch.manual_seed(0)
        out = TrainTransform((h, w), scale_range=(scale, scale), hflip=False)(src)
        real = out["semseg"] != 255
        coords = source_coordinates(out["K"], (h, w), src["K"])
        exact = real & ((coords - coords.round()).abs() < 1e-4).all(0)
        assert exact.sum() >= 8
        points_out = backproject(out["depth"][None], out["K"])[0]
        sy, sx = coords[1].round().long()[exact], coords[0].round().long()[exact]
        torch.testing.assert_close(points_out[:, exact], points_src[:, sy, sx])
        # And those output pixels hold exactly that source pixel's label.
        assert torch.equal(out["semseg"][exact], src["semseg"][sy, sx])


def test_flip_mirrors_normals_x_and_cx_not_cy():
    src = coded_sample()
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out = TrainTransform((H0, W0), hflip=True)(src)
        flipped = torch.equal(out["semseg"], src["semseg"].flip(-1))
        seen.add(flipped)
        if not flipped:
            assert torch.equal(out["semseg"], src["semseg"]) and torch.equal(out["K"], src["K"])
            continue
        torch.testing.assert_close(out["K"][0, 2], W0 - 1 - src["K"][0, 2])
        assert out["K"][1, 2] == src["K"][1, 2] and out["K"][0, 0] == src["K"][0, 0]
        assert torch.equal(out["normals"][0], -src["normals"][0].flip(-1))
        assert torch.equal(out["normals"][1:], src["normals"][1:].flip(-1))
        assert torch.equal(out["frames"][-1], src["frames"][-1].flip(-1))
        # The 3-D scene is mirrored: same y and z, negated x.
        p_out = backproject(out["depth"][None], out["K"])[0]
        p_src = backproject(src["depth"][None], src["K"])[0].flip(-1)
        torch.testing.assert_close(p_out, p_src * torch.tensor([-1.0, 1, 1])[:, None, None])
    assert seen == {True, False}


def test_small_scale_pads_with_unknown_values():
    src = coded_sample()
    torch.manual_seed(0)
    out = TrainTransform((16, 24), scale_range=(0.5, 0.5), hflip=False)(src)
    pad = out["semseg"] == 255
    assert pad.sum() == 16 * 24 - 8 * 12
    assert (out["depth"][0][pad] == 0).all() and (out["image"][:, pad] == 0).all()
    assert (out["edges"][0][pad] == 255).all() and (out["normals"][:, pad] == 0).all()  # edges: 255 = padding


def test_color_jitter_same_parameters_for_image_and_frames():
    torch.manual_seed(0)
    image = torch.rand(3, H0, W0)
    sample = {"image": image, "frames": {-1: image.clone(), 1: image.clone()}, "K": make_K()}
    t = TrainTransform((H0, W0), hflip=False, color_jitter=0.4)
    out = t(sample)
    assert not torch.allclose(out["image"], image, atol=1e-2)
    assert out["image"].min() >= 0 and out["image"].max() <= 1
    torch.testing.assert_close(out["frames"][-1], out["image"])
    torch.testing.assert_close(out["frames"][1], out["image"])
    # The caller's sample is untouched.
    assert torch.equal(sample["image"], image) and torch.equal(sample["frames"][-1], image)


def test_jittered_video_keeps_its_original_frames_for_the_photometric_loss():
    # Monodepth2: the networks see jittered frames, the loss compares the originals. The crop, scale and flip are
    # drawn before the jitter, so the same seed without jitter gives exactly the frames kept.
    src = coded_sample()
    src["frames"] = {o: torch.rand(3, H0, W0) for o in (-1, 1)}
    torch.manual_seed(3)
    out = TrainTransform((6, 10), scale_range=(0.7, 1.5), color_jitter=0.4)(src)
    torch.manual_seed(3)
    plain = TrainTransform((6, 10), scale_range=(0.7, 1.5))(src)
    assert "unjittered" not in plain
    assert torch.equal(out["unjittered"]["image"], plain["image"])
    assert all(torch.equal(out["unjittered"]["frames"][o], plain["frames"][o]) for o in (-1, 1))
    assert not torch.allclose(out["image"], plain["image"], atol=1e-2)  # what the networks see is jittered
    still = {k: v for k, v in src.items() if k != "frames"}  # a still image has nothing to keep
    assert "unjittered" not in TrainTransform((6, 10), color_jitter=0.4)(still)


def test_train_transform_is_deterministic_under_manual_seed():
    src = coded_sample()
    t = TrainTransform((6, 10), scale_range=(0.7, 1.5), color_jitter=0.3)

    def run(seed: int) -> dict:
        torch.manual_seed(seed)
        return t(src)

    a, b, c = run(5), run(5), run(6)
    for key in ("image", "semseg", "depth", "normals", "K"):
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(a["frames"][-1], b["frames"][-1])
    assert any(not torch.equal(a[k], c[k]) for k in ("image", "semseg", "K"))


def test_eval_transform_resizes_image_and_K_and_optionally_labels():
    src = coded_sample()
    out = EvalTransform((4, 6))(src)
    assert out["image"].shape == (3, 4, 6) and out["frames"][-1].shape == (3, 4, 6)
    assert torch.equal(out["semseg"], resize_nearest(src["semseg"], (4, 6)))
    torch.testing.assert_close(out["K"][0], torch.tensor([5.0, 0.0, (5.3 + 0.5) / 2 - 0.5]))
    torch.testing.assert_close(out["K"][1], torch.tensor([0.0, 5.5, (3.6 + 0.5) / 2 - 0.5]))
    torch.testing.assert_close(out["normals"], resize_nearest(src["normals"], (4, 6)))

    kept = EvalTransform((4, 6), keep_label_resolution=True)(src)
    assert kept["image"].shape == (3, 4, 6)
    assert torch.equal(kept["semseg"], src["semseg"]) and torch.equal(kept["depth"], src["depth"])
    torch.testing.assert_close(kept["K"], out["K"])

    same = EvalTransform(None)(src)
    assert torch.equal(same["image"], src["image"]) and torch.equal(same["K"], src["K"])


def test_resize_nearest_picks_the_nearest_source_centre():
    x = torch.arange(6).view(1, 6)
    # 6 -> 2: destination centres at source 1.0 and 4.0; 6 -> 4: at 0.25, 1.75, 3.25, 4.75.
    assert resize_nearest(x, (1, 2)).tolist() == [[1, 4]]
    assert resize_nearest(x, (1, 4)).tolist() == [[0, 2, 3, 5]]
    # 2 -> 6 (x3): destination centres at -1/3, 0, 1/3, 2/3, 1, 4/3.
    assert resize_nearest(torch.tensor([[7, 9]]), (1, 6)).tolist() == [[7, 7, 7, 9, 9, 9]]


# ------------------------------------------------------------------ resize_to: VKITTI2 -> Cityscapes source

VK_HW, VK_RESIZE, VK_SIZE = (375, 1242), (512, 1696), (512, 1024)
VK_K = (725.0087, 725.0087, 620.5, 187.0)  # fx, fy, cx, cy at 1242x375


def vkitti2_like_sample() -> dict:
    g = torch.Generator().manual_seed(7)
    h, w = VK_HW
    return {
        "image": torch.rand(3, h, w, generator=g),
        "depth": torch.rand(1, h, w, generator=g) * 80 + 1,
        "semseg": torch.randint(0, 8, (h, w), generator=g),
        "K": make_K(*VK_K),
        "frames": {-1: torch.rand(3, h, w, generator=g)},
    }


def resized_K(hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """fx, fy, cx, cy of the VKITTI2 K after a resize of 1242x375 to hw (pixel-centre convention)."""
    sx, sy = hw[1] / VK_HW[1], hw[0] / VK_HW[0]
    fx, fy, cx, cy = VK_K
    return fx * sx, fy * sy, (cx + 0.5) * sx - 0.5, (cy + 0.5) * sy - 0.5


def test_resize_to_then_crop_is_an_exact_crop_of_the_uniformly_resized_sample():
    src = vkitti2_like_sample()
    full = {
        "image": resize_bilinear(src["image"], VK_RESIZE),
        "frame": resize_bilinear(src["frames"][-1], VK_RESIZE),
        "depth": resize_nearest(src["depth"], VK_RESIZE),
        "semseg": resize_nearest(src["semseg"], VK_RESIZE),
    }
    fx, fy, cx_full, cy_full = resized_K(VK_RESIZE)
    # 1242 -> 1696 and 375 -> 512 scale by the same factor to 2e-4: the aspect ratio is kept.
    assert abs((fx / VK_K[0]) / (fy / VK_K[1]) - 1) < 2e-4
    t = TrainTransform(VK_SIZE, hflip=True, resize_to=VK_RESIZE)
    lefts, flips = set(), set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = t(src)
        K = out["K"].double()
        assert out["image"].shape == (3, *VK_SIZE) and out["semseg"].shape == VK_SIZE
        # fx, fy follow the resize; the crop and the flip never change them; rows are not cropped (512 = 512).
        assert abs(K[0, 0] / fx - 1) < 1e-6 and abs(K[1, 1] / fy - 1) < 1e-6
        assert abs(K[1, 2] - cy_full) < 1e-3
        for flipped in (False, True):
            cx = VK_SIZE[1] - 1 - K[0, 2] if flipped else K[0, 2]
            left = round(float(cx_full - cx))
            window = full["image"][..., left : left + VK_SIZE[1]]
            if 0 <= left <= VK_RESIZE[1] - VK_SIZE[1] and torch.equal(
                out["image"], window.flip(-1) if flipped else window
            ):
                break
        else:
            raise AssertionError(f"seed {seed}: the image is no crop of the resized image at the K offset")
        # cx moved by exactly the crop offset (mirrored as width - 1 - cx on a flip).
        assert abs(cx_full - cx - left) < 1e-3

        def crop(x: torch.Tensor, left: int = left, flipped: bool = flipped) -> torch.Tensor:
            x = x[..., left : left + VK_SIZE[1]]
            return x.flip(-1) if flipped else x

        assert torch.equal(out["depth"], crop(full["depth"]))
        assert torch.equal(out["semseg"], crop(full["semseg"]))
        assert torch.equal(out["frames"][-1], crop(full["frame"]))
        lefts.add(left)
        flips.add(flipped)
    assert len(lefts) > 4 and flips == {False, True}

    # Without resize_to the same sample is stretched to 512x1024: fx/fy changes by 0.6, the distortion avoided.
    stretched = TrainTransform(VK_SIZE, hflip=False)(src)["K"].double()
    assert abs((stretched[0, 0] / stretched[1, 1]) / (VK_K[0] / VK_K[1]) - 0.604) < 1e-3


def test_resize_to_scale_zooms_relative_to_resize_to_and_pads():
    src = vkitti2_like_sample()
    for scale in (0.5, 1.5):
        hw = (round(VK_RESIZE[0] * scale), round(VK_RESIZE[1] * scale))  # 256x848 (padded) or 768x2544
        fx, fy, cx, cy = resized_K(hw)
        torch.manual_seed(1)
        out = TrainTransform(VK_SIZE, scale_range=(scale, scale), hflip=False, resize_to=VK_RESIZE)(src)
        K = out["K"].double()
        assert abs(K[0, 0] / fx - 1) < 1e-6 and abs(K[1, 1] / fy - 1) < 1e-6
        top, left = round(float(cy - K[1, 2])), round(float(cx - K[0, 2]))
        assert abs(cy - K[1, 2] - top) < 1e-3 and abs(cx - K[0, 2] - left) < 1e-3
        assert (top < 0 and left < 0) if scale < 1 else (top >= 0 and left >= 0)
        expected = crop_pad(resize_bilinear(src["image"], hw), top, left, VK_SIZE, 0.0)
        assert torch.equal(out["image"], expected)
        semseg = crop_pad(resize_nearest(src["semseg"], hw), top, left, VK_SIZE, 255)
        assert torch.equal(out["semseg"], semseg)


def test_eval_transform_with_resize_to_evaluates_the_whole_resized_image():
    src = vkitti2_like_sample()
    out = EvalTransform(VK_SIZE, resize_to=VK_RESIZE)(src)
    assert torch.equal(out["image"], resize_bilinear(src["image"], VK_RESIZE))
    assert torch.equal(out["depth"], resize_nearest(src["depth"], VK_RESIZE))
    torch.testing.assert_close(out["K"], resize_intrinsics(src["K"], VK_HW, VK_RESIZE))
    kept = EvalTransform(VK_SIZE, keep_label_resolution=True, resize_to=VK_RESIZE)(src)
    assert kept["image"].shape == (3, *VK_RESIZE) and torch.equal(kept["depth"], src["depth"])
    assert EvalTransform(VK_SIZE)(src)["image"].shape == (3, *VK_SIZE)  # without resize_to: as before
    for bad in ((0, 10), (5.5, 10)):
        with pytest.raises(ValueError, match="resize_to must be"):
            TrainTransform(VK_SIZE, resize_to=bad)


def test_vkitti2_to_cityscapes_recipe_resizes_the_source_keeping_its_aspect(monkeypatch, tmp_path):
    import uda.cli
    from uda.adaptation import adaptation_config, adaptation_parser

    parser = adaptation_parser("test")
    cfg = adaptation_config(parser.parse_args([]), "vkitti2", "vkitti2_8", "cityscapes8")
    assert cfg.data.resize_to == (512, 1696) and cfg.data.size == (512, 1024)
    assert cfg.data.sky_depth == "far" and cfg.target.resize_to is None and cfg.target.size == (512, 1024)
    oracle = adaptation_config(parser.parse_args(["--oracle"]), "vkitti2", "vkitti2_8", "cityscapes8")
    assert oracle.data.dataset == "cityscapes" and oracle.data.resize_to is None
    synthia = adaptation_config(parser.parse_args([]), "synthia", "synthia16", "cityscapes16")
    assert synthia.data.resize_to is None

    # --toy: finalise sets the toy size; resize_to is scaled alike (same height, VKITTI2's aspect ratio).
    monkeypatch.setattr(uda.cli, "ensure_toy_data", lambda root, *args, **kwargs: tmp_path)
    args = parser.parse_args(["--toy"])
    toy = uda.cli.finalise(adaptation_config(args, "vkitti2", "vkitti2_8", "cityscapes8"), args, "vk2cs")
    assert toy.data.size == uda.cli.TOY_SIZE and toy.data.resize_to == (96, 318)
    assert abs(318 / 96 / (1242 / 375) - 1) < 0.01 and toy.target.resize_to is None
