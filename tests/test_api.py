"""The public API: `import uda` stays light, every documented name resolves, and README's Python API snippets
run as written (on the toy data and a temporary run folder)."""

import re
import subprocess
import sys
from pathlib import Path

import uda

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_snippets() -> list[str]:
    """The fenced Python blocks of README's "Python API" section."""
    text = README.read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_import_uda_loads_no_torch_and_every_public_name_resolves():
    code = "import sys, uda; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    for name in uda.__all__:
        assert getattr(uda, name) is not None, name


def test_readme_python_snippets_run(toy_root, tmp_path):
    blocks = python_api_snippets()
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        block = block.replace("datasets/toy", str(toy_root)).replace("runs/", f"{tmp_path}/")
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["refined"]["semseg"].shape == (2, 64, 16, 32)
    assert namespace["depth_to_semseg"].shape == (2, 64, 16, 32)
    assert 0 <= namespace["seg"].compute()["miou"] <= 1
    assert namespace["outputs"]["semseg"][0].shape == (1, 16, 64, 128)
    assert (tmp_path / "python-api" / "report.md").is_file()
