"""The evaluate command (uda.commands.evaluate, tools/evaluate.py) on a tiny trained run: the run's protocol by
default and flags that override one choice, one process or two with the same numbers, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.test_faults import launch
from uda.commands import evaluate as command

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run(toy_root, tmp_path_factory) -> Path:
    """A tiny MTL run on the toy SYNTHIA-like data, trained with median scaling in its protocol."""
    from accelerate.state import AcceleratorState

    from uda.engine import Trainer

    AcceleratorState._reset_state(True)
    cfg = tiny_config(toy_root, tmp_path_factory.mktemp("run"), arch="mtl", iterations=1, ckpt_every=1)
    Trainer(replace(cfg, eval=replace(cfg.eval, median_scaling=True))).fit()
    AcceleratorState._reset_state(True)
    return Path(cfg.out)


def run_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["results"]["val"]


def test_evaluate_reproduces_the_run_metrics_with_its_protocol(run, tmp_path, capsys, fresh_accelerator):
    # No protocol flag: the run's dataset, split, size and median scaling, as its own validation.
    results = command.metrics([str(run), "--out", str(tmp_path)])
    trained = run_metrics(run)
    for key in ("semseg/miou", "depth/rmse", "depth/abs_rel", "depth/median_scale"):
        assert results[key] == pytest.approx(trained[key], rel=1e-6), key
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("protocol: "))
    assert "median_scaling=True," in line and "dataset=synthia," in line and "split=val," in line
    assert "(flag)" not in line and "processes=1" in line
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["protocol"]["synthia/val"]["median_scaling"] is True
    assert saved["protocol"]["synthia/val"]["set_by_flags"] == []
    report = (tmp_path / "report.md").read_text()
    assert "- median_scaling: True" in report and "- checkpoint: " in report
    assert list((tmp_path / "images").glob("*.png"))


def test_a_flag_overrides_one_choice_and_is_marked(run, toy_root, tmp_path, capsys, fresh_accelerator):
    options = ["--no-median-scaling", "--max-depth", "20", "--data-root", str(toy_root), "--no-images"]
    results = command.metrics([str(run), *options, "--out", str(tmp_path)])
    assert "depth/median_scale" not in results and "depth_unscaled/rmse" not in results
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("protocol: "))
    assert "median_scaling=False (flag)" in line and "depth_cap_m=[0.001, 20.0] (flag)" in line
    assert f"data_root={toy_root / 'synthia'} (flag)" in line and "label_set=synthia16," in line
    saved = json.loads((tmp_path / "metrics.json").read_text())["protocol"]["synthia/val"]
    assert saved["set_by_flags"] == ["data_root", "depth_cap_m", "median_scaling"]
    assert not (tmp_path / "images").exists()


def test_protocol_of_an_adaptation_run(toy_root, tmp_path):
    """Without flags the target's split and protocol; the source as the run validated it (no median scaling);
    a size replaces the resize before it."""
    cfg = tiny_config(toy_root, tmp_path, adapt=True)
    cfg = replace(cfg, target=replace(cfg.target, val_split="test", resize_to=(80, 160)))
    args = command.parser().parse_args(["run"])
    data, eval_cfg, domain, flagged = command.resolve(cfg, args)
    assert (data.dataset, data.val_split, data.label_set, domain) == ("cityscapes", "test", "cityscapes16", 1)
    assert eval_cfg.median_scaling and data.resize_to == (80, 160) and not flagged
    args = command.parser().parse_args(["run", "--dataset", "synthia", "--size", "32", "64"])
    data, eval_cfg, domain, flagged = command.resolve(cfg, args)
    assert (data.dataset, data.val_split, data.label_set, domain) == ("synthia", "val", "synthia16", 0)
    assert not eval_cfg.median_scaling and data.size == (32, 64) and data.resize_to is None
    assert flagged == {"dataset", "size", "resize_to"}
    args = command.parser().parse_args(["run", "--dataset", "synthia", "--median-scaling"])
    assert command.resolve(cfg, args)[1].median_scaling


def fail_line(capsys, argv: list[str]) -> str:
    """The single stderr line of a failing evaluate (exit 1)."""
    with pytest.raises(SystemExit) as exit_:
        command.metrics(argv)
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_errors_are_one_line_naming_the_path_and_the_fix(run, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere"
    assert f"error: {missing}: no such run folder; pass" in fail_line(capsys, [str(missing)])
    empty = tmp_path / "empty"
    empty.mkdir()
    line = fail_line(capsys, [str(empty)])
    assert f"error: {empty}: no complete checkpoint" in line and "ckpt_every" in line
    # A checkpoint whose weights or state file are damaged.
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(next((run / "checkpoints").glob("step-*")) / "trainer_state.json", ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    line = fail_line(capsys, [str(ckpt)])
    assert (
        f"{ckpt / 'model.safetensors'}: cannot read weights (truncated or overwritten" in line
        and "use an older one" in line
    )
    state = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps({**state, "files": {}}))  # no record to check against
    line = fail_line(capsys, [str(ckpt)])
    assert f"{ckpt / 'model.safetensors'}: cannot read weights" in line and "use an older one" in line
    (ckpt / "trainer_state.json").write_text('{"config": ')
    assert f"{ckpt / 'trainer_state.json'}: cannot read the run's config" in fail_line(capsys, [str(ckpt)])
    # A data root without the dataset.
    line = fail_line(capsys, [str(run), "--data-root", str(empty)])
    assert f"error: {empty}: no synthia folder here" in line
    # --debug and UDA_DEBUG=1 show the traceback instead.
    with pytest.raises(FileNotFoundError):
        command.metrics([str(missing), "--debug"])
    monkeypatch.setenv("UDA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        command.metrics([str(missing)])


def test_a_run_without_checkpoints_fails_in_one_line_without_a_traceback(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "UDA_DEBUG"}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: {tmp_path}: no complete checkpoint (expected {tmp_path / 'checkpoints'}/step-*/trainer_state.json); "
        "train the run with train.ckpt_every > 0 or until its end, or pass a checkpoint folder"
    ]


def test_help_and_usage_errors_answer_before_torch_is_imported():
    code = (
        "import sys\nfrom uda.commands.evaluate import main\n"
        "for argv in (['--help'], ['run', '--size', '0', '64']):\n"
        "    try:\n        main(argv)\n    except SystemExit as e:\n        print('exit', e.code)\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.stdout.splitlines()[-3:] == ["exit 0", "exit 2", "False"]
    help_text = " ".join(result.stdout.split())
    assert "--median-scaling" in help_text and "default: the run's train.mixed_precision" in help_text


def test_two_processes_give_the_metrics_of_one(run, tmp_path):
    """Each process evaluates its share of the split (the toy val split's 5 samples: 3 + 2, where a padding
    sampler would count one twice); the summed metric states equal one process's numbers, and only the main
    process prints and writes."""
    result = launch([str(REPO / "tools" / "evaluate.py"), str(run), "--out", str(tmp_path)], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("protocol: ") == 1 and "processes=2" in result.stdout
    two = json.loads((tmp_path / "metrics.json").read_text())["results"]["synthia/val"]
    one = run_metrics(run)  # the run's own validation: one process, the same checkpoint and protocol
    assert set(two) == set(one)
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("median_scaling", ["--no-median-scaling", "--median-scaling"])
def test_a_scale_the_model_has_no_output_at_is_refused_naming_its_scales(
    run, tmp_path, capsys, fresh_accelerator, median_scaling
):
    """Before, the tasks without that scale were left out: all-NaN metrics and exit 0, or a KeyError traceback
    with median scaling."""
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_:
        command.metrics([str(run), "--scale", "5", median_scaling, "--no-images", "--out", str(out)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err  # the error comes after the progress bar has started
    assert [x for x in err.splitlines() if x.startswith("error: ")] == [
        "error: the model has no output at scale 5 (it has 0, 1); pass --scale 0 (eval.scale=0 in a recipe)"
    ]
    assert not (out / "metrics.json").exists()


def test_report_has_one_iou_table_per_task_named_from_its_own_label_set(tmp_path):
    from uda.data.labels import get_label_set
    from uda.evaluate import write_report
    from uda.tasks import PARTS_LABEL_SET

    semseg_names = get_label_set("pascal_context21").class_names
    part_names = get_label_set(PARTS_LABEL_SET).class_names
    results = {"val": {"semseg/miou": 0.5, "semseg/iou/1": 0.4, "parts/miou": 0.6, "parts/iou/1": 0.3}}
    report = write_report(tmp_path, "t", results, {"val": {}}, class_names=semseg_names).read_text()
    semseg_table = f"| semseg class | IoU |\n|---|---|\n| {semseg_names[1]} | 0.4000 |\n"
    parts_table = f"| parts class | IoU |\n|---|---|\n| {part_names[1]} | 0.3000 |\n"
    assert semseg_table in report and parts_table in report and semseg_names[1] != part_names[1]


def test_odsf_tolerance_is_the_datasets_own_and_logged():
    """eval.edge_max_dist None: the dataset's tolerance of uda.boundary.MAX_DIST (NYUD-v2's 0.011 for a dataset
    without one), used by the metric and logged in the protocol (before: None logged, 0.011 used everywhere)."""
    import torch

    from uda.boundary import synthetic_edge_maps
    from uda.config import EvalConfig
    from uda.evaluate import evaluate, protocol
    from uda.metrics import BoundaryOdsF
    from uda.tasks import OutputSpace

    odsf = EvalConfig(edge_metric="odsf")
    logged = {
        dataset: protocol(odsf, dataset, "val", "x", "ckpt")["edge_max_dist"]
        for dataset in ("pascal_context", "nyudv2", "cityscapes")
    }
    assert logged == {"pascal_context": 0.0075, "nyudv2": 0.011, "cityscapes": 0.011}
    assert (
        protocol(replace(odsf, edge_max_dist=0.02), "pascal_context", "val", "x", "ckpt")["edge_max_dist"]
        == 0.02
    )
    assert protocol(EvalConfig(), "pascal_context", "val", "x", "ckpt")["edge_max_dist"] is None  # F1: none

    prob, gt = (torch.from_numpy(m)[None, None].float() for m in synthetic_edge_maps(120, 160, 0))

    class Fixed(torch.nn.Module):
        def forward(self, image):
            return {"edges": {0: torch.logit(prob.clamp(1e-6, 1 - 1e-6))}}

    def reference(max_dist: float) -> float:
        metric = BoundaryOdsF(max_dist)
        metric.update(torch.sigmoid(torch.logit(prob.clamp(1e-6, 1 - 1e-6))), gt)
        return metric.compute()["odsf"]

    assert reference(0.0075) != reference(0.011)
    space = OutputSpace(num_classes=21)
    batch = {"image": torch.zeros(1, 3, 120, 160), "edges": gt, "meta": [{"dataset": "pascal_context"}]}
    # The dataset from the batches' meta (validation during training), or given (uda-evaluate).
    assert evaluate(Fixed(), [batch], ["edges"], odsf, space)["edges/odsf"] == reference(0.0075)
    given = evaluate(Fixed(), [batch], ["edges"], odsf, space, dataset="nyudv2")["edges/odsf"]
    assert given == reference(0.011)


def test_compare_reads_the_evaluation_folders_evaluate_writes(run, tmp_path, fresh_accelerator):
    """uda-compare takes what uda-evaluate writes (no config.json there): its default <run>/eval-<dataset>-<split>,
    and an --out elsewhere (the run found from the checkpoint its protocol names)."""
    from uda.commands import compare

    elsewhere = tmp_path / "elsewhere"
    results = command.metrics([str(run), "--no-images", "--out", str(elsewhere)])
    command.metrics([str(run), "--no-images"])
    name = json.loads((run / "config.json").read_text())["name"]
    for folder in (run / "eval-synthia-val", elsewhere):
        row = next(x for x in compare.table([str(folder)]).splitlines() if x.startswith(f"| {name} |"))
        assert row.split("|")[3].strip() == f"{results['semseg/miou']:.4f}", folder
