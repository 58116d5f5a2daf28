"""uda-check-dataset (uda/commands/check_dataset.py): one line per problem, non-zero exit; counts per split when clean."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from fakes import make_cityscapes, make_nyudv2, make_synthia, make_vkitti2, write_png

from uda.commands import check_dataset


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, list[str]]:
    code = check_dataset.main([*args, "--quiet"])
    return code, capsys.readouterr().out.strip().splitlines()


def test_clean_datasets_print_counts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_synthia(tmp_path / "synthia", n=5)
    # --data-root is the folder holding the dataset folders
    assert run(capsys, "--dataset", "synthia", "--data-root", str(tmp_path)) == (
        0,
        [
            "synthia train: 3 samples checked (semseg, depth)",
            "synthia val: 2 samples checked (semseg, depth)",
        ],
    )
    # a dataset folder itself (here by its layout, whatever its name) is accepted with a note
    make_cityscapes(tmp_path / "cs", "val")
    code = check_dataset.main(
        [
            "--dataset",
            "cityscapes",
            "--data-root",
            str(tmp_path / "cs"),
            "--split",
            "val",
            "--frames",
            "-1",
            "1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0 and out.splitlines() == ["cityscapes val: 2 samples checked (semseg, depth)"]
    assert f"note: {tmp_path / 'cs'} is the cityscapes folder itself" in err
    make_vkitti2(tmp_path / "vk")
    assert run(capsys, "--dataset", "vkitti2", "--data-root", str(tmp_path / "vk"), "--split", "all")[0] == 0
    make_nyudv2(tmp_path / "ny")
    code, out = run(capsys, "--dataset", "nyudv2", "--data-root", str(tmp_path / "ny"))
    assert code == 0 and out[0] == "nyudv2 train: 2 samples checked (semseg, depth, normals, edges)"


def test_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = check_dataset.main(["--dataset", "synthia", "--data-root", str(tmp_path / "absent"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err.startswith(
        f"error: {tmp_path / 'absent'}: no synthia folder here; --data-root names the folder"
    )
    (tmp_path / "synthia").mkdir()  # the dataset folder is there, its layout is not
    code, out = run(capsys, "--dataset", "synthia", "--data-root", str(tmp_path), "--split", "train")
    assert code == 1
    assert out[0].startswith(f"[train] {tmp_path / 'synthia'}: synthia not found (no RGB/ folder)")
    assert out[-1] == "1 problem(s) found"
    make_cityscapes(tmp_path / "cs", disparity=False)
    code, out = run(
        capsys, "--dataset", "cityscapes", "--data-root", str(tmp_path / "cs"), "--split", "train"
    )
    assert code == 1 and out[0].startswith(
        f"[train] {tmp_path / 'cs' / 'disparity' / 'train'}: missing folder (depth)"
    )


def test_image_without_label(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_synthia(tmp_path, n=5)
    (tmp_path / "GT" / "LABELS" / "0000001.png").unlink()
    code, out = run(capsys, "--dataset", "synthia", "--data-root", str(tmp_path), "--split", "train")
    assert code == 1
    assert out[0] == (
        f"[train] {tmp_path / 'GT/LABELS/0000001.png'}: missing label file (partial dataset?); "
        "re-extract the dataset or fix the split file"
    )
    assert out[1:] == ["synthia train: 3 samples checked (semseg, depth)", "1 problem(s) found"]


def test_unknown_class_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_cityscapes(tmp_path)
    label = np.full((8, 16), 7, np.uint8)
    label[0, 0], label[1, 1] = 34, 200
    cv2.imwrite(str(tmp_path / "gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png"), label)
    code, out = run(
        capsys,
        "--dataset",
        "cityscapes",
        "--data-root",
        str(tmp_path),
        "--split",
        "train",
        "--tasks",
        "semseg",
    )
    assert code == 1
    assert out[0].startswith(
        f"[train] {tmp_path / 'gtFine/train/bochum/bochum_000000_000313_gtFine_labelIds.png'}"
    )
    assert "label ids 34, 200 are not cityscapes class ids" in out[0]


def test_wrong_bit_depth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_vkitti2(tmp_path)
    write_png(tmp_path / "Scene02/clone/frames/depth/Camera_0/depth_00000.png", np.zeros((6, 10), np.uint8))
    code, out = run(
        capsys, "--dataset", "vkitti2", "--data-root", str(tmp_path), "--split", "train", "--tasks", "depth"
    )
    assert code == 1
    assert out[0].startswith(f"[train] {tmp_path / 'Scene02/clone/frames/depth/Camera_0/depth_00000.png'}: ")
    assert "depth PNG is 8-bit, expected 16-bit" in out[0]


def test_unreadable_file_and_size_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_nyudv2(tmp_path)
    (tmp_path / "normals" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage IEND....")
    write_png(tmp_path / "edge" / "0002.png", np.zeros((5, 8), np.uint8))
    code, out = run(capsys, "--dataset", "nyudv2", "--data-root", str(tmp_path), "--split", "train")
    assert code == 1
    assert out[0].startswith(f"[train] {tmp_path / 'normals/0001.png'}: unreadable normals (corrupt file?)")
    assert out[1].startswith(
        f"[train] {tmp_path / 'edge/0002.png'}: size 8x5 differs from image 0002.png (8x6)"
    )
    assert out[-1] == "2 problem(s) found"


def test_split_files_listing_an_id_twice_or_in_train_and_val(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An id in both train and val is one problem (found reading either split), and so is an id listed twice."""
    make_synthia(tmp_path, n=5)
    splits = tmp_path / "splits"
    (splits / "val.txt").write_text("0000001\n0000003\n0000004\n")  # train: 0000000..0000002
    code, out = run(capsys, "--dataset", "synthia", "--data-root", str(tmp_path), "--tasks", "semseg")
    assert code == 1
    assert out == [
        f"[train] {splits / 'train.txt'} and {splits / 'val.txt'} both list 1 id(s), e.g. '0000001'; train and val "
        "must be disjoint: remove them from one of the two, or regenerate both with `uda-make-splits`",
        "1 problem(s) found",
    ]
    (splits / "val.txt").write_text("0000003\n0000004\n0000003\n")
    code, out = run(capsys, "--dataset", "synthia", "--data-root", str(tmp_path), "--tasks", "semseg")
    assert code == 1
    assert out == [
        f"[val] {splits / 'val.txt'}: line 3 repeats id '0000003' of line 1; list each id once (delete the line, "
        "or regenerate the file with `uda-make-splits`)",
        "synthia train: 3 samples checked (semseg)",
        "1 problem(s) found",
    ]
