"""Permutation feature importance (ATRC §4.4): the shuffled block output is exactly that of the permuted image,
an unused block is worth 0, and uda-context-importance runs on a trained ATRC run."""

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from uda.importance import OutputSwap, permutation_importance, random_permutation


class Images(Dataset):
    """n random 'images' [3,4,4] with a depth label [1,4,4]."""

    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 4, 4, generator=g)
        self.depth = torch.rand(n, 1, 4, 4, generator=g) + 1.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "depth": self.depth[i]}


class TwoBlocks(nn.Module):
    """depth = 1 + |used(x)| + 0 * unused(x): one block the prediction depends on, one it ignores."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 1, 1)
        self.unused = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return 1.0 + self.used(x).abs() + 0.0 * self.unused(x)


def rmse_evaluate(model):
    def evaluate(batches) -> dict[str, float]:
        with torch.no_grad():
            errors = [((model(b["image"]) - b["depth"]) ** 2).flatten() for b in batches]
        return {"depth/rmse": float(torch.cat(errors).mean().sqrt())}

    return evaluate


def loader(dataset):
    return DataLoader(dataset, batch_size=4)  # 6 images: batches of 4 and 2


def test_shuffled_output_is_the_permuted_images_and_unused_blocks_are_worth_nothing():
    torch.manual_seed(0)
    model, data = TwoBlocks(), Images()
    result = permutation_importance(
        model,
        {"used": model.used, "unused": model.unused},
        data,
        rmse_evaluate(model),
        loader,
        repeats=2,
        seed=3,
    )
    intact = result["intact"]["depth/rmse"]
    with torch.no_grad():  # by hand: image i gets used(x_pi(i))
        for r, drop in enumerate(result["blocks"]["used"]["drops"]):
            perm = random_permutation(len(data), 3 + r)
            pred = 1.0 + model.used(data.images[perm]).abs()
            rmse = float(((pred - data.depth) ** 2).mean().sqrt())
            assert drop == pytest.approx(-100 * -(rmse - intact) / intact, rel=1e-5)
    assert result["blocks"]["unused"]["drops"] == [0.0, 0.0]
    assert result["blocks"]["used"]["mean"] > 0  # shuffling what the prediction depends on hurts it
    mean = result["blocks"]["used"]["mean"]
    assert result["blocks"]["used"]["std"] == pytest.approx(
        math.sqrt(sum((d - mean) ** 2 for d in result["blocks"]["used"]["drops"]))  # n - 1 = 1
    )
    # The hooks are gone afterwards.
    x = data.images[:2]
    assert torch.equal(model(x), 1.0 + model.used(x).abs())


def test_output_swap_refuses_a_missing_capture():
    block = nn.Conv2d(3, 1, 1)
    swap = OutputSwap({"b": block})
    swap.mode, swap.key = "swap", "b"
    with pytest.raises(RuntimeError, match="no captured output"):
        block(torch.rand(1, 3, 2, 2))
    swap.remove()


def test_permutations_are_seeded_and_leave_torch_rng_alone():
    state = torch.get_rng_state()
    assert random_permutation(10, 1) == random_permutation(10, 1)
    assert sorted(random_permutation(10, 2)) == list(range(10))
    assert random_permutation(10, 1) != random_permutation(10, 2)
    assert torch.equal(state, torch.get_rng_state())


def test_command_on_a_trained_atrc_run(toy_root, tmp_path, fresh_accelerator, capsys):
    """Two training steps of ATRC (global self, local and T-label cross contexts, one 'none') with a normals
    clusters file that is deleted after training (the run's copy replaces it), then the tool: one entry per CP
    block, every file written, the intact metrics those of the run's protocol."""
    from dataclasses import replace

    from tests.conftest import tiny_config
    from uda.cli import model_defaults
    from uda.commands.context_importance import main
    from uda.engine import Trainer
    from uda.evaluate import load_trained_model
    from uda.models.atrc import write_contexts

    tasks = ("semseg", "normals")
    contexts = write_contexts(
        {
            "semseg": {"semseg": "global", "normals": "local"},
            "normals": {"semseg": "none", "normals": "tlabel"},
        },
        tmp_path / "contexts.json",
    )
    clusters = tmp_path / "clusters.json"
    centroids = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]
    clusters.write_text(json.dumps({"centroids": centroids}))
    cfg = tiny_config(toy_root, tmp_path / "run", arch="atrc", tasks=tasks, iterations=2, deterministic=False)
    cfg = replace(
        cfg,
        model=replace(
            cfg.model,
            backbone="hrnetv2-w18-small",
            atrc_contexts=str(contexts),
            normal_clusters=str(clusters),
        ),
        data=replace(cfg.data, size=(32, 64)),
    )
    Trainer(model_defaults(cfg)).fit()
    clusters.unlink()
    _, model, _ = load_trained_model(tmp_path / "run")
    assert model.atrc.normal_centroids.tolist() == centroids
    capsys.readouterr()
    assert main([str(tmp_path / "run"), "--repeats", "2", "--quiet", "--out", str(tmp_path / "imp")]) == 0
    result = json.loads((tmp_path / "imp" / "importance.json").read_text())
    assert set(result["blocks"]) == {"semseg<-semseg", "semseg<-normals", "normals<-normals"}
    assert all(
        len(b["drops"]) == 2 and all(math.isfinite(d) for d in b["drops"]) for b in result["blocks"].values()
    )
    assert {"semseg/miou", "normals/mean"} <= set(result["intact"])
    table = (tmp_path / "imp" / "importance.md").read_text()
    assert "| normals | - |" in table  # normals <- semseg has no block
    assert (tmp_path / "imp" / "importance.png").stat().st_size > 0


def test_command_refuses_a_model_without_cp_blocks(tmp_path, capsys, monkeypatch):
    """An MTL model (no ATRC module) is refused in one line naming the arch (the run is stubbed: loading a
    real run is covered above)."""
    from uda import evaluate
    from uda.commands.context_importance import main
    from uda.config import ExperimentConfig, ModelConfig

    cfg = ExperimentConfig(model=ModelConfig(arch="mtl"))
    monkeypatch.setattr(evaluate, "find_checkpoint", lambda path: path)
    monkeypatch.setattr(evaluate, "load_trained_model", lambda path: (cfg, TwoBlocks(), path))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "mtl")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.arch=mtl has no fixed CP blocks" in err, err
