"""Label sets and class maps: the catalogue files in uda/catalogue/ and the lookup-table mapping."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from uda.commands import classmap
from uda.data.labels import (
    LABEL_SETS,
    available_label_sets,
    get_class_map,
    get_id_table,
    get_label_set,
)

# The paper's 16 classes in order (Table 5 columns).
C16 = (
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "sky",
    "person",
    "rider",
    "car",
    "bus",
    "motorcycle",
    "bicycle",
)


def test_label_set_sizes_and_orders() -> None:
    sizes = {
        "cityscapes19": 19,
        "cityscapes16": 16,
        "synthia16": 16,
        "cityscapes13": 13,
        "cityscapes8": 8,
        "cityscapes8_paper": 8,
        "vkitti2_8": 8,
        "vkitti2_14": 14,
        "nyudv2_40": 40,
    }
    assert set(sizes) <= set(LABEL_SETS)
    for name, n in sizes.items():
        ls = get_label_set(name)
        assert ls.num_classes == n == ls.colors.shape[0], name
        assert ls.colors.dtype == np.uint8 and ls.ignore_index == 255
        assert len(set(ls.class_names)) == n, f"{name} has duplicate class names"
    assert get_label_set("cityscapes16").class_names == C16
    # SYNTHIA -> Cityscapes must share class ids.
    assert get_label_set("synthia16").same_classes(get_label_set("cityscapes16"))
    assert get_label_set("vkitti2_8").same_classes(get_label_set("cityscapes8"))
    c16 = get_label_set("cityscapes16").class_names
    assert set(get_label_set("cityscapes19").class_names) - set(c16) == {"terrain", "truck", "train"}
    assert set(c16) - set(get_label_set("cityscapes13").class_names) == {"wall", "fence", "pole"}
    # Subsets keep the order of the larger set.
    assert [c for c in get_label_set("cityscapes19").class_names if c in c16] == list(c16)


def test_cityscapes_maps_land_in_the_right_classes() -> None:
    table = get_id_table("cityscapes")
    ids = np.array(table.ids)
    for ls_name in ("cityscapes19", "cityscapes16", "cityscapes13"):
        cmap = get_class_map("cityscapes", ls_name)
        out = cmap.apply(ids)
        ls = cmap.label_set
        for dataset_id, train in zip(ids, out):
            name = table.name_of(int(dataset_id))
            if name in ls.class_names:
                assert train == ls.class_names.index(name), (ls_name, name)
            else:
                assert train == 255, (ls_name, name)
    assert list(get_class_map("cityscapes", "cityscapes19").apply(np.array([7, 8, 33, 0]))) == [0, 1, 18, 255]


def test_synthia16_is_the_released_map() -> None:
    released = {
        3: 0,
        4: 1,
        2: 2,
        21: 3,
        5: 4,
        7: 5,
        15: 6,
        9: 7,
        6: 8,
        1: 9,
        10: 10,
        17: 11,
        8: 12,
        19: 13,
        12: 14,
        11: 15,
    }
    cmap = get_class_map("synthia", "synthia16")
    ids = np.arange(23)
    out = cmap.apply(ids)
    for i in ids:
        assert out[i] == released.get(int(i), 255)
    # Same class names on both sides: a SYNTHIA id lands on the Cityscapes class of the same name.
    table = get_id_table("synthia")
    for i, t in released.items():
        name = table.name_of(i).replace("pedestrian", "person")
        assert get_label_set("cityscapes16").class_names[t] == name
    assert np.array_equal(get_class_map("synthia", "cityscapes16").apply(ids), out)


def test_eight_class_maps_wall_ignored_unless_paper_literal() -> None:
    cs8 = get_class_map("cityscapes", "cityscapes8")
    paper = get_class_map("cityscapes", "cityscapes8_paper")
    veg = get_label_set("cityscapes8").class_names.index("vegetation")
    vehicle = get_label_set("cityscapes8").class_names.index("vehicle")
    wall, car, bus, truck = 12, 26, 28, 27
    assert cs8.apply(np.array([wall]))[0] == 255
    assert paper.apply(np.array([wall]))[0] == veg
    assert list(cs8.apply(np.array([car, bus, truck]))) == [vehicle, vehicle, 255]
    # Apart from wall the two agree.
    ids = np.array([i for i in get_id_table("cityscapes").ids if i != wall])
    assert np.array_equal(cs8.apply(ids), paper.apply(ids))
    vk = get_class_map("vkitti2", "vkitti2_8")
    vk_ids = dict(zip(get_id_table("vkitti2").names, get_id_table("vkitti2").ids))
    got = {n: int(vk.apply(np.array([i]))[0]) for n, i in vk_ids.items()}
    assert got["Tree"] == got["Vegetation"] == veg
    assert got["Truck"] == got["Car"] == got["Van"] == vehicle
    assert got["Terrain"] == got["GuardRail"] == got["Misc"] == got["Undefined"] == 255
    assert len({v for v in got.values() if v != 255}) == 8


def test_identity_and_nyud_maps() -> None:
    assert list(get_class_map("vkitti2", "vkitti2_14").apply(np.arange(14))) == list(range(14))
    ny = get_class_map("nyudv2", "nyudv2_40").apply(np.arange(41))
    assert ny[0] == 255 and list(ny[1:]) == list(range(40))


def test_unknown_ids_raise_naming_them_and_known_unmapped_ids_ignore() -> None:
    cmap = get_class_map("synthia", "synthia16")
    with pytest.raises(ValueError, match=r"label ids 23, 300 are not synthia"):
        cmap.apply(np.array([[3, 23], [300, 1]], np.uint16))
    with pytest.raises(ValueError, match=r"label ids -1 are not synthia"):
        cmap.apply(np.array([-1, 3]))
    # Cityscapes -1 (license plate) is in its table and is ignored.
    assert get_class_map("cityscapes", "cityscapes16").apply(np.array([-1]))[0] == 255
    out = cmap.apply(np.array([[0, 13], [22, 3]], np.uint16))
    assert out.dtype == np.uint8 and out.tolist() == [[255, 255], [255, 0]]


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid names: .*cityscapes16"):
        get_label_set("cityscape16")
    with pytest.raises(ValueError, match="valid for vkitti2: vkitti2_14, vkitti2_8"):
        get_class_map("vkitti2", "cityscapes16")
    with pytest.raises(ValueError, match="valid names: synthia, cityscapes"):
        available_label_sets("kitti")
    assert "cityscapes8_paper" in available_label_sets("cityscapes")


def test_colorize_numpy_and_tensor_ignore_black() -> None:
    ls = get_label_set("cityscapes19")
    label = np.array([[0, 18], [255, 10]])
    out = ls.colorize(label)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [128, 64, 128] and out[0, 1].tolist() == [119, 11, 32]
    assert out[1, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [70, 130, 180]
    assert np.array_equal(ls.colorize(torch.from_numpy(label)), out)


def run_tool(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run uda-classmap (uda/commands/classmap.py) in-process: (exit code, stdout, stderr)."""
    code = classmap.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_classmap_tool_prints_and_converts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_tool(capsys, "--dataset", "synthia", "--label-set", "synthia16")
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert len(rows) == 23
    assert "->     3  wall" in rows["21"] and "(102, 102, 156)" in rows["21"]
    assert "->   255  ignore" in rows["22"]

    label = np.array([[7, 8, 12], [26, 27, 0]], np.uint8)
    src, dst, col = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "col.png"
    cv2.imwrite(str(src), label)
    convert = ("--dataset", "cityscapes", "--label-set", "cityscapes16", "--convert", str(src))
    assert run_tool(capsys, *convert, str(dst))[0] == 0
    assert cv2.imread(str(dst), cv2.IMREAD_UNCHANGED).tolist() == [[0, 1, 3], [12, 255, 255]]
    assert run_tool(capsys, *convert, str(col), "--color")[0] == 0
    rgb = cv2.imread(str(col))[:, :, ::-1]
    assert rgb[0, 0].tolist() == [128, 64, 128] and rgb[1, 1].tolist() == [0, 0, 0]

    cv2.imwrite(str(src), np.array([[7, 99]], np.uint8))
    code, out, err = run_tool(capsys, *convert, str(dst))
    assert (
        code == 1
        and err.startswith(f"error: {src}: label ids 99 are not cityscapes")
        and err.count("\n") == 1
    )
