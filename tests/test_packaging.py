"""Packaging: the wheel carries the catalogue and the console scripts and works outside the clone; every
tool's --help answers before torch is imported and states each option's default."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# The command modules of this package; uda-evaluate and uda-export are checked by their own tests.
COMMANDS = ("classmap", "check_dataset", "make_splits", "make_toy_data", "compare")


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so a subprocess sees only what its interpreter installs."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_console_scripts_and_shims_name_the_command_modules() -> None:
    expected = {f"uda-{c.replace('_', '-')}": f"uda.commands.{c}:main" for c in COMMANDS}
    assert expected.items() <= SCRIPTS.items()
    assert SCRIPTS["uda-evaluate"] == "uda.commands.evaluate:main"
    assert SCRIPTS["uda-export"] == "uda.commands.export:main"
    for command in COMMANDS:
        shim = (REPO / "tools" / f"{command}.py").read_text()
        assert f"from uda.commands.{command} import main" in shim


def test_help_answers_before_torch_is_imported() -> None:
    """Each command parses its arguments before importing torch (or the readers, models, metrics)."""
    code = (
        "import sys, importlib\n"
        f"for name in {COMMANDS!r}:\n"
        "    module = importlib.import_module('uda.commands.' + name)\n"
        "    try:\n"
        "        module.main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (name, e.code)\n"
        "    heavy = [m for m in ('torch', 'uda.data.readers', 'uda.metrics') if m in sys.modules]\n"
        "    assert not heavy, (name, heavy)\n"
        "print('ok')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("usage: uda-") == len(COMMANDS) and run.stdout.endswith("ok\n")


def render_default(value: object) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_with_its_real_default(command: str) -> None:
    parser = importlib.import_module(f"uda.commands.{command}").build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and len(action.help) > 10, f"{command} {name}: no help text"
        if action.option_strings and action.default not in (None, False):
            assert f"default: {render_default(action.default)}" in action.help, (
                f"{command} {name}: help does not state the default {action.default!r}"
            )
        if action.option_strings and action.default is None and not action.required:
            assert "default" in action.help, f"{command} {name}: help does not say what happens without it"


def test_wheel_installs_and_runs_outside_the_clone(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh venv with --no-deps (the dependencies come from this
    interpreter's site-packages through a .pth file, nothing is downloaded), and run it from another folder."""
    src = tmp_path / "src"  # a copy, so the build writes no build/ or egg-info into the clone
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "uda", src / "uda", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, src],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean_env(),
    )
    (wheel,) = wheels.glob("uda-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        check=True,
        capture_output=True,
        timeout=120,
        env=clean_env(),
    )
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "uda_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(a) for a in args], cwd=work, capture_output=True, text=True, timeout=60, env=clean_env()
        )
        assert done.returncode == 0, done.stderr
        return done

    help_text = run(env_dir / "bin" / "uda-classmap", "--help").stdout
    assert help_text.startswith("usage: uda-classmap") and "--label-set" in help_text
    for command in COMMANDS[1:]:
        script = f"uda-{command.replace('_', '-')}"
        assert run(env_dir / "bin" / script, "--help").stdout.startswith(f"usage: {script}")

    listing = run(env_dir / "bin" / "uda-classmap", "--dataset", "cityscapes").stdout
    assert listing.strip() == (
        "label sets for cityscapes: cityscapes13, cityscapes16, cityscapes19, cityscapes7, "
        "cityscapes7_densemtl, cityscapes8, cityscapes8_paper"
    )
    table = run(
        env_dir / "bin" / "uda-classmap", "--dataset", "synthia", "--label-set", "cityscapes16"
    ).stdout
    lines = table.splitlines()
    assert lines[0] == "synthia -> cityscapes16 (16 classes, 255 = ignore)"
    rows = {line.split()[0]: line for line in lines[2:]}
    assert "->     9  sky" in rows["1"] and "(70, 130, 180)" in rows["1"]
    assert "->   255  ignore" in rows["0"]

    # Every label set and mapping builds from the installed package, and the split files are there.
    code = (
        "import json, uda\n"
        "from uda.data.labels import CATALOGUE_DIR, DATASETS, LABEL_SETS, available_label_sets, get_class_map\n"
        "maps = {d: {s: get_class_map(d, s).label_set.num_classes for s in available_label_sets(d)} for d in DATASETS}\n"
        "splits = sorted(str(p.relative_to(CATALOGUE_DIR)) for p in CATALOGUE_DIR.glob('*/splits/*.txt'))\n"
        "print(json.dumps({'file': uda.__file__, 'label_sets': list(LABEL_SETS), 'maps': maps, 'splits': splits}))\n"
    )
    found = json.loads(run(python, "-c", code).stdout)
    assert Path(found["file"]).is_relative_to(site), found["file"]  # the wheel's uda, not the clone's
    assert len(found["label_sets"]) == len(list((REPO / "uda" / "catalogue" / "labelsets").glob("*.json")))
    assert found["maps"]["synthia"]["cityscapes16"] == 16 and found["maps"]["nyudv2"]["nyudv2_40"] == 40
    assert sum(len(m) for m in found["maps"].values()) == len(
        list((REPO / "uda" / "catalogue" / "mappings").glob("*.json"))
    )
    assert found["splits"] == [
        "synthia/splits/train.txt",
        "synthia/splits/val.txt",
        "vkitti2/splits/train.txt",
        "vkitti2/splits/val.txt",
    ]
