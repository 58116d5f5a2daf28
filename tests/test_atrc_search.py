"""ATRC's context-type search: Gumbel-softmax weights, the supernet's mixing and freezing, the entropy weight
schedule, a frozen choice across a checkpoint resume, and the search recipe on toy data writing a JSON the
training recipes accept."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from uda.config import ContextSearchConfig, ModelConfig
from uda.models.atrc import (
    CONTEXTS,
    SEARCH,
    ATRCModule,
    context_entropy,
    gumbel_softmax_weights,
    resolve_contexts,
    search_modules,
)
from uda.models.multitask import build_model
from uda.objectives.context_search import CONTEXTS_FILE, entropy_weight

REPO = Path(__file__).resolve().parent.parent


def test_gumbel_weights_sum_to_one_and_concentrate_as_temperature_falls():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5)
    for t in (10.0, 1.0, 0.1):
        w = gumbel_softmax_weights(logits, t)
        assert w.shape == logits.shape and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 4))
    # Same noise, falling temperature: the largest weight grows towards 1 (one-hot).
    peaks = []
    for t in (5.0, 1.0, 0.1, 0.01):
        torch.manual_seed(1)
        peaks.append(gumbel_softmax_weights(logits, t).max(-1).values.min().item())
    assert peaks == sorted(peaks) and peaks[-1] > 0.99, peaks
    # Without noise: softmax(logits / t); uniform logits give uniform weights.
    torch.testing.assert_close(
        gumbel_softmax_weights(torch.zeros(5), 0.5, noise=False), torch.full((5,), 0.2)
    )
    with pytest.raises(ValueError):
        gumbel_softmax_weights(logits, 0.0)


def test_entropy_weight_goes_from_negative_to_positive():
    ws = [entropy_weight(s, 100, -0.1, 0.1) for s in range(100)]
    assert ws[0] == pytest.approx(-0.1) and ws[-1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(ws, ws[1:]))
    assert ws[49] < 0 < ws[50]
    d = ContextSearchConfig()
    assert d.weight_start < 0 < d.weight_end and 0 < d.threshold < float(torch.log(torch.tensor(5.0)))


def test_supernet_mixes_freezes_and_reports_its_choice():
    torch.manual_seed(0)
    tasks = ("semseg", "depth")
    module = ATRCModule(tasks, None, 8, temperature=1.0)
    assert (
        module.search and module.alpha.shape == (2, 2, 5) and module.frozen.tolist() == [[-1, -1], [-1, -1]]
    )
    assert all(set(module.cp[t][s].contexts) == set(CONTEXTS) - {"none"} for t in tasks for s in tasks)
    assert "frozen" in module.state_dict()
    feats = {t: torch.randn(2, 8, 6, 6) for t in tasks}
    probs = {t: torch.softmax(torch.randn(2, 3, 36), -1) for t in tasks}
    out = module(feats, probs)
    assert {t: o.shape for t, o in out.items()} == {t: (2, 8, 6, 6) for t in tasks}
    # alpha gets a gradient through the mixture (the fusion's BN starts at zero: open it first).
    for t in tasks:
        torch.nn.init.ones_(module.fuse[t][1].weight)
    sum(o.sum() for o in module(feats, probs).values()).backward()
    assert module.alpha.grad is not None and module.alpha.grad.abs().sum() > 0
    # Uniform alpha: entropy ln 5; nothing freezes below 0.3 nats.
    torch.testing.assert_close(
        module.block_entropy(), torch.full((2, 2), float(torch.log(torch.tensor(5.0))))
    )
    assert module.freeze(0.3) == []
    assert context_entropy(torch.tensor([30.0, 0, 0, 0, 0])).item() < 1e-9
    with torch.no_grad():
        module.alpha[0, 1, CONTEXTS.index("local")] = 10.0  # semseg <- depth: local, H ~ 0.002
        module.alpha[1, 0, CONTEXTS.index("slabel")] = 0.5  # depth <- semseg: argmax slabel, still searching
    assert module.freeze(0.3) == [("semseg", "depth", "local")]
    assert module.frozen.tolist() == [[-1, CONTEXTS.index("local")], [-1, -1]]
    # A frozen block uses its context alone: alpha moving afterwards changes nothing there.
    with torch.no_grad():
        module.alpha[0, 1].zero_()
    chosen = module.chosen_contexts()
    assert chosen["semseg"]["depth"] == "local" and chosen["depth"]["semseg"] == "slabel"
    module.eval()
    a = module.fused(feats, probs, "semseg")
    with torch.no_grad():
        module.alpha[0, 1, 0] = 5.0
    torch.testing.assert_close(module.fused(feats, probs, "semseg"), a)


@pytest.mark.parametrize("arch", ["atrc", "atrc-fpm"])
def test_search_model_has_aux_heads_for_every_task(arch):
    cfg = ModelConfig(arch=arch, backbone="hrnetv2-w18-small", pretrained=False, atrc_contexts=SEARCH)
    model = build_model(cfg, {"semseg": 5, "depth": 1})
    assert set(model.atrc.aux) == {"semseg", "depth"}
    assert len(search_modules(model)) == 1
    out = model.eval()(torch.rand(1, 3, 32, 64))
    assert {"aux", 0} <= set(out["semseg"]) and {"aux", 0} <= set(out["depth"])
    with pytest.raises(ValueError, match="search"):
        resolve_contexts(SEARCH, ("semseg", "depth"))


@pytest.fixture
def one_thread(monkeypatch):
    """The Trainer's CPU threads at 1 (UDA_THREADS): HRNet steps on a loaded 2-core machine run several times
    faster than with 2 contending threads; the process's thread count is restored after the test."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("UDA_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def _search_config(toy_root, out, **train):
    from tests.conftest import tiny_config
    from uda.cli import model_defaults

    cfg = tiny_config(toy_root, out, arch="atrc", tasks=("semseg", "depth"), deterministic=False, **train)
    model = replace(cfg.model, backbone="hrnetv2-w18-small", atrc_contexts=SEARCH)
    cfg = replace(
        cfg,
        model=model,
        data=replace(cfg.data, size=(32, 64), batch_size=1),
        train=replace(cfg.train, val_batches=1),
        context_search=ContextSearchConfig(),
    )
    return model_defaults(cfg)


def test_frozen_choice_survives_resume(toy_root, tmp_path, fresh_accelerator, one_thread):
    """A block frozen during the run is frozen after a resume from the checkpoint (the model's buffer), and
    the search objective's terms are logged; the chosen contexts are written at each checkpoint."""
    from tests.conftest import train_steps
    from uda.engine import Trainer

    cfg = _search_config(toy_root, tmp_path / "run", iterations=4)
    cfg = replace(cfg, optim=replace(cfg.optim, lr_architecture=0.05))
    first = Trainer(cfg)
    (module,) = search_modules(first.accelerator.unwrap_model(first.model))
    # alpha alone in its own optimiser group, at optim.lr_architecture
    owners = [g for g in first.optimizer.param_groups if any(p is module.alpha for p in g["params"])]
    assert len(owners) == 1 and len(owners[0]["params"]) == 1 and owners[0]["lr"] == 0.05
    with torch.no_grad():  # one block decided before the run: frozen after the first step
        module.alpha[1, 0, CONTEXTS.index("tlabel")] = 10.0
    rows = train_steps(first, 2)
    assert module.frozen[1, 0].item() == CONTEXTS.index("tlabel")
    assert (module.frozen >= 0).sum().item() == 1
    assert rows[0]["context_search/weight"] == pytest.approx(-0.1) and rows[1]["context_search/weight"] < 0
    assert [r["context_search/frozen"] for r in rows] == [1, 1]
    assert 0 < rows[0]["context_search/entropy"] <= float(torch.log(torch.tensor(5.0))) + 1e-6
    first.save_checkpoint()
    saved = json.loads((tmp_path / "run" / CONTEXTS_FILE).read_text())
    assert saved == module.chosen_contexts() and saved["depth"]["semseg"] == "tlabel"

    resumed = Trainer(cfg)
    (again,) = search_modules(resumed.accelerator.unwrap_model(resumed.model))
    assert (again.frozen < 0).all()  # a fresh model before loading the checkpoint
    assert resumed.load_checkpoint() is not None and resumed.step == 2
    assert torch.equal(again.frozen, module.frozen)
    rows = train_steps(resumed, 1)
    assert rows[0]["context_search/weight"] > 0  # step 2 of 4: past the middle of the schedule
    assert again.frozen[1, 0].item() == CONTEXTS.index("tlabel")


def test_search_recipe_on_toy_data_writes_contexts_the_training_recipe_accepts(
    toy_root, tmp_path, fresh_accelerator, one_thread, capsys, monkeypatch
):
    import runpy

    out = tmp_path / "search"
    common = [
        "--toy",
        "--data-root",
        str(toy_root),
        "data.size=32,64",
        "data.num_workers=0",
        "data.batch_size=1",
    ]
    argv = [*common, "--out", str(out), "--tasks", "SD", "train.iterations=3", "train.log_every=1"]
    monkeypatch.setattr(sys, "argv", ["atrc_search.py", *argv])
    runpy.run_path(str(REPO / "recipes" / "atrc_search.py"), run_name="__main__")
    rows = [json.loads(line) for line in (out / "train_losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["context_search/weight"] < 0 < rows[-1]["context_search/weight"]
    path = out / CONTEXTS_FILE
    contexts = json.loads(path.read_text())
    assert set(contexts) == {"semseg", "depth"}
    assert resolve_contexts(str(path), ("semseg", "depth")) == contexts
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["atrc_contexts"] == SEARCH and config["model"]["backbone"] == "hrnetv2-w18-small"
    assert config["optim"]["lr_architecture"] == 0.05  # --toy: alpha must move within a toy schedule

    # The training recipe takes it (config check, --print-config: nothing is trained).
    from uda.cli import base_parser, main, supervised_config

    capsys.readouterr()
    build = supervised_config("nyudv2", "nyudv2_40", (448, 576), "SDNE")
    retrain = [*common, "--tasks", "SD", "--model", "atrc", "model.backbone=hrnetv2-w18-small"]
    main(build, base_parser("t"), "nyudv2", [*retrain, f"model.atrc_contexts={path}", "--print-config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["atrc_contexts"] == str(path) and printed["context_search"] is None
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"semseg": {"semseg": "global"}}))
    with pytest.raises(SystemExit) as exc:
        main(build, base_parser("t"), "nyudv2", [*retrain, f"model.atrc_contexts={bad}", "--print-config"])
    assert exc.value.code == 2
    # The search recipe is ATRC's only.
    with pytest.raises(SystemExit) as exc:
        runpy_main = runpy.run_path(str(REPO / "recipes" / "atrc_search.py"))["main"]
        runpy_main([*common, "--model", "mtl", "--print-config"])
    assert exc.value.code == 2
