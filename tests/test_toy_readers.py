"""Readers against the toy renderer's exact ground truth: the files written by uda.data.toy decode back to it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from uda.data.labels import get_class_map
from uda.data.readers import build_dataset
from uda.data.toy import make_toy_data, render_frame, vkitti2_name

FRAMES, H, W = 6, 64, 128
LABEL_SETS = {"synthia": "synthia16", "cityscapes": "cityscapes16", "vkitti2": "vkitti2_8"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy")
    make_toy_data(out, frames=FRAMES, height=H, width=W, workers=1, progress=False)
    return out


def frame_index(domain: str, id: str) -> int:
    """The toy's labelled-frame index of a reader id."""
    if domain == "synthia":
        return int(id)
    if domain == "cityscapes":
        return int(id.split("_")[1])  # <city>/<city>_<seq>_000019, seq = index
    return next(i for i in range(FRAMES) if "{}/{:05d}".format(*vkitti2_name(i)) == id)


@pytest.mark.parametrize("domain", ["synthia", "cityscapes", "vkitti2"])
def test_depth_labels_normals_and_K_match_the_render(toy: Path, domain: str) -> None:
    ds = build_dataset(domain, "all", ("semseg", "depth", "normals"), LABEL_SETS[domain], root=toy / domain)
    assert len(ds) == FRAMES
    cmap = get_class_map(domain, LABEL_SETS[domain])
    for i, id in enumerate(ds.ids):
        truth = render_frame(domain, frame_index(domain, id), 0, H, W)
        s = ds[i]
        if domain == "synthia":  # K derived from the image size: the principal point within half a pixel
            K = s["K"].numpy()
            assert np.allclose(K[:, :2], truth["K"][:, :2], rtol=1e-5)
            assert np.all(np.abs(K[:2, 2] - truth["K"][:2, 2]) < 0.5) and K[2, 2] == 1
        else:
            assert np.allclose(s["K"].numpy(), truth["K"], rtol=1e-5)
        assert np.array_equal(s["semseg"].numpy(), cmap.apply(truth["label"]))
        depth = s["depth"][0].numpy()
        valid = depth > 0
        assert valid.mean() > 0.5, "most pixels should carry depth"
        # 1 % plus half a centimetre: the PNGs store whole centimetres (or 1/256 px of disparity).
        assert np.all(np.abs(depth[valid] - truth["depth"][valid]) <= 0.01 * truth["depth"][valid] + 0.005)
        normals = s["normals"].numpy()
        known = np.abs(normals).sum(0) > 0
        cos = (normals * truth["normals"].transpose(2, 0, 1)).sum(0)[known]
        assert known.mean() > 0.4
        assert np.median(np.degrees(np.arccos(np.clip(cos, -1, 1)))) < 2.0


def test_cityscapes_sequence_frames_are_the_rendered_neighbours(toy: Path) -> None:
    ds = build_dataset("cityscapes", "train", (), root=toy / "cityscapes", frames=(-1, 1), domain=1)
    s = ds[0]
    index = frame_index("cityscapes", ds.ids[0])
    for k in (-1, 1):
        expected = render_frame("cityscapes", index, 0, H, W, offset=k)["image"]
        got = (s["frames"][k].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, expected)
    assert s["domain"] == 1 and set(s) == {"image", "K", "frames", "domain", "meta"}


def test_toy_split_files_are_used(toy: Path) -> None:
    for domain in ("synthia", "vkitti2"):
        train = build_dataset(domain, "train", (), root=toy / domain).ids
        val = build_dataset(domain, "val", (), root=toy / domain).ids
        assert not set(train) & set(val) and len(train) + len(val) == FRAMES


def test_toy_nyudv2_layout_reads_back_with_all_four_tasks(tmp_path):
    from uda.data.toy import make_toy_data, render_frame
    from uda.data.toy.write import NYU40_OF_CLASS, NYU_SEED_OFFSET

    make_toy_data(
        tmp_path, frames=5, height=64, width=128, seed=3, domains=("nyudv2",), workers=1, progress=False
    )
    dataset = build_dataset(
        "nyudv2", "train", ("semseg", "depth", "normals", "edges"), root=tmp_path / "nyudv2"
    )
    sample = dataset[0]
    index = int(sample["meta"]["id"])
    frame = render_frame("synthia", index, 3 + NYU_SEED_OFFSET, 64, 128)
    h, w = sample["image"].shape[-2:]
    classes = cv2.resize(frame["classes"].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    expected = NYU40_OF_CLASS[classes].astype(np.int64) - 1  # NYU40 id 1..40 -> train id 0..39, 0 -> ignore
    expected[expected < 0] = 255
    assert np.array_equal(sample["semseg"].numpy(), expected)
    normals, valid = sample["normals"], sample["normals"].norm(dim=0) > 0.5
    assert valid.float().mean() > 0.5 and torch.allclose(
        normals.norm(dim=0)[valid], torch.ones(()), atol=1e-3
    )
    assert sample["edges"].sum() > 0 and (sample["depth"] > 0).float().mean() > 0.5
