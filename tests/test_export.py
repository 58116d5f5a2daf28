"""Export: a trained run's model as weights-only safetensors plus its config, loaded back in two lines with the
run's outputs."""

import json

import torch

from tests.conftest import tiny_config
from uda.commands.export import main as export_main
from uda.engine import Trainer
from uda.models import load_pretrained


def assert_same_outputs(model, run_model, x) -> None:
    """The exported model's outputs equal the run's, bit for bit, at every task and scale."""
    with torch.no_grad():
        ours, theirs = model(x), run_model(x)
    for task in ours:
        for scale in ours[task]:
            assert torch.equal(ours[task][scale], theirs[task][scale]), (task, scale)


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
    assert_same_outputs(model, run_model, x)

    assert export_main([str(tmp_path / "missing"), str(tmp_path / "x")]) == 1
    assert "missing" in capsys.readouterr().err


def test_exported_atrc_loads_without_its_normal_clusters_file(toy_root, tmp_path, fresh_accelerator):
    """The normals' centroids of an ATRC label context are in the exported weights: loading needs no
    model.normal_clusters file (the folder is shared, the file stays on the training machine)."""
    from dataclasses import replace

    from uda.cli import model_defaults

    clusters = tmp_path / "clusters.json"
    clusters.write_text(json.dumps({"centroids": [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, -1]]}))
    cfg = tiny_config(toy_root, tmp_path / "run", arch="atrc", tasks=("semseg", "normals"), iterations=1)
    model_cfg = replace(
        cfg.model, backbone="hrnetv2-w18-small", atrc_contexts="tlabel", normal_clusters=str(clusters)
    )
    cfg = model_defaults(replace(cfg, model=model_cfg, data=replace(cfg.data, size=(32, 64))))
    trainer = Trainer(cfg)
    trainer.fit()
    assert export_main([str(tmp_path / "run"), str(tmp_path / "export")]) == 0
    clusters.unlink()

    model = load_pretrained(tmp_path / "export")
    run_model = trainer.accelerator.unwrap_model(trainer.model).eval()
    assert torch.equal(model.atrc.normal_centroids, run_model.atrc.normal_centroids)
    x = torch.rand(1, 3, 32, 64)
    assert_same_outputs(model, run_model, x)
