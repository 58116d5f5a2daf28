"""PASCAL-Context multi-task reader, the parts and saliency tasks, the pad-and-resize protocol, the NYUDv2
protocols, and a two-step run of recipes/pascal_context.py and recipes/nyudv2.py on the toy stand-ins."""

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from tests.conftest import TINY_OVERRIDES
from uda.data import decode
from uda.data.decode import DataError
from uda.data.readers import build_dataset
from uda.data.toy.pascal import CONTEXT_IDS, NYU_NAMES
from uda.data.transforms import EvalTransform, TrainTransform
from uda.losses.tasks import edges_loss, saliency_loss
from uda.tasks import TASK_DEFS, OutputSpace, num_parts, task_channels

REPO = Path(__file__).resolve().parent.parent
TASKS = ("semseg", "parts", "saliency", "normals", "edges")


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    """Six toy PASCAL-Context images of at most 48 px a side (people a few dozen pixels tall)."""
    from uda.data.toy import make_toy_data

    root = tmp_path_factory.mktemp("pascal")
    make_toy_data(
        root, frames=6, height=128, width=256, domains=("pascal_context",), workers=1, progress=False
    )
    return root / "pascal_context"


def load_all(root: Path, split: str = "train") -> list[dict]:
    ds = build_dataset("pascal_context", split, TASKS, root=root)
    return [ds[i] for i in range(len(ds))]


def test_every_task_decodes_with_its_dtype_ignore_value_and_size(pascal_root):
    samples = load_all(pascal_root)
    assert {tuple(s["image"].shape[1:]) for s in samples} == {(36, 48), (48, 36)}  # landscape and portrait
    for s in samples:
        h, w = s["image"].shape[1:]
        assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (h, w)
        assert s["parts"].dtype == torch.int64 and s["parts"].shape == (h, w)
        assert s["saliency"].dtype == torch.float32 and s["saliency"].shape == (1, h, w)
        assert s["normals"].dtype == torch.float32 and s["normals"].shape == (3, h, w)
        assert s["edges"].dtype == torch.float32 and s["edges"].shape == (1, h, w)
        assert set(s["semseg"].unique().tolist()) <= set(range(21)) | {255}
        assert set(s["parts"].unique().tolist()) <= set(range(7)) | {255}
        assert set(s["saliency"].unique().tolist()) <= {0.0, 1.0}
        assert set(s["edges"].unique().tolist()) <= {0.0, 1.0}
        norm = s["normals"].norm(dim=0)
        assert torch.all((norm < 1e-6) | ((norm - 1).abs() < 1e-4))
    # The toy scenes have people: some image has every one of the six parts.
    assert any(set(s["parts"].unique().tolist()) >= set(range(1, 7)) for s in samples)


def test_parts_saliency_and_normals_agree_with_the_classes(pascal_root):
    ds = build_dataset("pascal_context", "train", TASKS, root=pascal_root)
    for i, id in enumerate(ds.ids):
        s = ds[i]
        person = s["semseg"] == 15
        # Parts lie on people only.
        assert torch.all(s["parts"][~person] == 0) and torch.all(s["parts"][person] > 0)
        # The toy's saliency is people and vehicles (trucks too, which VOC's 21 classes lack).
        label_map = decode.pascal_label_map(pascal_root / "pascal-context" / "trainval" / f"{id}.mat")
        things = [CONTEXT_IDS[n] for n in ("person", "car", "truck", "bus", "motorbike", "bicycle")]
        assert torch.equal(s["saliency"][0].bool(), torch.from_numpy(np.isin(label_map, things)))
        # Normals only on the context classes the NYUDv2 table knows ("unknown" excepted).
        known = np.isin(label_map, [CONTEXT_IDS[n] for n in NYU_NAMES if n != "unknown"])
        has_normal = (s["normals"].norm(dim=0) > 0.5).numpy()
        assert not has_normal[~known].any() and has_normal[known].mean() > 0.99


def test_edges_are_the_thinned_label_map_boundaries(pascal_root):
    ds = build_dataset("pascal_context", "train", ("edges",), root=pascal_root)
    edges = ds[0]["edges"][0].numpy().astype(bool)
    label_map = decode.pascal_label_map(pascal_root / "pascal-context" / "trainval" / f"{ds.ids[0]}.mat")
    boundary = np.zeros_like(edges)
    boundary[:, 1:] |= label_map[:, 1:] != label_map[:, :-1]
    boundary[:, :-1] |= label_map[:, 1:] != label_map[:, :-1]
    boundary[1:] |= label_map[1:] != label_map[:-1]
    boundary[:-1] |= label_map[1:] != label_map[:-1]
    assert edges.any() and not (edges & ~boundary).any()  # only where a 4-neighbour differs
    blocks = edges[1:, 1:] & edges[:-1, 1:] & edges[1:, :-1] & edges[:-1, :-1]
    assert not blocks.any()  # one pixel wide


def _write_anno(path: Path, objects: list[tuple[int, list[tuple[str, np.ndarray]]]], shape=(6, 8)) -> None:
    """A PASCAL-Part 'anno' .mat with the given (class_ind, [(part name, mask)]) objects."""
    rows = []
    for cls, parts in objects:
        arr = np.empty((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
        for j, p in enumerate(parts):
            arr[0, j] = p
        rows.append(("x", cls, np.ones(shape, np.uint8), arr))
    objs = np.empty((1, len(rows)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for j, r in enumerate(rows):
        objs[0, j] = r
    savemat(str(path), {"anno": {"imname": "x", "objects": objs}})


def test_human_parts_grouping_and_images_without_people(tmp_path):
    groups = {"head": 1, "luarm": 3, "rlleg": 6}
    m1, m2 = np.zeros((6, 8), np.uint8), np.zeros((6, 8), np.uint8)
    m1[0, :2], m2[5, 7] = 1, 1
    _write_anno(tmp_path / "a.mat", [(7, []), (15, [("luarm", m1), ("rlleg", m2)])])
    parts = decode.pascal_human_parts(tmp_path / "a.mat", groups)
    assert (
        parts.dtype == np.uint8 and parts[0, :2].tolist() == [3, 3] and parts[5, 7] == 6 and parts.sum() == 12
    )
    _write_anno(tmp_path / "b.mat", [(7, [])])  # a car, no person: the reader ignores the whole map
    assert decode.pascal_human_parts(tmp_path / "b.mat", groups) is None
    _write_anno(tmp_path / "c.mat", [(15, [("tail", m1)])])
    with pytest.raises(DataError, match=r"c\.mat: unknown part name 'tail'"):
        decode.pascal_human_parts(tmp_path / "c.mat", groups)


def test_an_image_without_people_has_parts_ignored(pascal_root, tmp_path):
    root = tmp_path / "pascal_context"
    shutil.copytree(pascal_root, root)
    ds = build_dataset("pascal_context", "train", ("parts",), root=root)
    h, w = ds[0]["image"].shape[1:]
    _write_anno(root / "human_parts" / f"{ds.ids[0]}.mat", [(7, [])], shape=(h, w))
    parts = ds[0]["parts"]
    assert parts.shape == (h, w) and torch.all(parts == 255)


@pytest.mark.parametrize(
    "rel, damage, message",
    [
        ("human_parts/{id}.mat", "truncate", "unreadable .mat human parts"),
        ("pascal-context/trainval/{id}.mat", "garbage", "unreadable .mat context label"),
        ("sal_distill/{id}.png", "truncate", "truncated PNG"),
        ("normals_distill/{id}.png", "delete", "missing normals file"),
        ("semseg/pascal-context/{id}.png", "truncate", "truncated PNG"),
    ],
)
def test_a_damaged_file_gives_one_line_naming_it(pascal_root, tmp_path, rel, damage, message):
    root = tmp_path / "pascal_context"
    shutil.copytree(pascal_root, root)
    ds = build_dataset("pascal_context", "train", TASKS, root=root)
    path = root / rel.format(id=ds.ids[1])
    if damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_text("not a mat file")
    else:
        path.unlink()
    ds[0]  # the others still load
    with pytest.raises(DataError) as err:
        ds[1]
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text


def test_missing_class_tables_and_unsupported_tasks_are_one_line_errors(pascal_root, tmp_path):
    root = tmp_path / "pascal_context"
    shutil.copytree(pascal_root, root)
    (root / "json" / "nyu_classes.json").unlink()
    ds = build_dataset("pascal_context", "train", ("normals",), root=root)
    with pytest.raises(DataError, match=r"nyu_classes\.json: cannot read the class table"):
        ds[0]
    with pytest.raises(DataError, match="pascal_context has no ground truth for depth"):
        build_dataset("pascal_context", "train", ("depth",), root=root)


def test_pad_protocol_pads_centred_with_the_ignore_values(pascal_root):
    sample = load_all(pascal_root)[0]  # 36x48
    out = EvalTransform((40, 52), fit="pad")(sample)
    assert out["image"].shape[1:] == (40, 52)
    assert torch.equal(out["image"][:, 2:38, 2:50], sample["image"])  # centred: 2 px each side
    assert torch.all(out["parts"][:2] == 255) and torch.all(out["saliency"][:, :, :2] == 255)
    assert torch.all(out["semseg"][:, -2:] == 255) and torch.all(out["normals"][:, :2] == 0)
    assert torch.all(out["edges"][:, :2] == 255) and set(out["edges"][:, 2:38, 2:50].unique().tolist()) == {
        0,
        1,
    }
    assert torch.allclose(out["K"][:2, 2], sample["K"][:2, 2] + 2)
    # An image larger than size (only below the dataset's largest image) is shrunk, aspect kept, then padded.
    small = EvalTransform((24, 24), fit="pad")(sample)
    assert small["image"].shape[1:] == (24, 24) and small["semseg"].shape == (24, 24)
    assert torch.all(small["semseg"][:3] == 255) and torch.all(small["semseg"][-3:] == 255)  # 18 rows + 2 x 3
    assert (small["semseg"][3:-3] != 255).any()
    # Training: the image's own size times the scale, then a crop where larger and a centred pad where smaller.
    torch.manual_seed(0)
    tr = TrainTransform((40, 40), scale_range=(1.0, 1.0), hflip=False, fit="pad")(sample)
    assert tr["image"].shape[1:] == (40, 40)
    assert torch.all(tr["semseg"][:2] == 255) and torch.all(tr["semseg"][-2:] == 255)  # 36 -> 40: padded rows
    assert (tr["semseg"][2:-2] != 255).any()


def test_scale_choices_and_centre_crop_zoom_about_the_centre():
    img = torch.rand(3, 20, 30)
    sample = {"image": img, "K": torch.tensor([[10.0, 0, 14.5], [0, 10.0, 9.5], [0, 0, 1]])}
    t = TrainTransform((20, 30), scale_choices=(1.0, 1.5), hflip=False, crop="center")
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        out = t(sample)
        seen.add(round(float(out["K"][0, 0]), 3))
        assert out["image"].shape[1:] == (20, 30)
        # The principal point stays the image centre under a zoom about the centre.
        assert torch.allclose(out["K"][:2, 2], torch.tensor([14.5, 9.5]), atol=0.51)
    assert seen == {10.0, 15.0}


def test_parts_and_saliency_tasks():
    assert task_channels(("semseg", "parts", "saliency"), 21) == {"semseg": 21, "parts": 7, "saliency": 1}
    assert num_parts() == 7
    space = OutputSpace(num_classes=21)
    logit = torch.tensor([[[[0.0, 2.0]]]])
    assert torch.allclose(TASK_DEFS["saliency"].predict(logit, space), torch.sigmoid(logit))
    # Balanced BCE: positives weigh the negatives' share w, negatives 1 - w; 255 ignored; mean over valid.
    pred = torch.tensor([[[[0.5, -1.0, 2.0, 3.0]]]])
    label = torch.tensor([[[[1.0, 0.0, 0.0, 255.0]]]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        pred[..., :3], label[..., :3], reduction="none"
    )
    w = 2 / 3
    expected = (w * bce[..., 0] + (1 - w) * bce[..., 1] + (1 - w) * bce[..., 2]).sum() / 3
    assert torch.allclose(saliency_loss(pred, label), expected)
    # Edges: padding (255) is ignored, as if those pixels were not there.
    edge_logit, edge = torch.randn(1, 1, 2, 3), torch.tensor([[[[1.0, 0.0, 255.0], [0.0, 255.0, 0.0]]]])
    keep = edge != 255
    assert torch.allclose(edges_loss(edge_logit, edge), edges_loss(edge_logit[keep][None], edge[keep][None]))
    parts_logits = torch.randn(1, 7, 2, 2)
    parts = torch.tensor([[[1, 255], [6, 0]]])
    assert torch.isfinite(TASK_DEFS["parts"].loss()(parts_logits, parts, space))


def test_prediction_images_show_parts_and_saliency(pascal_root, tmp_path):
    from uda.data.labels import get_label_set
    from uda.visualize import save_prediction_images

    s = load_all(pascal_root)[0]
    batch = {k: v[None] for k, v in s.items() if torch.is_tensor(v)}
    h, w = s["image"].shape[1:]
    preds = {
        "semseg": torch.randn(1, 21, h, w),
        "parts": torch.randn(1, 7, h, w),
        "saliency": torch.rand(1, 1, h, w),
    }
    tasks = ("semseg", "parts", "saliency")
    paths = save_prediction_images(tmp_path, "p", batch, preds, tasks, get_label_set("pascal_context21"))
    import cv2

    panel = cv2.imread(str(paths[0]))
    assert panel.shape[1] == 2 * w and panel.shape[0] >= 4 * h


def test_nyudv2_normals_have_holes_where_depth_has(toy_root, tmp_path):
    root = tmp_path / "nyudv2"
    shutil.copytree(toy_root / "nyudv2", root)
    ds = build_dataset("nyudv2", "train", ("normals",), root=root)
    before = ds[0]["normals"]
    depth_file = root / "depth" / f"{ds.ids[0]}.npy"
    depth = np.load(depth_file)
    hole = np.zeros(depth.shape, bool)
    hole[10:20] = (before[:, 10:20].norm(dim=0) > 0.5).numpy()  # pixels whose PNG has a normal
    assert hole.sum() > 50
    depth[hole] = 0
    np.save(depth_file, depth)
    after = ds[0]["normals"]
    assert torch.all(after[:, torch.from_numpy(hole)] == 0)
    assert torch.equal(after[:, torch.from_numpy(~hole)], before[:, torch.from_numpy(~hole)])


def test_nyudv2_toy_tasks_and_a_damaged_depth_file(toy_root, tmp_path):
    root = tmp_path / "nyudv2"
    shutil.copytree(toy_root / "nyudv2", root)
    ds = build_dataset("nyudv2", "train", ("semseg", "depth", "normals", "edges"), root=root)
    s = ds[0]
    h, w = s["image"].shape[1:]
    assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (h, w)
    assert set(s["semseg"].unique().tolist()) <= set(range(40)) | {255}
    assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, h, w) and (s["depth"] == 0).any()
    assert s["normals"].shape == (3, h, w) and torch.all(s["normals"][:, s["depth"][0] == 0] == 0)
    assert s["edges"].shape == (1, h, w) and set(s["edges"].unique().tolist()) == {0.0, 1.0}
    path = root / "depth" / f"{ds.ids[1]}.npy"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError) as err:
        ds[1]
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: unreadable .npy")


def test_nyudv2_mtinet_npy_release_reads_like_the_pngs(toy_root, tmp_path):
    import cv2

    root = tmp_path / "nyudv2"
    shutil.copytree(toy_root / "nyudv2", root)
    ds = build_dataset("nyudv2", "train", ("normals", "edges"), root=root)
    before = ds[0]
    id = ds.ids[0]
    png = cv2.imread(str(root / "normals" / f"{id}.png"))[:, :, ::-1].astype(np.float32)
    np.save(root / "normals" / f"{id}.npy", png * (2.0 / 255.0) - 1.0)  # MTI-Net's NYUD_MT: float [H,W,3]
    np.save(
        root / "edge" / f"{id}.npy", (cv2.imread(str(root / "edge" / f"{id}.png"), 0) > 0).astype(np.float32)
    )
    (root / "normals" / f"{id}.png").unlink()
    (root / "edge" / f"{id}.png").unlink()
    after = ds[0]
    assert torch.allclose(after["normals"], before["normals"], atol=1e-6)
    assert torch.equal(after["edges"], before["edges"])


def test_nyudv2_13_classes(toy_root):
    ds40 = build_dataset("nyudv2", "val", ("semseg",), label_set="nyudv2_40", root=toy_root / "nyudv2")
    ds13 = build_dataset("nyudv2", "val", ("semseg",), label_set="nyudv2_13", root=toy_root / "nyudv2")
    a, b = ds40[0]["semseg"], ds13[0]["semseg"]
    # class13Mapping: wall (40-id 0) -> wall (12), floor -> floor, window/blinds/curtain -> window, ...
    table = {0: 11, 1: 4, 2: 5, 3: 0, 4: 3, 8: 12, 12: 12, 15: 12, 22: 1, 24: 10, 255: 255}
    for k, v in table.items():
        assert torch.all(b[a == k] == v)
    assert (a != 255).any()


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pascal_context_recipe_two_steps(toy_root, tmp_path, fresh_accelerator):
    overrides = [o for o in TINY_OVERRIDES if not o.startswith("data.size")] + ["data.size=32,32"]
    summary = _recipe("pascal_context").main(
        ["--model", "mtl", "--data-root", str(toy_root), "--out", str(tmp_path / "run"), "--batch-size", "2"]
        + overrides
        + ["train.iterations=2", "train.ckpt_every=0", "train.val_batches=1", "train.deterministic=false"]
    )
    results = summary["results"]["val"]
    for key in ("semseg/miou", "parts/miou", "saliency/maxf", "normals/mean", "edges/f1"):
        assert np.isfinite(results[key]), key


def test_nyudv2_recipe_mtinet_protocol_two_steps(toy_root, tmp_path, fresh_accelerator):
    summary = _recipe("nyudv2").main(
        [
            "--protocol",
            "mtinet",
            "--model",
            "mtl",
            "--data-root",
            str(toy_root),
            "--out",
            str(tmp_path / "run"),
        ]
        + ["--batch-size", "2"]
        + TINY_OVERRIDES
        + ["data.size=32,32", "train.iterations=2", "train.ckpt_every=0", "train.val_batches=1"]
        + ["train.deterministic=false"]  # deterministic CPU kernels cost seconds a step
    )
    results = summary["results"]["val"]
    for key in ("semseg/miou", "depth/rmse", "normals/mean", "edges/f1"):
        assert np.isfinite(results[key]), key
    cfg = summary.get("config")
    if cfg is not None:
        assert cfg["loss"]["weights"] == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0}
