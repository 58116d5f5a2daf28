"""Tests for uda/data/toy: the procedural street renderer and the real on-disk formats it writes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from uda.data.toy import (
    CITYSCAPES_IDS,
    SKY_DEPTH,
    SYNTHIA_IDS,
    VKITTI2_CATEGORIES,
    cityscapes_name,
    domain_size,
    make_toy_data,
    nyudv2_size,
    render_frame,
)
from uda.data.toy.pascal import pascal_context_size
from uda.data.toy.render import camera_effects

SEED = 3
FRAMES = 6
SIZE = {"height": 64, "width": 128}
ROOT = Path(__file__).resolve().parent.parent
# The 16 classes shared by SYNTHIA and Cityscapes (cls16), as each dataset's own ids.
CS16 = {7, 8, 11, 12, 13, 17, 19, 20, 21, 23, 24, 25, 26, 28, 32, 33}
SY16 = {3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_toy_data(out, frames=FRAMES, seed=SEED, workers=2, progress=False, **SIZE)
    return out


def frame(domain: str, index: int, offset: int = 0) -> dict:
    return render_frame(domain, index, seed=SEED, offset=offset, **SIZE)


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def pixel_rays(K: np.ndarray, h: int, w: int) -> np.ndarray:
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones((h, w))], axis=-1)


def test_output_is_bit_identical_for_a_seed_whatever_the_workers(toy, tmp_path):
    make_toy_data(tmp_path, frames=FRAMES, seed=SEED, workers=1, progress=False, **SIZE)
    first, second = files(toy), files(tmp_path)
    # per frame: SYNTHIA 3 PNGs, Cityscapes 7 files (3 sequence frames), VKITTI2 3, NYUDv2 5, PASCAL-Context 6
    # (jpg, 3 PNGs, 2 .mat); then split, scene and class-table files
    assert (
        len(first) == 3 * FRAMES + 2 + 7 * FRAMES + 3 * FRAMES + 3 + 2 + 5 * FRAMES + 2 + 6 * FRAMES + 4 + 1
    )
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    info = json.loads((toy / "toy_info.json").read_text())
    assert info["seed"] == SEED and info["frames"] == FRAMES and info["target_size"] == [64, 128]
    expected = {d: list(domain_size(d, 64, 128)) for d in ("synthia", "cityscapes", "vkitti2")}
    pascal = list(pascal_context_size(64, 0))  # landscape; every third image is portrait
    assert info["sizes"] == {**expected, "nyudv2": list(nyudv2_size(64)), "pascal_context": pascal}


@pytest.mark.parametrize("domain", ["synthia", "cityscapes", "vkitti2"])
def test_another_seed_gives_another_scene(domain):
    a = frame(domain, 0)
    b = render_frame(domain, 0, seed=SEED + 1, **SIZE)
    assert np.abs(a["depth"] - b["depth"]).mean() > 0.5
    assert np.abs(a["image"].astype(int) - b["image"]).mean() > 5


def test_synthia_files_are_in_the_real_format_and_exact(toy):
    root = toy / "synthia"
    names = sorted(p.name for p in (root / "RGB").iterdir())
    assert names == [f"{i:07d}.png" for i in range(FRAMES)]
    for i in (0, FRAMES - 1):
        f = frame("synthia", i)
        h, w = f["depth"].shape
        rgb = read(root / "RGB" / names[i])
        assert rgb.dtype == np.uint8 and rgb.shape == (h, w, 3)
        assert np.array_equal(rgb[..., ::-1], f["image"])
        label = read(root / "GT" / "LABELS" / names[i])
        assert label.dtype == np.uint16 and label.shape == (h, w, 3)
        assert np.array_equal(label[..., 2], f["label"])  # the class id is the PNG's R channel
        assert set(np.unique(label[..., 2])) <= set(SYNTHIA_IDS.tolist())
        depth_png = root / "Depth" / "Depth" / names[i]
        raw = read(depth_png)
        assert raw.dtype == np.uint16
        grey = cv2.imread(str(depth_png), cv2.IMREAD_ANYDEPTH)
        assert np.array_equal(grey, raw[..., 0])
        depth = grey * 0.01
        assert np.all(np.abs(depth - f["depth"]) <= 0.01 * f["depth"])
        assert np.all(depth[f["label"] == 1] == SKY_DEPTH)  # sky (id 1) is the 16-bit maximum
    train = (root / "splits" / "train.txt").read_text().split()
    val = (root / "splits" / "val.txt").read_text().split()
    assert sorted(train + val) == [n[:-4] for n in names] and not set(train) & set(val)


def test_cityscapes_files_are_in_the_real_format_and_exact(toy):
    root = toy / "cityscapes"
    images = sorted((root / "leftImg8bit").rglob("*.png"))
    assert len(images) == FRAMES
    pattern = re.compile(r"(train|val)/(\w+)/\2_(\d{6})_000019_leftImg8bit\.png")
    for path in images:
        split, city, seq = pattern.fullmatch(str(path.relative_to(root / "leftImg8bit"))).groups()
        assert (city == "frankfurt") == (split == "val")
        assert cityscapes_name(int(seq)) == (split, city, int(seq))
    split, city, seq = cityscapes_name(4)
    stem = f"{split}/{city}/{city}_{seq:06d}_000019"
    f = frame("cityscapes", 4)
    h, w = f["depth"].shape
    assert np.array_equal(read(root / "leftImg8bit" / f"{stem}_leftImg8bit.png")[..., ::-1], f["image"])
    label = read(root / "gtFine" / f"{stem}_gtFine_labelIds.png")
    assert label.dtype == np.uint8 and label.shape == (h, w)
    assert np.array_equal(label, f["label"]) and set(np.unique(label)) <= set(CITYSCAPES_IDS.tolist())
    camera = json.loads((root / "camera" / f"{stem}_camera.json").read_text())
    assert set(camera) == {"extrinsic", "intrinsic"}
    assert set(camera["extrinsic"]) == {"baseline", "pitch", "roll", "x", "y", "yaw", "z"}
    intrinsic = camera["intrinsic"]
    assert set(intrinsic) == {"fx", "fy", "u0", "v0"}
    assert np.allclose([intrinsic[k] for k in ("fx", "fy", "u0", "v0")], f["K"][[0, 1, 0, 1], [0, 1, 2, 2]])
    disparity = read(root / "disparity" / f"{stem}_disparity.png")
    assert disparity.dtype == np.uint16 and disparity.shape == (h, w)
    valid = disparity > 0
    assert valid.mean() > 0.5 and not valid[f["label"] == 23].any()  # sky (23) has no disparity
    depth = camera["extrinsic"]["baseline"] * intrinsic["fx"] / ((disparity[valid] - 1.0) / 256)
    assert np.all(np.abs(depth - f["depth"][valid]) <= 0.01 * f["depth"][valid])
    # the sequence folder holds the labelled frame and its two neighbours
    sequence = sorted(p.name for p in (root / "leftImg8bit_sequence" / split / city).glob(f"*_{seq:06d}_*"))
    assert sequence == [f"{city}_{seq:06d}_{k:06d}_leftImg8bit.png" for k in (18, 19, 20)]
    for k, offset in ((18, -1), (19, 0), (20, 1)):
        image = read(
            root / "leftImg8bit_sequence" / split / city / f"{city}_{seq:06d}_{k:06d}_leftImg8bit.png"
        )
        assert np.array_equal(image[..., ::-1], frame("cityscapes", 4, offset)["image"])


def test_vkitti2_files_are_in_the_real_format_and_exact(toy):
    scene = toy / "vkitti2" / "Scene01" / "clone"
    lines = (scene / "colors.txt").read_text().splitlines()
    assert lines[0] == "Category r g b" and len(lines) == 15
    colours = {tuple(map(int, line.split()[1:])): i for i, line in enumerate(lines[1:])}
    assert [line.split()[0] for line in lines[1:]] == [name for name, _ in VKITTI2_CATEGORIES]
    intrinsic = [line.split() for line in (scene / "intrinsic.txt").read_text().splitlines()]
    extrinsic = [line.split() for line in (scene / "extrinsic.txt").read_text().splitlines()]
    assert intrinsic[0] == "frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]".split()
    assert extrinsic[0][:3] == ["frame", "cameraID", "r1,1"] and extrinsic[0][-4:] == ["0", "0", "0", "1"]
    assert len(intrinsic) == len(extrinsic) == 1 + 2 * FRAMES  # both cameras of every frame
    for i in (0, FRAMES - 1):
        f = frame("vkitti2", i)
        h, w = f["depth"].shape
        rgb = read(scene / "frames" / "rgb" / "Camera_0" / f"rgb_{i:05d}.jpg")
        assert rgb.shape == (h, w, 3) and np.array_equal(rgb[..., ::-1], f["image"])
        depth = read(scene / "frames" / "depth" / "Camera_0" / f"depth_{i:05d}.png")
        assert depth.dtype == np.uint16 and depth.shape == (h, w)
        assert np.all(np.abs(depth * 0.01 - f["depth"]) <= 0.01 * f["depth"])
        seg = read(scene / "frames" / "classSegmentation" / "Camera_0" / f"classgt_{i:05d}.png")
        assert seg.dtype == np.uint8 and seg.shape == (h, w, 3)
        ids = np.vectorize(lambda r, g, b: colours[(r, g, b)])(seg[..., 2], seg[..., 1], seg[..., 0])
        assert np.array_equal(ids, f["label"])
        row = [float(x) for x in intrinsic[1 + 2 * i]]
        assert row[:2] == [i, 0] and np.allclose(row[2:], f["K"][[0, 1, 0, 1], [0, 1, 2, 2]], atol=1e-5)
        world_to_cam = np.array([float(x) for x in extrinsic[1 + 2 * i][2:]]).reshape(4, 4)
        assert np.allclose(world_to_cam, np.linalg.inv(f["pose"]), atol=1e-5)
    ids = (toy / "vkitti2" / "splits" / "train.txt").read_text().split()
    ids += (toy / "vkitti2" / "splits" / "val.txt").read_text().split()
    assert sorted(ids) == [f"Scene01/{i:05d}" for i in range(FRAMES)]


@pytest.mark.parametrize("domain", ["cityscapes", "vkitti2"])
def test_neighbouring_frames_see_the_same_static_world_from_a_moved_camera(domain):
    f0, f1 = frame(domain, 2), frame(domain, 2, offset=1)
    relative = np.linalg.inv(f1["pose"]) @ f0["pose"]
    assert 0.2 < np.linalg.norm(relative[:3, 3]) < 2.0
    assert np.abs(f0["image"].astype(int) - f1["image"]).mean() > 2
    # move frame 0's points into frame 1: they land inside it, at the depth frame 1 sees there
    K = f0["K"].astype(np.float64)
    h, w = f0["depth"].shape
    points = pixel_rays(K, h, w) * f0["depth"][..., None]
    moved = points @ relative[:3, :3].T + relative[:3, 3]
    u = np.round(K[0, 0] * moved[..., 0] / moved[..., 2] + K[0, 2]).astype(int)
    v = np.round(K[1, 1] * moved[..., 1] / moved[..., 2] + K[1, 2]).astype(int)
    solid = f0["normals"].any(-1) & (
        f0["label"] != (1 if domain == "cityscapes" else -1)
    )  # not sky or bonnet
    inside = solid & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    assert inside.mean() > 0.5
    seen = f1["depth"][v[inside], u[inside]]
    error = np.abs(seen - moved[..., 2][inside]) / seen
    assert np.median(error) < 0.01 and (error < 0.05).mean() > 0.8


@pytest.mark.parametrize("domain", ["synthia", "cityscapes", "vkitti2"])
def test_normals_are_unit_face_the_camera_and_match_the_depth(domain):
    f = frame(domain, 1)
    n, depth, K = f["normals"], f["depth"], f["K"].astype(np.float64)
    h, w = depth.shape
    solid = n.any(-1)
    assert 0.3 < solid.mean() < 1 and np.all(depth[~solid] == SKY_DEPTH)
    assert np.allclose(np.linalg.norm(n[solid], axis=-1), 1, atol=1e-5)
    rays = pixel_rays(K, h, w)
    assert np.all((n * rays).sum(-1)[solid] < 1e-3)  # zero only on silhouettes
    up = f["pose"][:3, :3].T @ np.array([0.0, -1.0, 0.0])  # world up in the camera frame
    road = f["classes"] == 0
    assert road.any() and np.allclose(n[road], up, atol=1e-5)
    # normals from the depth map (cross product of neighbouring 3-D points) agree on smooth surfaces
    p = rays * depth[..., None]
    dx, dy = p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1]
    from_depth = -np.cross(dx, dy)
    from_depth /= np.linalg.norm(from_depth, axis=-1, keepdims=True)
    inner = depth[1:-1, 1:-1]
    smooth = solid[1:-1, 1:-1] & (np.abs(np.diff(depth, axis=1, n=2))[1:-1] < 0.01 * inner)
    smooth &= np.abs(np.diff(depth, axis=0, n=2))[:, 1:-1] < 0.01 * inner
    angle = np.degrees(np.arccos(np.clip((from_depth * n[1:-1, 1:-1]).sum(-1)[smooth], -1, 1)))
    assert smooth.mean() > 0.2 and np.median(angle) < 2


@pytest.mark.parametrize("domain, ids", [("cityscapes", CS16), ("synthia", SY16)])
def test_a_default_like_set_shows_at_least_12_of_the_16_shared_classes(domain, ids):
    seen = set()
    for i in range(10):
        seen |= set(np.unique(render_frame(domain, i, height=128, width=256)["label"]).tolist())
    assert len(seen & ids) >= 12, sorted(ids - seen)


def test_domains_differ_in_camera_size_and_look():
    frames = {d: render_frame(d, 0, **SIZE) for d in ("synthia", "cityscapes", "vkitti2")}
    sizes = {d: f["image"].shape[:2] for d, f in frames.items()}
    assert len(set(sizes.values())) == 3
    fov = {d: 2 * np.degrees(np.arctan(f["image"].shape[1] / 2 / f["K"][0, 0])) for d, f in frames.items()}
    assert fov["synthia"] > fov["vkitti2"] > fov["cityscapes"] + 20
    heights = {d: -f["pose"][1, 3] for d, f in frames.items()}
    assert heights["synthia"] > heights["cityscapes"] and heights["vkitti2"] > heights["cityscapes"]
    # only the target camera adds noise and vignetting: a flat grey scene stays flat in the source cameras
    flat = np.full((32, 64, 3), 0.4, np.float32)
    for d in ("synthia", "vkitti2"):
        image = camera_effects(d, flat, np.random.default_rng(0))
        assert np.all(image == image[0, 0])
    target = camera_effects("cityscapes", flat, np.random.default_rng(0)).astype(float)
    assert target.std() > 1
    assert target[:4, :4].mean() < target[14:18, 30:34].mean() - 10  # darker corners


def test_bad_arguments_fail_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="domain='gta5'"):
        render_frame("gta5", 0)
    with pytest.raises(ValueError, match="at least 32x64"):
        render_frame("synthia", 0, height=16, width=16)
    with pytest.raises(ValueError, match="frames=0"):
        make_toy_data(tmp_path, frames=0, progress=False)
    (tmp_path / "cityscapes").mkdir()
    with pytest.raises(FileExistsError, match="cityscapes"):
        make_toy_data(tmp_path, frames=1, progress=False, **SIZE)


def test_cli_writes_a_dataset_and_replaces_an_old_toy_one(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("make_toy_data", ROOT / "tools" / "make_toy_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = ["--out", str(tmp_path), "--height", "32", "--width", "64", "--workers", "1", "--quiet"]
    cli.main([*args, "--frames", "2", "--dataset", "synthia", "vkitti2"])
    assert len(list((tmp_path / "synthia" / "RGB").iterdir())) == 2
    cli.main([*args, "--frames", "1", "--dataset", "synthia"])
    assert len(list((tmp_path / "synthia" / "RGB").iterdir())) == 1 and not (tmp_path / "vkitti2").exists()
    assert json.loads((tmp_path / "toy_info.json").read_text())["domains"] == ["synthia"]
    assert "done in" in capsys.readouterr().out


def test_extend_renders_only_the_missing_parts_bit_identical_to_a_full_run(toy, tmp_path, monkeypatch):
    def make(domains, sequences=True, **size):
        make_toy_data(
            tmp_path, frames=FRAMES, seed=SEED, workers=1, progress=False, domains=domains, extend=True,
            sequences=sequences, **size,
        )  # fmt: skip

    make(["synthia"])
    synthia = files(tmp_path / "synthia")
    make(["cityscapes"], sequences=False, **SIZE)  # other size: nothing kept, the whole folder is replaced
    info = json.loads((tmp_path / "toy_info.json").read_text())
    assert info["domains"] == ["cityscapes"] and info["cityscapes_sequence"] is False
    assert not (tmp_path / "synthia").exists() and synthia
    assert not (tmp_path / "cityscapes" / "leftImg8bit_sequence").exists()  # no video frames rendered
    (tmp_path / "synthia" / "RGB").mkdir(parents=True)  # an interrupted rendering: replaced, not kept
    (tmp_path / "synthia" / "RGB" / "0000099.png").write_bytes(b"half")
    make(["synthia"], **SIZE)
    make(["cityscapes"], **SIZE)  # now with its video frames: only those are rendered
    info = json.loads((tmp_path / "toy_info.json").read_text())
    assert info["domains"] == ["synthia", "cityscapes"] and info["cityscapes_sequence"] is True
    for d in ("synthia", "cityscapes"):
        assert files(tmp_path / d) == files(toy / d), d
    # already there: nothing is rendered again (a render would fail here)
    monkeypatch.setattr("uda.data.toy.write._task", lambda args: pytest.fail(f"rendered {args}"))
    make(["cityscapes", "synthia"], **SIZE)
    make(["cityscapes"], sequences=False, **SIZE)


def test_a_recipe_renders_the_toy_parts_it_reads(tmp_path, monkeypatch):
    import uda.cli
    import uda.data.toy

    calls = []
    monkeypatch.setattr(uda.data.toy, "make_toy_data", lambda root, **kw: calls.append(kw))
    uda.cli.ensure_toy_data(tmp_path, ["synthia", "cityscapes"], sequences=False)
    assert calls[-1]["domains"] == ["cityscapes", "synthia"] and calls[-1]["sequences"] is False
    info = {"domains": ["synthia", "cityscapes"], "cityscapes_sequence": False}
    (tmp_path / "toy_info.json").write_text(json.dumps(info))
    for d in info["domains"]:
        (tmp_path / d).mkdir()
    uda.cli.ensure_toy_data(tmp_path, ["cityscapes"], sequences=False)  # present: nothing to do
    assert len(calls) == 1
    uda.cli.ensure_toy_data(tmp_path, ["cityscapes"], sequences=True)  # self-supervised depth: the frames
    assert calls[-1]["domains"] == ["cityscapes"] and calls[-1]["sequences"] is True and len(calls) == 2
