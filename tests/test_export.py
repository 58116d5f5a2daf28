"""Export: a trained run's model as weights-only safetensors plus its config, loaded back in two lines with the
run's outputs."""

import json

import torch

from tests.conftest import tiny_config
from uda.commands.export import main as export_main
from uda.engine import Trainer
from uda.models import load_pretrained


def test_exported_model_loads_with_the_runs_outputs(toy_root, tmp_path, capsys):
    trainer = Trainer(tiny_config(toy_root, tmp_path / "run", iterations=1, val_batches=1))
    trainer.fit()
    assert export_main([str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["tasks"] == ["semseg", "depth"] and config["step"] == 1 and len(config["class_names"]) == 16

    model = load_pretrained(tmp_path / "export")
    assert not model.training
    run_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    x = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        ours, theirs = model(x), run_model(x)
    for task in ours:
        for scale in ours[task]:
            assert torch.equal(ours[task][scale], theirs[task][scale]), (task, scale)

    assert export_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "missing" in capsys.readouterr().err
