"""uda-model-stats: parameter counts against ATRC's Table 1, the multiply-add counter, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda.commands import model_stats
from uda.commands.model_stats import REFERENCES, count_macs, main

REPO = Path(__file__).resolve().parent.parent
NYUD = ("semseg", "depth", "normals", "edges")
ATRC = REFERENCES["atrc-nyud"]["rows"]


@pytest.mark.parametrize("arch", ["stl", "mtl", "cross-stitch", "padnet", "pap-net"])
def test_parameter_counts_match_atrc_table_1(arch):
    row = model_stats.model_stats(arch, "hrnetv2-w18-small", NYUD, 40, size=None)
    if row["status"] != "ok":
        pytest.skip(f"{arch} does not build in this version: {row['reason']}")
    assert row["params"] == row["backbone"] + row["rest"]
    assert row["backbone"] > 0 and row["rest"] > 0
    assert row["params"] / 1e6 == pytest.approx(ATRC[arch][0], rel=0.05)
    assert "gmacs" not in row


def test_macs_of_a_convolution_and_a_linear_layer_are_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    x = torch.rand(2, 3, 10, 12)
    out = conv(x)
    assert count_macs(lambda: conv(x)) == out.numel() * 3 * 3 * 3  # per output: in_channels x 3 x 3
    linear = nn.Linear(5, 7)
    v = torch.rand(4, 5)
    assert count_macs(lambda: linear(v)) == 4 * 5 * 7


def test_macs_of_attention_follow_the_formula():
    b, h, nq, nk, d, dv = 2, 3, 5, 7, 4, 6
    q, k, v = torch.rand(b, h, nq, d), torch.rand(b, h, nk, d), torch.rand(b, h, nk, dv)
    # Q K^T: nq x nk dot products of length d; the weights times V: nq x dv of length nk.
    assert count_macs(lambda: F.scaled_dot_product_attention(q, k, v)) == b * h * nq * nk * (d + dv)


def test_model_macs_scale_with_the_pixels():
    small = model_stats.model_stats("mtl", "hrnetv2-w18-small", ("semseg", "depth"), 40, size=(64, 64))
    wide = model_stats.model_stats("mtl", "hrnetv2-w18-small", ("semseg", "depth"), 40, size=(64, 128))
    assert small["status"] == wide["status"] == "ok"
    assert small["gmacs"] > 0
    assert wide["gmacs"] == pytest.approx(2 * small["gmacs"], rel=1e-9)


def test_benchmark_uses_the_same_counter():
    sys.path.insert(0, str(REPO / "tools"))
    import benchmark

    assert benchmark.count_macs is count_macs


def test_cli_writes_json_and_markdown_with_the_parameter_count(tmp_path, capsys):
    out, md = tmp_path / "stats.json", tmp_path / "stats.md"
    args = ["--archs", "mtl", "--no-macs", "--reference", "atrc-nyud", "--json", str(out)]
    assert main([*args, "--markdown", str(md)]) == 0
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["arch"] == "mtl" and row["status"] == "ok"
    assert row["params"] / 1e6 == pytest.approx(4.52, rel=0.05)
    assert row["ref_params_m"] == 4.52 and "gmacs" not in row
    assert row["params_diff_pct"] == pytest.approx(100 * (row["params"] / 1e6 / 4.52 - 1))
    assert doc["settings"] == {
        "backbone": "hrnetv2-w18-small",
        "tasks": list(NYUD),
        "classes": 40,
        "size": None,
        "reference": "atrc-nyud",
    }
    printed = capsys.readouterr().out
    assert f"| mtl | {row['params'] / 1e6:.3f} |" in printed
    assert md.read_text().splitlines()[2].startswith("| mtl |")


def test_an_arch_not_buildable_on_the_backbone_is_skipped_with_its_reason(capsys):
    assert main(["--archs", "3ways-padnet", "mtl", "--tasks", "SD", "--no-macs"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert not any("3ways-padnet" in line for line in table)
    assert "skipped 3ways-padnet (cannot be built on hrnetv2-w18-small): " in out
    assert "dilated ResNet" in out


@pytest.mark.parametrize("missing", [ImportError("No module named 'uda.models.future'"), KeyError("pap")])
def test_an_arch_whose_code_is_missing_is_not_available(missing, monkeypatch, capsys):
    def build_model(cfg, tasks):
        raise missing

    monkeypatch.setattr("uda.models.build_model", build_model)
    assert main(["--archs", "pap-net", "--no-macs"]) == 0
    out = capsys.readouterr().out
    assert "| pap-net | n/a (not available) |" in out


def test_help_answers_without_importing_torch():
    code = (
        "import sys\n"
        "from uda.commands.model_stats import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "uda-model-stats" in done.stdout and "--reference" in done.stdout
    shim = subprocess.run(
        [sys.executable, str(REPO / "tools" / "model_stats.py"), "--help"], capture_output=True, text=True
    )
    assert shim.returncode == 0 and "--no-macs" in shim.stdout
    wrong = subprocess.run(
        [sys.executable, str(REPO / "tools" / "model_stats.py"), "--archs", "nonet"],
        capture_output=True,
        text=True,
    )
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: unknown arch nonet")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--archs", "mtl", "nonet"], "unknown arch nonet; choose among stl, mtl, padnet"),
        (["--backbone", "vgg16"], "unknown backbone vgg16; choose one of resnet18"),
        (["--tasks", "SX"], "--tasks SX: distinct letters"),
        (["--reference", "paper"], "unknown reference paper; choose one of atrc-nyud"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, says, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0]


def test_searched_atrc_row_is_counted_from_the_search_file(tmp_path):
    """atrc-searched is n/a without a file; with one, it is counted from it: an all-global file gives the
    atrc-global count, one T-label block a count between all-global and all-T-label (one aux head more)."""
    from uda.models.atrc import write_contexts

    tasks = ("semseg", "depth")
    assert model_stats.model_stats("atrc-searched", "hrnetv2-w18-small", tasks, 40, None)["status"] == "n/a"
    contexts = {t: dict.fromkeys(tasks, "global") for t in tasks}
    same = write_contexts(contexts, tmp_path / "global.json")
    glob = model_stats.model_stats("atrc-global", "hrnetv2-w18-small", tasks, 40, None)
    row = model_stats.model_stats("atrc-searched", "hrnetv2-w18-small", tasks, 40, None, str(same))
    assert row["status"] == "ok" and row["params"] == glob["params"]
    contexts["depth"]["semseg"] = "tlabel"
    mixed = write_contexts(contexts, tmp_path / "mixed.json")
    row = model_stats.model_stats("atrc-searched", "hrnetv2-w18-small", tasks, 40, None, str(mixed))
    tlabel = model_stats.model_stats("atrc-tlabel", "hrnetv2-w18-small", tasks, 40, None)
    assert glob["params"] < row["params"] < tlabel["params"]
