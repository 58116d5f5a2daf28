"""Command-line tools on a real (tiny) run: evaluate a checkpoint, compare runs with Delta_T, benchmark."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from uda.engine import Trainer
from uda.metrics import multitask_delta

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import benchmark  # noqa: E402
import compare  # noqa: E402
import evaluate as evaluate_tool  # noqa: E402


@pytest.fixture(scope="module")
def runs(toy_root, tmp_path_factory):
    """Two tiny trained runs: STL and MTL, S-D on the toy SYNTHIA-like data."""
    out = {}
    for arch in ("stl", "mtl"):
        cfg = tiny_config(toy_root, tmp_path_factory.mktemp(arch), arch=arch, iterations=3, ckpt_every=3)
        cfg.name = f"synthia-{arch}"
        Trainer(cfg).fit()
        out[arch] = Path(cfg.out)
    return out


def test_evaluate_reproduces_the_run_metrics_and_writes_a_report(runs, toy_root, tmp_path):
    run = runs["mtl"]

    def evaluate(out: Path, *options: str) -> dict:
        data = ["--dataset", "synthia", "--split", "val", "--data-root", str(toy_root / "synthia")]
        return evaluate_tool.main([str(run), *data, "--size", "64", "128", *options, "--out", str(out)])

    results = evaluate(tmp_path)
    trained = json.loads((run / "metrics.json").read_text())["results"]["val"]
    for key in ("semseg/miou", "depth/rmse", "depth/abs_rel"):
        assert results[key] == pytest.approx(trained[key], rel=1e-5), key  # same checkpoint, same protocol
    assert "depth/median_scale" not in results
    scaled = evaluate(tmp_path / "ms", "--median-scaling")
    assert scaled["depth/median_scale"] > 0 and scaled["depth/abs_rel"] != results["depth/abs_rel"]
    report = (tmp_path / "report.md").read_text()
    assert "median_scaling: False" in report and "checkpoint" in report
    assert list((tmp_path / "images").glob("*.png"))


def test_compare_prints_delta_against_stl(runs, capsys):
    table = compare.main([str(runs["stl"]), str(runs["mtl"]), "--split", "val"])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    stl = json.loads((runs["stl"] / "metrics.json").read_text())["results"]["val"]
    mtl = json.loads((runs["mtl"] / "metrics.json").read_text())["results"]["val"]
    expected = multitask_delta(mtl, stl, ["semseg/miou", "depth/rmse"])
    assert rows["synthia-mtl"].rstrip(" |").endswith(f"{expected:.4f}")
    assert rows["synthia-stl"].rstrip(" |").endswith("0.0000")


def test_compare_rejects_a_folder_without_metrics(tmp_path):
    with pytest.raises(SystemExit, match="metrics.json not found"):
        compare.main([str(tmp_path)])


def test_benchmark_reports_every_arch(tmp_path):
    rows = benchmark.main(
        [
            "--backbone",
            "resnet18",
            "--size",
            "32",
            "64",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--archs",
            "mtl",
            "mteb",
            "--json",
            str(tmp_path / "b.json"),
        ]
    )
    assert [r["arch"] for r in rows] == ["mtl", "mteb"] and all(r["ms_per_step"] > 0 for r in rows)
    assert rows[1]["params_m"] > rows[0]["params_m"]  # mTEB adds parameters
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["arch"] == "mtl"


def test_evaluate_takes_the_protocol_from_the_run(toy_root, tmp_path, capsys):
    from dataclasses import replace

    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=1, ckpt_every=1)
    Trainer(replace(cfg, eval=replace(cfg.eval, median_scaling=True))).fit()
    data = ["--dataset", "synthia", "--split", "val", "--data-root", str(toy_root / "synthia")]
    capsys.readouterr()
    results = evaluate_tool.main([str(tmp_path / "run"), *data, "--out", str(tmp_path / "a")])
    assert "depth/median_scale" in results  # the run's eval.median_scaling, no flag needed
    assert "median_scaling=True" in capsys.readouterr().out  # and it says which protocol it used
    off = evaluate_tool.main(
        [str(tmp_path / "run"), *data, "--no-median-scaling", "--out", str(tmp_path / "b")]
    )
    assert "depth/median_scale" not in off


def fake_run(folder: Path, name: str, arch: str, tasks: list[str], metrics: dict) -> Path:
    """A finished run folder as compare reads it: config.json (name, tasks, arch) and metrics.json."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name, "tasks": tasks, "model": {"arch": arch}}))
    (folder / "metrics.json").write_text(json.dumps({"results": {"val": metrics}}))
    return folder


def test_compare_partial_delta_and_a_dashed_arch(tmp_path):
    tasks = ["semseg", "depth", "normals"]
    stl = {"semseg/miou": 0.5, "depth/rmse": 4.0, "normals/mean": 20.0, "normals/mean_pooled": 20.0}
    padnet = {"semseg/miou": 0.55, "depth/rmse": 3.0, "normals/mean": 30.0, "normals/mean_pooled": 30.0}
    runs = [
        fake_run(tmp_path / "a", "synthia-stl", "stl", tasks, stl),
        fake_run(tmp_path / "b", "synthia-3ways-padnet", "3ways-padnet", tasks, padnet),
    ]
    full = compare.main([str(r) for r in runs])  # the STL baseline is found for a dashed arch name
    sd = compare.main([*map(str, runs), "--tasks", "semseg,depth"])
    row = {line.split("|")[1].strip(): line for line in full.splitlines()[2:]}["synthia-3ways-padnet"]
    row_sd = {line.split("|")[1].strip(): line for line in sd.splitlines()[2:]}["synthia-3ways-padnet"]
    expected_full = multitask_delta(padnet, stl, ["semseg/miou", "depth/rmse", "normals/mean"])
    expected_sd = multitask_delta(padnet, stl, ["semseg/miou", "depth/rmse"])
    assert row.rstrip(" |").endswith(f"{expected_full:.4f}") and row_sd.rstrip(" |").endswith(
        f"{expected_sd:.4f}"
    )
    assert expected_sd != expected_full
