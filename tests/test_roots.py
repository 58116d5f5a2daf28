"""--data-root resolution: the folder holding the dataset folders, the dataset folder itself (with a note), or a
one-line DataError naming the path and the fix."""

import sys

import pytest

from uda.data.decode import DataError
from uda.data.roots import dataset_folder, default_root


def test_root_holding_the_dataset(tmp_path, capsys):
    (tmp_path / "cityscapes").mkdir()
    assert dataset_folder(tmp_path, "cityscapes") == tmp_path / "cityscapes"
    assert dataset_folder(str(tmp_path), "cityscapes") == tmp_path / "cityscapes"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("dataset", "layout"),
    [("cityscapes", "leftImg8bit"), ("synthia", "RGB"), ("vkitti2", "Scene01"), ("nyudv2", "images")],
)
def test_root_is_the_dataset_folder_by_layout(tmp_path, capsys, dataset, layout):
    root = tmp_path / "my_copy"
    (root / layout).mkdir(parents=True)
    assert dataset_folder(root, dataset) == root
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"note: {root} is the {dataset} folder itself; using it "
        "(--data-root names the folder that holds the dataset folders)"
    ]


def test_root_is_the_dataset_folder_by_name(tmp_path, capsys):
    root = tmp_path / "synthia"
    root.mkdir()
    assert dataset_folder(root, "synthia") == root
    assert "is the synthia folder itself" in capsys.readouterr().err


@pytest.mark.parametrize("make", [False, True])
def test_no_dataset_here_is_one_line(tmp_path, make):
    root = tmp_path / "elsewhere"
    if make:
        (root / "cityscapes").mkdir(parents=True)  # another dataset's folder does not count
    with pytest.raises(DataError) as info:
        dataset_folder(root, "synthia")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{root}: no synthia folder here; --data-root names the folder holding")
    assert "datasets/synthia/README.md" in message


def test_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("UDA_DATA_ROOT", str(tmp_path))
    (tmp_path / "nyudv2").mkdir()
    assert default_root() == tmp_path
    assert dataset_folder(None, "nyudv2") == tmp_path / "nyudv2"
    monkeypatch.delenv("UDA_DATA_ROOT")
    assert default_root().name == "datasets"


def test_torch_free():
    import subprocess

    code = "import sys, uda.data.roots; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
