"""docs/reproduce.md, the guide to the paper's Tables 1, 2, 3, 5 and 6: each of its commands builds, as its recipe
would but without training and without reading data, a config that carries the paper's settings for its table
row; each `tools/compare.py` line aggregates runs the guide defines.

The commands are taken from the guide itself (every line of a fenced block that starts with
`accelerate launch recipes/`), so the guide and this test cannot drift apart. A command's table row is its
`--out` folder under runs/paper/ (without the seed folder); the expected settings of every row are written
below from the paper (and, where the guide says so, from the authors' released configs).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import os
import re
import runpy
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import uda.cli
from uda.cli import finalise
from uda.config import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "reproduce.md"
SEEDS = (1, 2, 3)
LAUNCH = "accelerate launch recipes/"
COMPARE = "python tools/compare.py"
OUT = re.compile(r"^runs/paper/(?P<row>[\w.-]+(?:/[\w.-]+)*)/s\$s$")

# ----------------------------------------------------------------------------------------------- the paper

TASKS = {
    "SD": ("semseg", "depth"),
    "SDN": ("semseg", "depth", "normals"),
    "SDNE": ("semseg", "depth", "normals", "edges"),
}
# §4.1 "Task balancing" (grid-searched on MTL, used for every multi-task model).
WEIGHTS = {
    "SD": {"semseg": 50.0, "depth": 1.0},
    "SDN": {"semseg": 100.0, "depth": 1.0, "normals": 100.0},
    "SDNE": {"semseg": 100.0, "depth": 1.0, "normals": 100.0, "edges": 50.0},
}
# §4.1 "Datasets": label set, classes, working size (height, width).
DATASETS = {
    "synthia": ("synthia16", 16, (512, 1024)),
    "vkitti2": ("vkitti2_14", 14, (320, 1024)),
    "cityscapes": ("cityscapes16", 16, (512, 1024)),
    "nyudv2": ("nyudv2_40", 40, (448, 576)),
}
# §4.1 "Training details": all models 40k iterations, learning rates x0.1 at 30k, gradient-norm clipping 10.
SCHEDULE = {
    "train.iterations": 40_000,
    "optim.lr_step_at": 30_000,
    "optim.lr_gamma": 0.1,
    "optim.clip_grad_norm": 10.0,
}
# "Our MTL models": Adam (0.9, 0.98), 2e-4 backbone / 3e-4 decoders; "other models" (our reading: STL, see the
# guide's "Ambiguities"): SGD 1e-3 / 1e-2, momentum 0.9, weight decay 5e-4.
ADAM = {
    "optim.optimizer": "adam",
    "optim.betas": (0.9, 0.98),
    "optim.lr_backbone": 2e-4,
    "optim.lr_decoder": 3e-4,
    "optim.weight_decay": 0.0,
}
SGD = {
    "optim.optimizer": "sgd",
    "optim.lr_backbone": 1e-3,
    "optim.lr_decoder": 1e-2,
    "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4,
}
# Cityscapes: the released Cityscapes configs' rates (a difference from §4.1 the guide lists).
CITYSCAPES_ADAM_RATES = {"optim.lr_backbone": 1e-5, "optim.lr_decoder": 1e-4}
# App. B.2: ImageNet ResNet-101 encoder; released code: batch 2, horizontal flips, 3-ways decoder widths,
# d_far = 655.36 m. App. B.1: per-image RMSE / mErr over images, no median scaling outside SDE and DA.
COMMON = {
    "model.backbone": "resnet101",
    "model.pretrained": True,
    "data.batch_size": 2,
    "data.hflip": True,
    "data.scale_range": (1.0, 1.0),
    "data.color_jitter": 0.0,
    "loss.weighting": "fixed",
    "loss.functions": {},
    "loss.d_far": 655.36,
    "eval.scale": 0,
    "eval.per_image": True,
    "eval.min_depth": 1e-3,
    "eval.max_depth": 80.0,
    "consistency": None,
}
THREE_WAYS = {"model.decoder": "3ways", "model.decoder_channels": (64, 128, 128, 256, 256)}
# §3 and App. A.1: mTEB = xTAMs with spatial correlation attention + self-attention, added (Eq. 5), at scale 1,
# with the intermediate supervision S at the mTEB scales (Eq. 6).
MTEB = {
    **THREE_WAYS,
    "model.exchange_scales": (1,),
    "model.intermediate_scales": (1,),
    "model.fusion": "add",
    "model.attention": "spatial",
    "model.self_attention": True,
}
ARCH = {
    # STL / MTL baselines: the DeepLab head of the MTL survey [27]: no intermediate output.
    "stl": {"model.decoder": "deeplab", "model.intermediate_scales": ()},
    "mtl": {"model.decoder": "deeplab", "model.intermediate_scales": ()},
    "padnet": {},
    # 3-ways_PAD-Net: the 3-ways decoder with PAD-Net's block at scale 2 (the released PadnetPlus).
    "3ways-padnet": {**THREE_WAYS, "model.exchange_scales": (2,), "model.intermediate_scales": (2,)},
    "mteb": MTEB,
}
SUPERVISED_MODELS = ("mtl", "padnet", "3ways-padnet", "mteb")


def supervised(dataset: str, taskset: str, model: str, seed: int, name: str | None = None) -> dict[str, Any]:
    """A row of Table 1, 2 or 3."""
    label_set, classes, size = DATASETS[dataset]
    tasks = TASKS[taskset]
    expected = {
        **COMMON,
        **SCHEDULE,
        "name": name or f"{dataset}-{model}",
        "tasks": tasks,
        "data.dataset": dataset,
        "data.label_set": label_set,
        "data.num_classes": classes,
        "data.size": size,
        "data.train_split": "train",
        "data.val_split": "val",
        "target": None,
        "adapt": None,
        "photometric": None,
        "eval.median_scaling": False,
        "model.arch": model,
        "train.seed": seed,
        **ARCH[model],
    }
    if dataset == "vkitti2":
        expected["data.variation"] = "15-deg-left"
    if model == "stl":
        expected |= SGD | {"loss.effective_weights": {t: 1.0 for t in tasks}}
    else:
        expected |= ADAM | {"loss.effective_weights": WEIGHTS[taskset]}
        if dataset == "cityscapes":
            expected |= CITYSCAPES_ADAM_RATES
    return expected


# Table 3: the mTEB scales of each row (the checkmarks were lost; see the guide) and the "Param." column in M.
T3_SCALES = {
    "no-mteb": (),
    "scales4": (4,),
    "scales3": (3,),
    "scales2": (2,),
    "scales1": (1,),
    "scales31": (3, 1),
    "scales321": (3, 2, 1),
    "scales4321": (4, 3, 2, 1),
}
T3_PARAMS_PRINTED = {
    "SD": {"no-mteb": 0.00, "scales4": 3.09, "scales3": 3.09, "scales2": 0.77, "scales1": 0.77},
    "SDN": {"no-mteb": 0.00, "scales4": 2.32, "scales3": 2.32, "scales2": 9.26, "scales1": 9.26},
}
T3_PARAMS_PRINTED["SD"] |= {"scales31": 3.86, "scales321": 4.63, "scales4321": 7.72}
T3_PARAMS_PRINTED["SDN"] |= {"scales31": 11.58, "scales321": 13.89, "scales4321": 23.15}
# The S-D-N column is swapped between the single blocks at scales 4/3 and 2/1 (the multi-block sums agree).
T3_SWAP = {"scales4": "scales2", "scales3": "scales1", "scales2": "scales4", "scales1": "scales3"}


def t3_params(taskset: str, leaf: str) -> float:
    """The paper's "Param." value of a Table 3 row, with the S-D-N single-block swap undone."""
    if taskset == "SDN" and leaf in T3_SWAP:
        leaf = T3_SWAP[leaf]
    return T3_PARAMS_PRINTED[taskset][leaf]


def table3(taskset: str, leaf: str, seed: int) -> dict[str, Any]:
    scales = T3_SCALES[leaf]
    if not scales:  # no exchange block: the 3-ways decoder alone, intermediate supervision kept at scale 1
        expected = supervised("vkitti2", taskset, "mtl", seed, name=f"vkitti2-{leaf}-mtl")
        return expected | THREE_WAYS | {"model.exchange_scales": (1,), "model.intermediate_scales": (1,)}
    expected = supervised("vkitti2", taskset, "mteb", seed, name=f"vkitti2-{leaf}-mteb")
    return expected | {"model.exchange_scales": scales, "model.intermediate_scales": scales}


# App. B.2 and §4.4: Cityscapes SDE, depth self-supervised (Monodepth2: frames -1/+1, scales 0-3, smoothness
# 1e-3, depth 0.1-100 m, auto-masking, ResNet-18 pose net), uniform weights, Adam rates 1e-5 / 5e-5 / 1e-6 pose,
# "similar to our other MTL setups" (40k, x0.1 at 30k, clip 10), median scaling (App. B.1), 80 m cap.
SDE = {
    **COMMON,
    **SCHEDULE,
    **THREE_WAYS,
    "data.dataset": "cityscapes",
    "data.label_set": "cityscapes16",
    "data.num_classes": 16,
    "data.size": (512, 1024),
    "data.train_split": "train",
    "target": None,
    "adapt": None,
    "eval.median_scaling": True,
    "optim.optimizer": "adam",
    "optim.betas": (0.9, 0.999),
    "model.depth_output": "disparity",
    "model.output_scales": (0, 1, 2, 3),
    "photometric.domain": "source",
    "photometric.frames": (-1, 1),
    "photometric.scales": (0, 1, 2, 3),
    "photometric.smoothness_weight": 1e-3,
    "photometric.min_depth": 0.1,
    "photometric.max_depth": 100.0,
    "photometric.automask": True,
    "photometric.pose_backbone": "resnet18",
}


def table5(leaf: str, seed: int) -> dict[str, Any]:
    if leaf == "depth":  # the single-branch depth model that initialises the SDE runs (Monodepth2's rates)
        return SDE | {
            "name": "cityscapes_depth-mtl",
            "tasks": ("depth",),
            "model.arch": "mtl",
            "optim.lr_backbone": 1e-4,
            "optim.lr_decoder": 1e-4,
            "photometric.lr_pose": 1e-4,
            "train.init_from": None,
            "train.seed": seed,
        }
    arch = {"sde-mteb": "mteb", "sde-3ways-padnet": "3ways-padnet"}[leaf]
    return SDE | {
        "name": f"cityscapes_sde-{arch}",
        "tasks": ("semseg", "depth"),
        "model.arch": arch,
        "model.exchange_scales": ARCH[arch]["model.exchange_scales"],
        "loss.effective_weights": {"semseg": 1.0, "depth": 1.0},
        "optim.lr_backbone": 1e-5,
        "optim.lr_decoder": 5e-5,
        "photometric.lr_pose": 1e-6,
        "train.init_from": f"runs/paper/t5/depth/s{seed}",
        "train.seed": seed,
    }


# §4.5, App. B.3 and Tab. 6: S-D, source labels only, 2 source + 2 target samples per batch, lambda_adv 5e-3,
# one discriminator per task at the intermediate and final outputs, per-image median scaling, Cityscapes val.
# Released code: discriminators Adam 1e-4 (0.9, 0.99) with poly decay 0.9, spectral norm, random input flips;
# whole source ("all"), VKITTI2 15-deg-left resized to 1696x512, per-domain BatchNorm statistics.
SCENARIOS = {
    "sy2cs": ("synthia2cityscapes", "synthia", "synthia16", "cityscapes16", 16),
    "vk2cs": ("vkitti2cityscapes", "vkitti2", "vkitti2_8", "cityscapes8", 8),
}
CLASSES_13_OF_16 = (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)  # without wall, fence, pole (mIoU*)
T6_ROWS = {
    "stl-target": ("stl", "oracle"),
    "stl-source": ("stl", "source"),
    "mtl-target": ("mtl", "oracle"),
    "stl-uda": ("stl", "uda"),
    "mtl-source": ("mtl", "source"),
    "mtl-uda": ("mtl", "uda"),
    "ours": ("mteb", "uda"),
}
# The authors' released DA configs (configs/da/*), which produced Tab. 6: Adam 1.5e-5 / 2.5e-4, constant, no
# clipping, 90k iterations.
RELEASED_DA = {
    "optim.optimizer": "adam",
    "optim.betas": (0.9, 0.98),
    "optim.lr_backbone": 1.5e-5,
    "optim.lr_decoder": 2.5e-4,
    "optim.weight_decay": 0.0,
    "optim.lr_gamma": 1.0,
    "optim.clip_grad_norm": 0.0,
    "train.iterations": 90_000,
}


def table6(preset: str, scenario: str, leaf: str, seed: int) -> dict[str, Any]:
    recipe, source, source_labels, target_labels, classes = SCENARIOS[scenario]
    arch, variant = T6_ROWS[leaf]
    expected = {
        **COMMON,
        "name": f"{recipe}-{variant}-{arch}",
        "tasks": ("semseg", "depth"),
        "model.arch": arch,
        **ARCH[arch],
        "loss.effective_weights": {"semseg": 1.0, "depth": 1.0} if arch == "stl" else WEIGHTS["SD"],
        "target.dataset": "cityscapes",
        "target.label_set": target_labels,
        "target.num_classes": classes,
        "target.size": (512, 1024),
        "target.batch_size": 2,
        "target.val_split": "val",
        "eval.median_scaling": True,
        "eval.subset_classes": CLASSES_13_OF_16 if classes == 16 else (),
        "train.bn_mode": "separate",
        "train.seed": seed,
        "photometric": None,
    }
    if variant == "oracle":  # trained on the labelled target
        expected |= {
            "data.dataset": "cityscapes",
            "data.label_set": target_labels,
            "data.train_split": "train",
            "data.size": (512, 1024),
        }
    else:
        expected |= {
            "data.dataset": source,
            "data.label_set": source_labels,
            "data.train_split": "all",
            "data.size": (512, 1024),
        }
        if source == "vkitti2":
            expected |= {"data.variation": "15-deg-left", "data.resize_to": (512, 1696)}
    if variant == "uda":
        expected |= {
            "adapt.lambda_adv": 5e-3,
            "adapt.tasks": ("semseg", "depth"),
            "adapt.aligned_scales": (1, 0) if arch == "mteb" else (0,),
            "adapt.disc_lr": 1e-4,
            "adapt.disc_betas": (0.9, 0.99),
            "adapt.disc_poly_power": 0.9,
            "adapt.spectral_norm": True,
            "adapt.flip_inputs": True,
            "adapt.start_step": 0,
        }
    else:
        expected["adapt"] = None
    if preset == "released":
        expected |= RELEASED_DA
    else:
        expected |= SCHEDULE | (SGD if arch == "stl" else ADAM)
    return expected


def paper_rows() -> list[str]:
    """Every row of the paper's Tables 1, 2, 3, 5 and 6 the guide must give a command for."""
    rows = [f"t1/{d}/stl" for d in ("synthia", "vkitti2", "cityscapes")]
    rows += [
        f"t1/{d}/{ts}/{m}"
        for d in ("synthia", "vkitti2", "cityscapes")
        for ts in ("SD", "SDN")
        for m in SUPERVISED_MODELS
    ]
    rows += ["t2/nyudv2/stl"] + [
        f"t2/nyudv2/{ts}/{m}" for ts in ("SD", "SDN", "SDNE") for m in SUPERVISED_MODELS
    ]
    rows += [f"t3/{ts}/{leaf}" for ts in ("SD", "SDN") for leaf in T3_SCALES]
    rows += ["t5/depth", "t5/sde-mteb", "t5/sde-3ways-padnet"]
    rows += [f"{t}/{sc}/{leaf}" for t in ("t6", "t6-paper") for sc in SCENARIOS for leaf in T6_ROWS]
    return rows


def expected_settings(row: str, seed: int) -> dict[str, Any]:
    """The paper's settings of a table row (its runs/paper/ folder)."""
    parts = row.split("/")
    table = parts[0]
    if table in ("t1", "t2"):
        if parts[-1] == "stl":
            return supervised(parts[1], "SDN" if table == "t1" else "SDNE", "stl", seed)
        return supervised(parts[1], parts[2], parts[3], seed)
    if table == "t3":
        return table3(parts[1], parts[2], seed)
    if table == "t5":
        return table5(parts[1], seed)
    if table in ("t6", "t6-paper"):
        return table6("released" if table == "t6" else "paper", parts[1], parts[2], seed)
    raise KeyError(row)


# ------------------------------------------------------------------------------------------------ the guide


def fenced_blocks(text: str) -> list[list[str]]:
    """The lines (stripped) of every fenced code block."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line.strip())
    assert current is None, f"{DOC}: a fenced block is not closed"
    return blocks


def prose(text: str) -> str:
    """The guide without its fenced blocks."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


DOC_TEXT = DOC.read_text()
BLOCKS = fenced_blocks(DOC_TEXT)
COMMANDS = [line for block in BLOCKS for line in block if line.startswith(LAUNCH)]
COMPARES = [line for block in BLOCKS for line in block if line.startswith(COMPARE)]


def row_of(command: str) -> str:
    """The table row of a guide command: its --out folder under runs/paper/ without the seed folder."""
    tokens = shlex.split(command, comments=True)
    outs = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--out"]
    assert len(outs) == 1, f"one --out per command: {command}"
    match = OUT.match(outs[0])
    assert match, f"--out must be runs/paper/<row>/s$s: {command}"
    return match["row"]


ROWS = [row_of(c) for c in COMMANDS]
COMMAND_OF = dict(zip(ROWS, COMMANDS))


def argv_for(command: str, seed: int) -> tuple[str, list[str]]:
    """(recipe script, its arguments) of a guide command for one seed."""
    line = command.replace("$s", str(seed))
    assert "$" not in line, f"only $s may be substituted: {command}"
    tokens = shlex.split(line, comments=True)
    assert tokens[:2] == ["accelerate", "launch"], command
    return tokens[2], tokens[3:]


# ------------------------------------------------------------------------------ configs, built as recipes do


@functools.cache
def recipe_entry(script: str) -> tuple[Any, Any, str]:
    """(build, parser, recipe name) that the recipe file hands to uda.cli.main, captured instead of training."""
    captured: dict[str, Any] = {}

    def capture(build, parser, recipe, argv=None):
        captured.update(build=build, parser=parser, recipe=recipe)

    path = REPO / script
    assert path.is_file(), f"{script}: no such recipe"
    with (
        mock.patch.object(uda.cli, "main", capture),
        mock.patch.object(sys, "argv", [str(path)]),
        mock.patch.object(sys, "path", list(sys.path)),
    ):
        runpy.run_path(str(path), run_name="__main__")
    assert captured, f"{script} does not call uda.cli.main(build, parser, recipe)"
    return captured["build"], captured["parser"], captured["recipe"]


def build_config(script: str, argv: list[str]) -> ExperimentConfig:
    """The config uda.cli.main would train: parse, build, finalise."""
    build, parser, recipe = recipe_entry(script)
    args = parser.parse_intermixed_args(argv)
    return finalise(build(args), args, recipe)


# Every file-system access under the watched folders while configs are built (an audit hook cannot be removed,
# so it stays registered and only records while _WATCHED is set).
_WATCHED: list[str] = []
_TOUCHED: list[tuple[str, str]] = []
_EVENTS = {
    "open",
    "os.listdir",
    "os.scandir",
    "glob.glob",
    "glob.glob/2",
    "os.mkdir",
    "os.rename",
    "os.remove",
}


def _audit(event: str, args: tuple) -> None:
    if not _WATCHED or event not in _EVENTS or not args:
        return
    path = args[0]
    if isinstance(path, str | bytes | os.PathLike):
        full = os.path.abspath(os.fsdecode(path))
        if any(full == w or full.startswith(w + os.sep) for w in _WATCHED):
            _TOUCHED.append((event, full))


sys.addaudithook(_audit)


@dataclasses.dataclass
class Built:
    configs: dict[tuple[str, int], ExperimentConfig]
    data_root: Path
    touched: list[tuple[str, str]]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """Every guide command's config for seeds 1-3, with a data root that does not exist."""
    data_root = tmp_path_factory.mktemp("reproduce") / "datasets-not-there"
    _WATCHED[:] = [str(data_root), str(REPO / "runs" / "paper"), os.path.abspath("runs/paper")]
    _TOUCHED.clear()
    try:
        configs = {}
        for row, command in zip(ROWS, COMMANDS):
            for seed in SEEDS:
                script, argv = argv_for(command, seed)
                configs[(row, seed)] = build_config(script, [*argv, "--data-root", str(data_root)])
    finally:
        _WATCHED.clear()
    return Built(configs, data_root, list(_TOUCHED))


def flat(cfg: ExperimentConfig) -> dict[str, Any]:
    """section.key -> value of a config (None for an unused section), plus what the run derives from it."""
    from uda.data.labels import get_label_set
    from uda.losses import default_task_weights
    from uda.models.multitask import intermediate_scales

    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(f"{prefix}{f.name}.", value)
            else:
                out[f"{prefix}{f.name}"] = value

    walk("", cfg)
    # The base task weights the run uses (uda.objectives.weighting: loss.weights or the paper's preset).
    out["loss.effective_weights"] = cfg.loss.weights or default_task_weights(cfg.tasks)
    step_at = cfg.optim.lr_step_fraction * cfg.train.iterations if cfg.optim.lr_step_every == 0 else None
    out["optim.lr_step_at"] = step_at
    inter = intermediate_scales(cfg.model)
    out["model.intermediate_scales"] = inter
    out["data.num_classes"] = get_label_set(cfg.data.label_set).num_classes
    if cfg.target is not None:
        out["target.num_classes"] = get_label_set(cfg.target.label_set).num_classes
    if cfg.adapt is not None:
        out["adapt.aligned_scales"] = cfg.adapt.scales if cfg.adapt.scales is not None else (*inter, 0)
    return out


def same(actual: Any, expected: Any) -> bool:
    if isinstance(expected, bool) or expected is None:
        return actual is expected
    if isinstance(expected, float):
        return isinstance(actual, int | float) and math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(expected, tuple | list):
        return (
            isinstance(actual, tuple | list)
            and len(actual) == len(expected)
            and all(map(same, actual, expected))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(same(actual[k], expected[k]) for k in expected)
        )
    return actual == expected


# ------------------------------------------------------------------------------------------------- the tests


def test_guide_commands_are_well_formed():
    assert len(COMMANDS) == 87, f"the guide has {len(COMMANDS)} commands"
    for block in BLOCKS:
        launches = [line for line in block if line.startswith(LAUNCH)]
        # A recipe run other than `accelerate launch recipes/...` would not be extracted (and so not checked).
        stray = [line for line in block if "recipes/" in line and not line.startswith(LAUNCH)]
        assert not stray, f"recipe runs must start with {LAUNCH!r}: {stray}"
        if launches:
            assert block[0] == "for s in 1 2 3; do" and block[-1] == "done", "commands loop over seeds 1-3"
    for command in COMMANDS:
        tokens = shlex.split(command)
        assert not command.endswith("\\"), f"one command per line: {command}"
        assert tokens.count("--seed") == 1 and tokens[tokens.index("--seed") + 1] == "$s", command
        for flag in ("--data-root", "--toy", "--resume"):
            assert flag not in tokens, f"{flag} does not belong in a reproduction command: {command}"
    assert len(set(ROWS)) == len(ROWS), "two commands write the same run folder"


def test_guide_has_a_command_for_every_table_row():
    rows, expected = set(ROWS), set(paper_rows())
    assert rows == expected, (
        f"missing: {sorted(expected - rows)}; not in the paper: {sorted(rows - expected)}"
    )


def test_guide_gives_expected_numbers_for_every_row():
    text = prose(DOC_TEXT)
    missing = [row for row in ROWS if f"`{row}`" not in text]
    assert not missing, f"rows without a results line in the guide: {missing}"


@pytest.mark.parametrize("row", ROWS)
def test_command_config_carries_the_paper_settings(built, row):
    for seed in SEEDS:
        cfg = built.configs[(row, seed)]
        values = flat(cfg)
        expected = expected_settings(row, seed)
        wrong = {
            k: (values.get(k, "<missing>"), v)
            for k, v in expected.items()
            if k not in values or not same(values[k], v)
        }
        assert not wrong, f"{COMMAND_OF[row]} (seed {seed}): (config, paper) differ: {wrong}"
        assert cfg.out == f"runs/paper/{row}/s{seed}"
        for data in (cfg.data, cfg.target):
            if data is not None:  # the given data root, not the default datasets/
                assert data.root == str(built.data_root / data.dataset)


def test_building_the_configs_reads_no_data(built):
    assert len(built.configs) == len(COMMANDS) * len(SEEDS)
    assert not built.touched, f"building the configs touched {built.touched[:5]}"
    assert not built.data_root.exists()


@functools.cache
def _block_params(tasks: tuple[str, ...], channels: int, scale: int, arch: str) -> int:
    import torch

    from uda.config import ModelConfig
    from uda.models.exchange import EXCHANGE_BLOCKS
    from uda.models.multitask import EXCHANGE_OF_ARCH

    torch.manual_seed(0)
    block = EXCHANGE_BLOCKS[EXCHANGE_OF_ARCH[arch]].from_config(
        tasks, channels, ModelConfig(arch=arch), scale
    )
    return sum(p.numel() for p in block.parameters())


def test_table3_rows_match_the_paper_parameter_column(built):
    """The scales chosen for Table 3's rows add the parameters its "Param." column prints (in M)."""
    for row in [r for r in ROWS if r.startswith("t3/")]:
        _, taskset, leaf = row.split("/")
        model = built.configs[(row, 1)].model
        params = sum(
            _block_params(tuple(TASKS[taskset]), model.decoder_channels[s], s, model.arch)
            for s in model.exchange_scales
        )
        assert round(params / 1e6, 2) == t3_params(taskset, leaf), f"{row}: {params / 1e6:.3f} M"


def _component_match(path: str, pattern: str) -> bool:
    """Shell-style glob match, one path component at a time (a * does not cross a /)."""
    parts, pats = path.split("/"), pattern.split("/")
    return len(parts) == len(pats) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pats))


def _compare_args(line: str) -> tuple[list[str], dict[str, str]]:
    tokens = shlex.split(line)[2:]
    runs, options = [], {}
    it = iter(tokens)
    for token in it:
        if token.startswith("--"):
            options[token] = next(it)
        else:
            runs.append(token)
    return runs, options


def test_compare_lines_aggregate_guide_runs(built):
    assert COMPARES, "the guide gives no tools/compare.py line"
    covered = set()
    for line in COMPARES:
        runs, options = _compare_args(line)
        assert set(options) <= {"--split", "--baseline", "--out"}, line
        matched = []
        for pattern in runs:
            hits = [
                (row, seed)
                for row, seed in built.configs
                if _component_match(f"runs/paper/{row}/s{seed}", pattern)
            ]
            assert hits, f"{line}: {pattern} matches no run of the guide"
            matched += hits
        covered |= {row for row, _ in matched}
        # compare.py groups runs by config name: one group must be one table row, over its three seeds.
        groups: dict[str, set[tuple[str, int]]] = defaultdict(set)
        for key in matched:
            groups[built.configs[key].name].add(key)
        for name, keys in groups.items():
            assert len({row for row, _ in keys}) == 1, f"{line}: group {name} mixes rows {sorted(keys)}"
            assert {seed for _, seed in keys} == set(SEEDS), f"{line}: group {name} lacks seeds"
        adapting = {built.configs[k].target is not None for k in matched}
        assert len(adapting) == 1, f"{line}: mixes supervised and UDA runs"
        assert options.get("--split") == ("target" if adapting.pop() else "val"), line
        if "--baseline" in options:
            base = options["--baseline"]
            assert base in groups, f"{line}: baseline {base} is none of the compared groups"
            base_cfg = built.configs[next(iter(groups[base]))]
            assert base_cfg.model.arch == "stl", f"{line}: Δ is measured against STL"
            if base_cfg.target is not None:
                assert base_cfg.name.endswith("-uda-stl"), f"{line}: Table 6 measures Δ against STL-UDA"
            for key in matched:  # the baseline has every task of every run: Δ over the run's own task set
                assert set(built.configs[key].tasks) <= set(base_cfg.tasks), f"{line}: {key}"
    assert covered == set(ROWS), f"rows no compare line aggregates: {sorted(set(ROWS) - covered)}"
