"""uda-compare (uda.commands.compare) on run folders it must refuse in one line, and on the evaluation folders
uda-evaluate writes (the tiny trained-run cases are in test_tools.py and test_evaluate_tool.py)."""

import json
from pathlib import Path

import pytest

from uda.commands import compare


def fake_run(
    folder: Path,
    name: str,
    metrics: dict,
    seed: int | None = None,
    arch: str = "mtl",
    protocol: dict | None = None,
) -> Path:
    """A finished run folder as compare reads it: config.json (name, tasks, arch, train.seed) and metrics.json
    (with `protocol`, the evaluation protocol of its split, when given)."""
    folder.mkdir(parents=True)
    cfg = {"name": name, "tasks": ["semseg", "depth"], "model": {"arch": arch}}
    if seed is not None:
        cfg["train"] = {"seed": seed}
    (folder / "config.json").write_text(json.dumps(cfg))
    record = {"results": {"val": metrics}}
    if protocol is not None:
        record["protocol"] = {"val": protocol}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


METRICS = {"semseg/miou": 0.5, "depth/rmse": 4.0}


def rows(table: str) -> dict[str, list[str]]:
    return {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in table.splitlines()[2:]
    }


def test_a_seed_twice_in_one_group_is_refused_pointing_to_group_by_folder(tmp_path):
    """Two experiments sharing a config name (e.g. different init_from), seeds 1-2 each: not 4 seeds."""
    runs = [
        str(fake_run(tmp_path / f"{kind}-mteb-s{seed}", "s2c-source-mteb", METRICS, seed))
        for kind in ("pre", "source")
        for seed in (1, 2)
    ]
    with pytest.raises(
        SystemExit,
        match=r"^error: .*pre-mteb-s1 and .*source-mteb-s1 are both 's2c-source-mteb' "
        r"with train\.seed 1; pass --group-by folder",
    ):
        compare.table(runs)
    table = rows(compare.table([*runs, "--group-by", "folder"]))
    assert {k: v[0] for k, v in table.items()} == {"pre-mteb": "2", "source-mteb": "2"}


def test_tasks_the_runs_lack_and_unreadable_metrics_are_one_line_errors(tmp_path):
    stl = str(fake_run(tmp_path / "stl", "s-stl", METRICS, arch="stl"))
    mtl = str(fake_run(tmp_path / "mtl", "s-mtl", METRICS))
    with pytest.raises(
        SystemExit, match=r"^error: s-mtl: --tasks semseg,normals names normals, which its runs"
    ):
        compare.table([stl, mtl, "--tasks", "semseg,normals"])
    metrics = tmp_path / "mtl" / "metrics.json"
    metrics.write_text('{"results": ')  # a half-written file
    with pytest.raises(
        SystemExit, match=rf"^error: {metrics}: not readable as JSON \(.*\); re-evaluate the run"
    ):
        compare.table([mtl])
    metrics.write_text(json.dumps({"history": []}))
    with pytest.raises(SystemExit, match=rf"^error: {metrics} has no 'results' .*; re-evaluate the run"):
        compare.table([mtl])


def test_an_evaluation_folder_is_compared_as_its_run_and_the_legacy_warning_says_so(tmp_path, capsys):
    run = fake_run(tmp_path / "mteb-s1", "s-mteb", {"normals/mean": 20.0}, seed=1)  # legacy: no mean_pooled
    compare.table([str(run)])
    assert f"re-evaluate it (uda-evaluate {run}) and pass the eval-* folder" in capsys.readouterr().err
    evaluated = run / "eval-cityscapes-val"  # uda-evaluate's default --out: metrics.json and report.md
    evaluated.mkdir()
    (evaluated / "metrics.json").write_text(json.dumps({"results": {"cityscapes/val": METRICS}}))
    assert rows(compare.table([str(evaluated)]))["s-mteb"][:2] == ["1", "0.5000"]
    assert "mteb" in rows(compare.table([str(evaluated), "--group-by", "folder"]))


PROTOCOL = {
    "dataset": "cityscapes",
    "split": "val",
    "label_set": "cityscapes16",
    "checkpoint": "step 100 (last)",
    "median_scaling": True,
    "aggregation": "per-image mean",
    "depth_cap_m": [0.001, 80.0],
}


def test_delta_against_a_baseline_evaluated_under_another_protocol_is_refused(tmp_path):
    """MTL depth RMSE 4.0 median-scaled vs an STL baseline RMSE 5.0 evaluated without median scaling gave
    Delta_T = (0 + 20) / 2 = +10 %, a number that measures the protocol, not the model."""
    mtl = str(fake_run(tmp_path / "mtl", "s-mtl", METRICS, protocol=PROTOCOL))
    base = {"semseg/miou": 0.5, "depth/rmse": 5.0}
    other = {**PROTOCOL, "median_scaling": False, "checkpoint": "step 200 (last)"}
    stl = str(fake_run(tmp_path / "stl", "s-stl", base, arch="stl", protocol=other))
    with pytest.raises(
        SystemExit,
        match=r"^error: s-mtl: evaluated differently from its Delta_T baseline 's-stl' \(median_scaling: "
        r"False vs True, baseline first\)",
    ):
        compare.table([stl, mtl])
    # The same protocol (another checkpoint is no difference): the delta of the numbers.
    same = str(
        fake_run(tmp_path / "stl-same", "s-stl", base, arch="stl", protocol={**PROTOCOL, "checkpoint": "x"})
    )
    assert rows(compare.table([same, mtl]))["s-mtl"][-1] == "10.0000"
    # Seeds of one row evaluated on different subsets of the split are not averaged either.
    part = {**PROTOCOL, "batches": "first 4 per process"}
    seed2 = str(fake_run(tmp_path / "mtl-s2", "s-mtl", METRICS, seed=2, protocol=part))
    seed1 = str(fake_run(tmp_path / "mtl-s1", "s-mtl", METRICS, seed=1, protocol=PROTOCOL))
    with pytest.raises(
        SystemExit, match=r"evaluated differently \(batches: whole split vs first 4 per process\)"
    ):
        compare.table([seed1, seed2])
