"""The recipes' command line: user errors found before anything is built end with one line and a non-zero exit
and create no run folder; --config rebuilds a run's config; --print-config; --help lists the config keys."""

import json

import pytest

from tests.conftest import TINY_OVERRIDES
from uda import cli
from uda.adaptation import adaptation_config, adaptation_parser
from uda.config import ExperimentConfig, from_dict, load_config, save_config, to_dict
from uda.data.decode import DataError

TINY = [o for o in TINY_OVERRIDES if not o.startswith("train.mixed_precision")]
ADAPT = lambda args: adaptation_config(args, "synthia", "synthia16", "cityscapes16")  # noqa: E731


def recipe(argv):
    """Run the synthia2cityscapes recipe in-process; (exit code, stderr lines); training must not start."""
    return cli.main(ADAPT, adaptation_parser("test"), "synthia2cityscapes", [str(a) for a in argv])


@pytest.fixture
def no_training(monkeypatch):
    def refuse(cfg, resume):
        raise AssertionError("the run started")

    monkeypatch.setattr(cli, "run", refuse)


@pytest.fixture
def roots(tmp_path):
    """A data root with (empty) dataset folders: enough for the config, not for the data checks."""
    root = tmp_path / "data"
    for name in ("synthia", "cityscapes"):
        (root / name).mkdir(parents=True)
    return root


def one_line_exit(capsys, argv, code=1):
    with pytest.raises(SystemExit) as info:
        recipe(argv)
    assert info.value.code == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_data_root(tmp_path, capsys, no_training):
    out = tmp_path / "run"
    line = one_line_exit(capsys, ["--data-root", tmp_path / "nothere", "--out", out])
    assert line == (
        f"error: {tmp_path / 'nothere'}: no synthia folder here; --data-root names the folder holding the dataset "
        "folders (e.g. datasets/ with datasets/synthia/ inside); see datasets/synthia/README.md for how to obtain it"
    )
    assert not out.exists()


def test_model_that_does_not_fit_the_backbone(roots, tmp_path, capsys, no_training):
    """Found while building the config (exit 2), before the data is looked at: arch and backbone, aux tasks."""
    out = tmp_path / "run"
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out, "--model", "mti-net"], code=2)
    assert line.startswith(
        "error: model.arch=mti-net works across the scales of a multi-scale backbone; set "
    ), line
    argv = ["--data-root", roots, "--out", out, "--model", "mti-net", "model.backbone=hrnetv2-w18-small"]
    line = one_line_exit(capsys, [*argv, "model.aux_tasks=normals"], code=2)
    assert (
        line
        == "error: model.aux_tasks ['normals'] are not tasks of this run ('semseg', 'depth'); remove them"
    )
    assert not out.exists()


def test_target_label_set_with_other_classes(roots, tmp_path, capsys, no_training):
    """A target whose class list differs from the source's would shift class ids silently: refused (exit 2),
    from the recipe options and from a --config file alike; the same classes under another name pass."""
    out = tmp_path / "run"
    line = one_line_exit(
        capsys, ["--data-root", roots, "--out", out, "target.label_set=cityscapes19"], code=2
    )
    assert line.startswith(
        "error: data.label_set=synthia16 (16 classes) and target.label_set=cityscapes19 (19 classes) do not "
        "list the same classes in the same order; choose label sets with the same class list"
    ), line
    assert not out.exists()
    (tmp_path / "c.json").write_text(
        json.dumps(printed(capsys, ["--data-root", roots, "--out", out, "data.label_set=cityscapes16"]))
    )
    line = one_line_exit(capsys, ["--config", tmp_path / "c.json", "target.label_set=cityscapes13"], code=2)
    assert "target.label_set=cityscapes13 (13 classes)" in line


def test_dataset_folder_without_its_layout(roots, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out])
    assert f"{roots / 'synthia'}: synthia not found (no RGB/ folder)" in line
    assert not out.exists()


def test_missing_split_file(roots, tmp_path, capsys, no_training):
    (roots / "synthia" / "RGB").mkdir()
    out = tmp_path / "run"
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out, "data.train_split=nope"])
    assert "no split 'nope' for synthia" in line
    assert not out.exists()


def test_imagenet_weights_unavailable_offline(roots, tmp_path, capsys, monkeypatch, no_training):
    import torch

    monkeypatch.setattr(cli, "check_data", lambda cfg: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, progress=True):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    out = tmp_path / "run"
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out, "model.backbone=resnet18"])
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert line.startswith(f"error: {expected}: resnet18 ImageNet weights missing and not downloadable")
    assert "model.pretrained=false" in line and "TORCH_HOME" in line
    assert not out.exists()
    line = one_line_exit(
        capsys, ["--data-root", roots, "--out", out, f"model.weights_path={tmp_path / 'w.pth'}"]
    )
    assert line.startswith(f"error: {tmp_path / 'w.pth'}: no such file (model.weights_path)")


def test_resume_of_a_folder_without_checkpoints(roots, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out, "--resume"])
    assert line == (
        f"error: {out}: no checkpoint to resume from (it holds config.json but no checkpoints/step-*/); "
        "check --out, or drop --resume to start a new run there"
    )
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_resume_of_the_same_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "logs").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"name": "x"}))
    cli.check_run_folder(out, resume=True, config={"name": "x"})  # `make demo` again after an early Ctrl-C
    assert "starting it over" in capsys.readouterr().err
    with pytest.raises(cli.PreflightError, match="no checkpoint to resume from"):
        cli.check_run_folder(out, resume=True, config={"name": "y"})


def test_resume_with_a_mistyped_out(roots, tmp_path, capsys, no_training):
    (tmp_path / "runs" / "depth").mkdir(parents=True)
    line = one_line_exit(capsys, ["--data-root", roots, "--out", tmp_path / "runs" / "dpeth", "--resume"])
    assert f"no such run folder (did you mean {tmp_path / 'runs' / 'depth'}?)" in line
    line = one_line_exit(capsys, ["--data-root", roots, "--out", tmp_path / "elsewhere" / "run", "--resume"])
    assert f"its parent {tmp_path / 'elsewhere'} does not exist" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]


def test_resume_starts_a_new_run_when_the_folder_does_not_exist(tmp_path, capsys):
    cli.check_run_folder(tmp_path / "new", resume=True)
    cli.check_run_folder(
        cli.REPO_ROOT / "runs" / "not-yet" / "demo", resume=True
    )  # `make demo` on a new clone
    assert "starts a new run there" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_fresh_run_into_a_folder_with_checkpoints_keeps_its_config(roots, tmp_path, capsys, no_training):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    (out / "config.json").write_text("old")
    line = one_line_exit(capsys, ["--data-root", roots, "--out", out])
    assert "holds checkpoints of an earlier run (newest step-4); pass --resume" in line
    assert (out / "config.json").read_text() == "old"


def test_debug_shows_the_traceback(tmp_path, monkeypatch, no_training):
    with pytest.raises(DataError):
        recipe(["--data-root", tmp_path / "nothere", "--debug"])
    monkeypatch.setenv("UDA_DEBUG", "1")
    with pytest.raises(DataError):
        recipe(["--data-root", tmp_path / "nothere"])


def test_valid_toy_data_passes_the_checks(toy_root, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(cli, "run", lambda cfg, resume: started.append(cfg))
    recipe(["--data-root", toy_root, "--out", tmp_path / "run", *TINY_OVERRIDES, "target.num_workers=0"])
    assert started and started[0].data.root == str(toy_root / "synthia")
    assert not (tmp_path / "run").exists()  # the engine creates it


# ----------------------------------------------------------------------------------------------- config files


def printed(capsys, argv) -> dict:
    capsys.readouterr()
    assert recipe([*argv, "--print-config"]) is None
    return json.loads(capsys.readouterr().out)


def test_config_round_trip(roots, tmp_path, capsys):
    argv = [
        "--data-root",
        roots,
        "--out",
        tmp_path / "run",
        "--model",
        "mtl",
        "--seed",
        "3",
        "--batch-size",
        "4",
    ]
    first = printed(capsys, [*argv, "--mixed-precision", "bf16", "--target-depth", "both", *TINY])
    assert first["data"]["batch_size"] == first["target"]["batch_size"] == 4
    assert first["train"]["mixed_precision"] == "bf16" and first["train"]["seed"] == 3
    cfg = from_dict(ExperimentConfig, first)
    assert to_dict(cfg) == first
    save_config(cfg, tmp_path / "config.json")  # as a run saves it
    assert printed(capsys, ["--config", tmp_path / "config.json"]) == first
    assert load_config(ExperimentConfig, tmp_path / "config.json") == cfg
    # Options and overrides apply on top of the file; the rest of it is kept.
    again = printed(
        capsys,
        ["--config", tmp_path / "config.json", "train.iterations=7", "--out", tmp_path / "b", "--seed", "5"],
    )
    assert again["train"].pop("iterations") == 7 and again["train"].pop("seed") == 5
    assert again.pop("out") == str(tmp_path / "b")
    expected = json.loads(json.dumps(first))
    del expected["train"]["iterations"], expected["train"]["seed"], expected["out"]
    assert again == expected


def test_config_yaml(roots, tmp_path, capsys):
    yaml = pytest.importorskip("yaml")
    first = printed(capsys, ["--data-root", roots, "--out", tmp_path / "run"])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(first))
    assert printed(capsys, ["--config", tmp_path / "c.yaml"]) == first


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        ('{"train": {"iteration": 3}}', [], "c.json: unknown config key train.iteration (did you mean"),
        ('{"colour": 1}', [], "c.json: unknown config key colour"),
        ("{not json", [], "c.json: cannot read config"),
        ("{}", ["--model", "mtl"], "--model cannot be combined with --config"),
        ("{}", ["--no-adapt"], "--no-adapt cannot be combined with --config"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, capsys, content, argv, message):
    (tmp_path / "c.json").write_text(content)
    line = one_line_exit(capsys, ["--config", tmp_path / "c.json", *argv], code=2)
    assert message in line


def test_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit):
        recipe(["--help"])
    out = capsys.readouterr().out
    for text in (
        "--config FILE",
        "--print-config",
        "--batch-size N",
        "--mixed-precision",
        "--debug",
        "UDA_DEBUG",
    ):
        assert text in out
    assert (
        "train: iterations=40000" in out
        and "model: arch=mteb" in out
        and "adapt (if the recipe uses it)" in out
    )
