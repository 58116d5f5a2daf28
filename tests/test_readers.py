"""Dataset readers on tiny datasets written in the real formats (tests/fakes.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fakes import (
    CS_CAMERA,
    cs_name,
    make_cityscapes,
    make_nyudv2,
    make_synthia,
    make_vkitti2,
    write_png,
)

from uda.commands.make_splits import known_ids
from uda.data import decode
from uda.data.decode import DataError, semantic_edges
from uda.data.labels import CATALOGUE_DIR, get_class_map
from uda.data.readers import build_dataset
from uda.data.sampling import class_pixel_counts
from uda.data.splits import read_split_file, split_ids
from uda.geometry import normals_from_depth, resize_intrinsics


def close(a: torch.Tensor, b: np.ndarray, rtol: float = 1e-6) -> bool:
    return np.allclose(a.numpy(), b, rtol=rtol, atol=1e-6)


def full_size_K_resized(fx_fy_cx_cy: tuple, full_hw: tuple[int, int], hw: tuple[int, int]) -> np.ndarray:
    """The K that the transforms give a full-size image with these intrinsics when resizing it to hw."""
    fx, fy, cx, cy = fx_fy_cx_cy
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return resize_intrinsics(K, full_hw, hw).numpy()


# ------------------------------------------------------------------------------------------------ SYNTHIA


def test_synthia_decodes_16bit_label_channel_and_depth_cm(tmp_path: Path) -> None:
    gt = make_synthia(tmp_path)
    ds = build_dataset("synthia", "train", ("semseg", "depth"), "synthia16", root=tmp_path)
    assert ds.ids == ["0000000", "0000001", "0000002"]
    s = ds[1]
    g = gt["0000001"]
    assert set(s) == {"image", "K", "semseg", "depth", "domain", "meta"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 8, 12)
    assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["semseg"].dtype == torch.int64
    assert np.array_equal(s["semseg"].numpy(), get_class_map("synthia", "synthia16").apply(g["label"]))
    assert s["depth"].shape == (1, 8, 12) and close(s["depth"][0], g["depth"])
    # The published 1280x760 intrinsics scaled to this 12x8 image, as resizing a 1280x760 image would: the
    # principal point keeps its place between pixel edges (640 * 12 / 1280 = 6.0 would be 0.5 px off).
    assert np.allclose(s["K"].numpy(), full_size_K_resized(decode.SYNTHIA_INTRINSICS, (760, 1280), (8, 12)))
    assert s["K"][0, 2].item() == pytest.approx(640.5 * 12 / 1280 - 0.5)
    assert s["meta"] == {"dataset": "synthia", "id": "0000001", "split": "train"}
    assert s["domain"] == 0


def test_synthia_loads_only_what_tasks_need(tmp_path: Path) -> None:
    make_synthia(tmp_path)
    for f in (tmp_path / "Depth" / "Depth").iterdir():
        f.unlink()
    (tmp_path / "Depth" / "Depth").rmdir()
    s = build_dataset("synthia", "val", ("semseg",), root=tmp_path, domain=1)[0]
    assert "depth" not in s and "semseg" in s and s["domain"] == 1
    assert "semseg" not in build_dataset("synthia", "val", (), root=tmp_path)[0]
    with pytest.raises(DataError, match=r"Depth/Depth: missing folder \(depth\)"):
        build_dataset("synthia", "val", ("depth",), root=tmp_path)


def test_synthia_8bit_label_and_depth_are_refused(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=3)
    write_png(tmp_path / "GT" / "LABELS" / "0000000.png", np.zeros((8, 12, 3), np.uint8))
    write_png(tmp_path / "Depth" / "Depth" / "0000000.png", np.zeros((8, 12, 3), np.uint8))
    with pytest.raises(DataError, match="0000000.png: label PNG is 8-bit colour"):
        build_dataset("synthia", "train", ("semseg",), root=tmp_path)[0]
    with pytest.raises(DataError, match="0000000.png: depth PNG is 8-bit, expected 16-bit"):
        build_dataset("synthia", "train", ("depth",), root=tmp_path)[0]


def test_normals_and_edges_derived_from_depth_and_labels(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=3, h=10, w=14)
    # A fronto-parallel wall at 12.34 m: normals point at the camera, (0, 0, -1), inside the border.
    write_png(tmp_path / "Depth" / "Depth" / "0000000.png", np.full((10, 14, 3), 1234, np.uint16))
    label = np.full((10, 14), 3, np.uint16)  # road
    label[:, 9:] = 1  # sky
    label[0, 0] = 13  # parking-slot: ignored in synthia16, still a boundary
    write_png(tmp_path / "GT" / "LABELS" / "0000000.png", np.stack([label * 0, label * 0, label], -1))
    s = build_dataset("synthia", "train", ("normals", "edges"), root=tmp_path)[0]
    assert set(s) == {"image", "K", "normals", "edges", "domain", "meta"}
    n = s["normals"]
    assert n.shape == (3, 10, 14) and n.dtype == torch.float32
    assert torch.allclose(n[:, 1:-1, 1:-1], torch.tensor([0.0, 0.0, -1.0])[:, None, None], atol=1e-5)
    assert (n[:, 0] == 0).all() and (n[:, :, -1] == 0).all()  # border unknown
    expected = np.zeros((10, 14), np.float32)
    expected[:, 8:10] = 1.0
    expected[0, 1] = expected[1, 0] = expected[0, 0] = 1.0
    assert np.array_equal(s["edges"][0].numpy(), expected)


def test_normals_match_geometry_on_real_depth(tmp_path: Path) -> None:
    gt = make_synthia(tmp_path, n=3)
    s = build_dataset("synthia", "train", ("normals",), root=tmp_path)[0]
    depth = torch.from_numpy(gt["0000000"]["depth"]).float()[None, None]
    n, valid = normals_from_depth(depth, s["K"][None])
    assert torch.allclose(s["normals"], (n * valid)[0], atol=1e-5)


def test_semantic_edges_mark_both_sides() -> None:
    label = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    assert semantic_edges(label).tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert semantic_edges(np.zeros((3, 3), int)).sum() == 0


# ------------------------------------------------------------------------------------------------ Cityscapes


def test_cityscapes_disparity_and_camera_to_metres(tmp_path: Path) -> None:
    gt = make_cityscapes(tmp_path, frames=())
    ds = build_dataset("cityscapes", "train", ("semseg", "depth"), "cityscapes19", root=tmp_path)
    assert ds.ids == ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    for i, id in enumerate(ds.ids):
        s = ds[i]
        assert close(s["depth"][0], gt[id]["depth"], rtol=1e-5)
        assert np.array_equal(
            s["semseg"].numpy(), get_class_map("cityscapes", "cityscapes19").apply(gt[id]["label"])
        )
    d = ds[0]["depth"][0]
    # png 0 (no measurement) and 1 (zero disparity) give 0; png 2 is disparity 1/256 px.
    assert d[0, 0] == 0 and d[0, 1] == 0
    assert d[0, 2].item() == pytest.approx(CS_CAMERA["baseline"] * CS_CAMERA["fx"] * 256, rel=1e-6)
    # The json intrinsics are for 2048x1024; this image is 16x8, a downscaled copy: K is the one resizing the
    # full-size image gives (pixel-centre convention).
    camera = tuple(CS_CAMERA[k] for k in ("fx", "fy", "u0", "v0"))
    assert np.allclose(ds[0]["K"].numpy(), full_size_K_resized(camera, (1024, 2048), (8, 16)), atol=1e-5)


def test_cityscapes_json_at_image_resolution_is_not_rescaled(tmp_path: Path) -> None:
    camera = {"baseline": 0.5, "fx": 20.0, "fy": 21.0, "u0": 8.5, "v0": 4.25}
    gt = make_cityscapes(tmp_path, camera=camera, frames=())
    s = build_dataset("cityscapes", "train", ("depth",), root=tmp_path)[0]
    assert np.allclose(s["K"].numpy(), [[20.0, 0, 8.5], [0, 21.0, 4.25], [0, 0, 1]])
    assert close(s["depth"][0], gt["aachen/aachen_000000_000019"]["depth"], rtol=1e-5)


def test_cityscapes_without_disparity_still_serves_semseg(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, disparity=False, frames=())
    s = build_dataset("cityscapes", "train", ("semseg",), root=tmp_path)[0]
    assert s["semseg"].shape == (8, 16) and "depth" not in s
    with pytest.raises(
        DataError, match=r"disparity/train: missing folder \(depth\).*datasets/cityscapes/README.md"
    ):
        build_dataset("cityscapes", "train", ("depth",), root=tmp_path)


def test_cityscapes_sequence_frames(tmp_path: Path) -> None:
    gt = make_cityscapes(tmp_path, frames=(-2, 1))
    ds = build_dataset("cityscapes", "train", (), root=tmp_path, frames=(-2, 1), domain=1)
    s = ds[1]
    g = gt["bochum/bochum_000000_000313"]
    assert set(s["frames"]) == {-2, 1}
    for k in (-2, 1):
        assert np.array_equal((s["frames"][k] * 255).round().byte().permute(1, 2, 0).numpy(), g["frames"][k])
    assert np.array_equal((s["image"] * 255).round().byte().permute(1, 2, 0).numpy(), g["frames"][0])
    missing = (
        tmp_path
        / "leftImg8bit_sequence/train/bochum"
        / f"{cs_name('bochum_000000_000313', 1)}_leftImg8bit.png"
    )
    missing.unlink()
    with pytest.raises(DataError, match="bochum_000000_000314_leftImg8bit.png: missing image file"):
        ds[1]
    with pytest.raises(ValueError, match="synthia has no video frames"):
        build_dataset("synthia", "train", (), frames=(-1, 1))


def test_cityscapes_splits_from_folders_and_all(tmp_path: Path) -> None:
    make_cityscapes(
        tmp_path, "train", ids=("zurich/zurich_000001_000019", "aachen/aachen_000002_000019"), frames=()
    )
    make_cityscapes(tmp_path, "val", ids=("lindau/lindau_000000_000019",), frames=())
    tr = build_dataset("cityscapes", "train", ("semseg",), root=tmp_path)
    assert tr.ids == ["aachen/aachen_000002_000019", "zurich/zurich_000001_000019"]
    al = build_dataset("cityscapes", "all", ("semseg", "depth"), root=tmp_path)
    assert al.ids == [
        "aachen/aachen_000002_000019",
        "lindau/lindau_000000_000019",
        "zurich/zurich_000001_000019",
    ]
    assert al[1]["depth"].shape == (1, 8, 16)  # the val item resolves its files under val/
    with pytest.raises(DataError, match="valid splits: train, val, all"):
        build_dataset("cityscapes", "test", (), root=tmp_path)
    (tmp_path / "leftImg8bit" / "test").mkdir()
    with pytest.raises(DataError, match="split 'test' of cityscapes is empty"):
        build_dataset("cityscapes", "test", (), root=tmp_path)


def test_cityscapes_frame_with_png_and_jpg_copies_is_one_id(tmp_path: Path) -> None:
    """A .jpg copy next to the .png is the same frame: one id (read from the .png); a .jpg alone is a frame too."""
    gt = make_cityscapes(tmp_path, frames=())
    folder = tmp_path / "leftImg8bit/train"
    png = folder / "aachen/aachen_000000_000019_leftImg8bit.png"
    cv2.imwrite(str(png.with_suffix(".jpg")), np.zeros((8, 16, 3), np.uint8))
    bochum = folder / "bochum/bochum_000000_000313_leftImg8bit.png"
    cv2.imwrite(str(bochum.with_suffix(".jpg")), cv2.imread(str(bochum)))
    bochum.unlink()
    ds = build_dataset("cityscapes", "train", ("semseg",), root=tmp_path)
    assert ds.ids == ["aachen/aachen_000000_000019", "bochum/bochum_000000_000313"]
    expected = gt["aachen/aachen_000000_000019"]["frames"][0]
    assert np.array_equal((ds[0]["image"] * 255).round().byte().permute(1, 2, 0).numpy(), expected)


# ------------------------------------------------------------------------------------------------ VKITTI2


def test_vkitti2_colour_labels_depth_and_intrinsics(tmp_path: Path) -> None:
    gt = make_vkitti2(tmp_path)
    ds = build_dataset("vkitti2", "all", ("semseg", "depth"), "vkitti2_14", root=tmp_path)
    assert ds.ids == ["Scene01/00000", "Scene01/00001", "Scene01/00002", "Scene02/00000", "Scene02/00001"]
    for i, id in enumerate(ds.ids):
        s = ds[i]
        assert np.array_equal(
            s["semseg"].numpy(), get_class_map("vkitti2", "vkitti2_14").apply(gt[id]["label"])
        )
        assert close(s["depth"][0], gt[id]["depth"])
        assert np.allclose(s["K"].numpy(), gt[id]["K"])
    assert ds[0]["depth"][0, 0, 0] == 0  # 65535 = sky/far -> no measurement


def test_vkitti2_intrinsics_follow_a_downscaled_copy(tmp_path: Path) -> None:
    # Frames downscaled from 1242x375 to 20x6 next to the real intrinsic.txt (which holds 1242x375 values):
    # K must describe the 20x6 image, not the full-size one (cx 620.5 would lie 600 px outside it).
    make_vkitti2(tmp_path, scenes={"Scene01": 2}, h=6, w=20)
    real = (725.0087, 725.0087, 620.5, 187.0)
    lines = ["frame cameraID K[0,0] K[1,1] K[0,2] K[1,2]"]
    lines += [f"{f} {cam} {' '.join(str(v) for v in real)}" for f in (0, 1) for cam in (0, 1)]
    (tmp_path / "Scene01" / "clone" / "intrinsic.txt").write_text("\n".join(lines) + "\n")
    for task in ("depth", "semseg"):  # with intrinsic.txt read exactly, and with the published fallback
        s = build_dataset("vkitti2", "all", (task,), root=tmp_path)[1]
        assert np.allclose(s["K"].numpy(), full_size_K_resized(real, (375, 1242), (6, 20)), atol=1e-5)


def test_vkitti2_unknown_colour_names_the_file(tmp_path: Path) -> None:
    make_vkitti2(tmp_path)
    path = tmp_path / "Scene01/clone/frames/classSegmentation/Camera_0/classgt_00001.png"
    bad = cv2.imread(str(path))
    bad[2, 3] = (1, 2, 3)
    cv2.imwrite(str(path), bad)
    ds = build_dataset("vkitti2", "train", ("semseg",), root=tmp_path)
    with pytest.raises(
        DataError, match=r"classgt_00001.png: colour \(3, 2, 1\) at 1 pixels is not in colors.txt"
    ):
        ds[1]


def test_vkitti2_frames_drop_scene_ends(tmp_path: Path) -> None:
    make_vkitti2(tmp_path, scenes={"Scene01": 4})
    with pytest.warns(UserWarning, match="2 of 4 ids lack the frames"):
        ds = build_dataset("vkitti2", "all", ("depth",), root=tmp_path, frames=(-1, 1))
    assert ds.ids == ["Scene01/00001", "Scene01/00002"]
    assert set(ds[0]["frames"]) == {-1, 1}


# ------------------------------------------------------------------------------------------------ NYUDv2


def test_nyudv2_decoding(tmp_path: Path) -> None:
    gt = make_nyudv2(tmp_path)
    ds = build_dataset("nyudv2", "train", ("semseg", "depth", "normals", "edges"), root=tmp_path)
    assert ds.ids == ["0001", "0002"]
    s = ds[0]
    g = gt["0001"]
    expected = np.where(g["label"] == 0, 255, g["label"] - 1)
    assert np.array_equal(s["semseg"].numpy(), expected)
    assert s["depth"][0, 0, 0] == 0 and close(s["depth"][0, 1:], g["depth"][1:])
    n = s["normals"].numpy()
    assert np.all(n[:, 0, 0] == 0)
    assert np.allclose(np.linalg.norm(n, axis=0).ravel()[1:], 1.0, atol=1e-5)
    cos = (n * g["normals"]).sum(0).ravel()[1:]
    assert cos.min() > np.cos(np.deg2rad(1.0))  # 8-bit quantisation only
    assert np.array_equal(s["edges"][0].numpy() > 0, g["edges"])
    assert np.allclose(s["K"].numpy()[0], [518.86 * 8 / 640, 0, 325.58 * 8 / 640 + 0.5 * 8 / 640 - 0.5])
    assert build_dataset("nyudv2", "val", (), root=tmp_path).ids == ["0003"]


# ------------------------------------------------------------------------------------------------ splits and errors


def test_shipped_splits_disjoint_sorted_stable() -> None:
    for dataset, n in (("synthia", 9400), ("vkitti2", 2126)):
        folder = CATALOGUE_DIR / dataset / "splits"
        train, val = read_split_file(folder / "train.txt"), read_split_file(folder / "val.txt")
        assert train == sorted(train) and val == sorted(val)
        assert not set(train) & set(val)
        assert len(train) + len(val) == n and len(val) == round(0.2 * n)
        # Regenerating gives the same files: the split is a function of the ids and the seed only.
        assert split_ids(known_ids(dataset)) == {"train": train, "val": val}
    assert "0009399" in read_split_file(CATALOGUE_DIR / "synthia/splits/train.txt") + read_split_file(
        CATALOGUE_DIR / "synthia/splits/val.txt"
    )


def test_split_id_missing_on_disk_is_an_error(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=4)
    (tmp_path / "RGB" / "0000001.png").unlink()
    with pytest.raises(DataError, match=r"0000001.png: missing image for 1 of 2 ids of split 'train'"):
        build_dataset("synthia", "train", (), root=tmp_path)
    (tmp_path / "splits" / "val.txt").write_text("\n")
    with pytest.raises(ValueError, match="split file is empty"):
        build_dataset("synthia", "val", (), root=tmp_path)


def test_split_file_listing_an_id_twice_is_an_error(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=5)
    train = tmp_path / "splits" / "train.txt"
    train.write_text("# SYNTHIA\n0000000\n0000001\n\n0000000\n")
    with pytest.raises(
        DataError,
        match=rf"^{train}: line 5 repeats id '0000000' of line 2; list each id once \(.*`uda-make-splits`\)$",
    ):
        build_dataset("synthia", "train", (), root=tmp_path)
    train.write_text("0000000\n0000001\n0000002\n")
    assert read_split_file(train) == ["0000000", "0000001", "0000002"]


def test_train_and_val_sharing_an_id_are_refused(tmp_path: Path) -> None:
    """An id in both split files of a root would be evaluated on after training on it; reading either split (or
    both, as "all") names both files and a shared id."""
    make_synthia(tmp_path, n=5)
    folder = tmp_path / "splits"
    (folder / "val.txt").write_text("0000002\n0000003\n0000004\n")  # train: 0000000..0000002
    message = (
        rf"^{folder / 'train.txt'} and {folder / 'val.txt'} both list 1 id\(s\), e.g. '0000002'; train and val "
        r"must be disjoint: .*`uda-make-splits`$"
    )
    for split in ("train", "val", "all"):
        with pytest.raises(DataError, match=message):
            build_dataset("synthia", split, (), root=tmp_path)
    (folder / "val.txt").write_text("0000003\n0000004\n")
    assert build_dataset("synthia", "all", (), root=tmp_path).ids == [f"{k:07d}" for k in range(5)]


def test_malformed_ids_name_the_split_file(tmp_path: Path) -> None:
    """Ids the readers parse (VKITTI2 frame numbers, Cityscapes frame numbers for neighbouring frames) must have
    their form; otherwise a DataError names the split file, not a ValueError of int()."""
    make_vkitti2(tmp_path / "vk")
    train = tmp_path / "vk" / "splits" / "train.txt"
    for bad in ("Scene01/0000a", "Scene01_00000"):
        train.write_text(f"Scene01/00000\n{bad}\n")
        with pytest.raises(
            DataError,
            match=rf"^{train}: '{bad}' is not a vkitti2 id; ids have the form <scene>/<frame number>, e.g. Scene01",
        ):
            build_dataset("vkitti2", "train", (), root=tmp_path / "vk")
    make_cityscapes(tmp_path / "cs", ids=("aachen/aachen_000000_00001x",), frames=())
    with pytest.raises(
        DataError,
        match=rf"^{tmp_path / 'cs/leftImg8bit/train'}: 'aachen/aachen_000000_00001x' is not a cityscapes id; "
        r"ids have the form <city>/<city>_<sequence>_<frame>",
    ):
        build_dataset("cityscapes", "train", (), root=tmp_path / "cs", frames=(-1, 1))


def test_missing_dataset_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"synthia not found \(no RGB/ folder\).*--data-root.*README.md"):
        build_dataset("synthia", "train", (), root=tmp_path / "nowhere")
    make_synthia(tmp_path, n=3)
    with pytest.raises(ValueError, match="unknown tasks"):
        build_dataset("synthia", "train", ("segmentation",), root=tmp_path)
    with pytest.raises(ValueError, match="valid names: synthia, cityscapes, vkitti2, nyudv2"):
        build_dataset("kitti", "train", ())


def test_size_mismatch_and_truncated_file(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=3)
    write_png(tmp_path / "Depth" / "Depth" / "0000000.png", np.zeros((4, 12, 3), np.uint16))
    with pytest.raises(DataError, match=r"0000000.png: size 12x4 differs from image 0000000.png \(12x8\)"):
        build_dataset("synthia", "train", ("depth",), root=tmp_path)[0]
    path = tmp_path / "RGB" / "0000000.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="RGB/0000000.png: truncated PNG"):
        build_dataset("synthia", "train", (), root=tmp_path)[0]


def test_transform_is_applied(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=3)

    def tag(sample: dict) -> dict:
        sample["image"] = sample["image"] * 0
        return sample

    assert build_dataset("synthia", "train", (), root=tmp_path, transform=tag)[0]["image"].abs().sum() == 0


def test_unknown_label_ids_name_the_file(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, frames=())
    path = tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    cv2.imwrite(str(path), np.full((8, 16), 40, np.uint8))
    with pytest.raises(
        DataError, match=r"aachen_000000_000019_gtFine_labelIds.png: label ids 40 are not cityscapes"
    ):
        build_dataset("cityscapes", "train", ("semseg",), root=tmp_path)[0]


def test_rare_class_counts_name_the_label_file_of_an_unknown_id(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, frames=())
    ds = build_dataset("cityscapes", "train", ("semseg",), "cityscapes19", root=tmp_path)
    counts = class_pixel_counts(ds, 19)
    assert counts.shape == (2, 19) and counts.sum() == sum((ds[i]["semseg"] != 255).sum() for i in range(2))
    path = tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"
    cv2.imwrite(str(path), np.full((8, 16), 40, np.uint8))
    with pytest.raises(DataError, match=rf"^{path}: label ids 40 are not cityscapes class ids"):
        class_pixel_counts(ds, 19)


def test_palette_label_png_gives_its_indices(tmp_path: Path) -> None:
    """VOC-style label PNGs are palette-indexed (colour type 3): the indices are the class ids, at any bit depth;
    a colour PNG is still refused."""
    from PIL import Image

    ids = np.array([[0, 15, 15], [20, 255, 1]], np.uint8)
    image = Image.fromarray(ids, mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[[1, 15, 20, 255]] = [(128, 0, 0), (192, 128, 128), (0, 64, 128), (224, 224, 192)]
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "voc.png")
    assert (tmp_path / "voc.png").read_bytes()[25] == 3  # colour type 3: palette
    assert np.array_equal(decode.pascal_semseg(tmp_path / "voc.png"), ids)
    small = Image.fromarray(np.array([[0, 3], [15, 7]], np.uint8), mode="P")
    small.putpalette(palette[:16].ravel().tolist())  # 16 colours: Pillow writes 4 bits a pixel
    small.save(tmp_path / "4bit.png")
    assert (tmp_path / "4bit.png").read_bytes()[24] == 4  # bit depth 4
    assert np.array_equal(decode.read_label8(tmp_path / "4bit.png"), np.array(small))
    write_png(tmp_path / "colour.png", palette[ids][:, :, ::-1])
    with pytest.raises(DataError, match="segmentation PNG must be single-channel 8-bit ids"):
        decode.pascal_semseg(tmp_path / "colour.png")


def test_camera_json_is_read_exactly(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, frames=())
    path = tmp_path / "camera/train/aachen/aachen_000000_000019_camera.json"
    data = json.loads(path.read_text())
    data["extrinsic"]["baseline"] = 2 * CS_CAMERA["baseline"]
    path.write_text(json.dumps(data))
    ds = build_dataset("cityscapes", "train", ("depth",), root=tmp_path)
    png = cv2.imread(
        str(tmp_path / "disparity/train/aachen/aachen_000000_000019_disparity.png"), cv2.IMREAD_UNCHANGED
    )
    valid = png > 1
    expected = 2 * CS_CAMERA["baseline"] * CS_CAMERA["fx"] * 256.0 / (png[valid].astype(np.float64) - 1)
    assert np.allclose(ds[0]["depth"][0].numpy()[valid], expected, rtol=1e-5)
    del data["intrinsic"]["fx"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="aachen_000000_000019_camera.json: malformed camera json"):
        ds[0]


# ------------------------------------------------------------------------------------------------ VKITTI2 sky


def test_vkitti2_sky_depth_far_or_none_on_toy_depth_png(tmp_path: Path) -> None:
    from uda.data import decode
    from uda.data.toy import make_toy_data

    # The toy renderer writes sky as the PNG maximum 65535 cm, as real VKITTI2 does.
    make_toy_data(tmp_path, frames=2, height=64, width=128, domains=("vkitti2",), workers=1, progress=False)
    root = tmp_path / "vkitti2"
    png_path = next(root.rglob("depth_00000.png"))
    png = cv2.imread(str(png_path), cv2.IMREAD_UNCHANGED)
    sky = png == 65535
    assert 0 < sky.mean() < 0.5

    far = decode.vkitti2_depth(png_path, "far")
    none = decode.vkitti2_depth(png_path, "none")
    assert np.all(far[sky] == np.float32(655.35)) and np.all(none[sky] == 0)
    assert np.array_equal(far[~sky], none[~sky]) and np.all(far[~sky] > 0)
    assert np.array_equal(decode.vkitti2_sky(far), sky)
    assert np.array_equal(decode.vkitti2_depth(png_path), none)  # the reader API's default: today's decoding
    with pytest.raises(ValueError, match="sky='sea'"):
        decode.vkitti2_depth(png_path, "sea")

    tasks = ("depth", "normals")
    samples = {
        mode: build_dataset("vkitti2", "all", tasks, root=root, sky_depth=mode)[0] for mode in ("far", "none")
    }
    assert samples["far"]["meta"]["id"] == "Scene01/00000"
    assert np.array_equal(samples["far"]["depth"][0].numpy(), far)
    assert np.array_equal(samples["none"]["depth"][0].numpy(), none)
    # Far sky is no surface: normals are finite, 0 on sky and its neighbours, and identical for both options.
    n_far, n_none = samples["far"]["normals"], samples["none"]["normals"]
    assert torch.isfinite(n_far).all() and torch.equal(n_far, n_none)
    assert (n_far[:, torch.from_numpy(sky)] == 0).all() and (n_far.norm(dim=0) > 0.5).float().mean() > 0.4

    with pytest.raises(ValueError, match="sky_depth='sea' for vkitti2"):
        build_dataset("vkitti2", "all", tasks, root=root, sky_depth="sea")


def test_sky_depth_and_resize_to_reach_the_reader_and_transforms(tmp_path: Path) -> None:
    from dataclasses import replace

    from uda.config import ConfigError, DataConfig, ExperimentConfig, apply_overrides
    from uda.data.streams import RunData

    make_vkitti2(tmp_path)
    assert DataConfig().sky_depth == "far" and DataConfig().resize_to is None  # the authors' sky
    data = DataConfig(
        dataset="vkitti2", root=str(tmp_path), label_set="vkitti2_14", size=(4, 6), resize_to=(6, 10)
    )
    run = RunData(ExperimentConfig(data=data), needs=[[], []])
    train = run.dataset(data, "train", ("depth",), train=True, domain=0)
    val = run.dataset(data, "val", ("depth",), train=False, domain=0)
    assert train.sky_depth == "far" and train.transform.resize_to == (6, 10)
    assert val.transform.size == (6, 10)  # evaluated whole, at resize_to
    assert val[0]["depth"][0, 0, 0] == np.float32(655.35)  # the fake's sky pixel, resized 6x10 -> 6x10
    none = run.dataset(replace(data, sky_depth="none"), "val", ("depth",), train=False, domain=0)
    assert none[0]["depth"][0, 0, 0] == 0

    cfg = apply_overrides(ExperimentConfig(data=data), ["data.sky_depth=none", "data.resize_to=8,12"])
    assert cfg.data.sky_depth == "none" and cfg.data.resize_to == (8, 12)
    assert apply_overrides(cfg, ["data.resize_to=none"]).data.resize_to is None
    with pytest.raises(ConfigError, match="sky_depth='none' is an option of vkitti2 only"):
        DataConfig(dataset="synthia", sky_depth="none")
    with pytest.raises(ConfigError, match="not one of far, none"):
        apply_overrides(cfg, ["data.sky_depth=zero"])
