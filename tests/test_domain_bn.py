"""Per-domain BatchNorm statistics (train.bn_mode=domain, uda/models/domain_bn.py): which statistics each domain
moves and uses, loading states without them, the engine's target forwards, the self-training teacher, the
checkpoint and exact resume, and evaluation on the target with the target's statistics."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config, train_steps
from tests.test_self_training import network_states, recipe_config
from uda.models.domain_bn import (
    add_domain_statistics,
    bn_domain,
    estimate_target_statistics,
    has_domain_statistics,
)


def a_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)
    )


def stats(net: nn.Module, prefix: str = "") -> list[torch.Tensor]:
    return [b.clone() for n, b in net.named_buffers() if n.split(".")[-1].startswith(prefix + "running_")]


@torch.no_grad()
def test_each_domain_moves_and_uses_only_its_own_statistics():
    net = a_net()
    assert add_domain_statistics(net) == 2 and has_domain_statistics(net)
    assert add_domain_statistics(net) == 2  # idempotent: no second set
    source0, target0 = stats(net), stats(net, "target_")
    assert all(torch.equal(s, t) for s, t in zip(source0, target0))  # target starts as a copy of source
    x_source, x_target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 3 + 2
    net.train()
    with bn_domain(net, 1):
        net(x_target)
    assert all(torch.equal(a, b) for a, b in zip(stats(net), source0))  # source untouched
    moved = stats(net, "target_")
    assert all(not torch.equal(a, b) for a, b in zip(moved, target0))
    assert int(net[1].target_num_batches_tracked) == 1 and int(net[1].num_batches_tracked) == 0
    net(x_source)  # outside the block: the source statistics
    assert all(torch.equal(a, b) for a, b in zip(stats(net, "target_"), moved))
    assert all(not torch.equal(a, b) for a, b in zip(stats(net), source0))

    # Eval: the chosen domain's running statistics normalise, exactly as a plain network holding them would.
    net.eval()
    plain = a_net()
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if "target_" not in k})
    assert torch.equal(net(x_target), plain.eval()(x_target))
    for (n, _), (_, t) in zip(
        [(n, b) for n, b in plain.named_buffers() if "running_" in n],
        [(n, b) for n, b in net.named_buffers() if "target_running_" in n],
    ):
        plain.get_buffer(n).copy_(t)
    with bn_domain(net, 1):
        out_target = net(x_target)
        with bn_domain(net, 0):  # blocks nest: the inner domain wins, the outer comes back after it
            assert not torch.equal(net(x_target), out_target)
        assert torch.equal(net(x_target), out_target)
    assert torch.equal(out_target, plain(x_target))
    # The buffers are back in place after the block: the state dict names what it held before.
    assert all(torch.equal(a, b) for a, b in zip(stats(net, "target_"), moved))


def test_a_state_without_target_statistics_gives_its_source_statistics_to_both():
    trained = a_net()
    with torch.no_grad():
        trained(torch.randn(4, 3, 8, 8) * 2 + 1)  # moves the (only) statistics
    net = a_net()
    add_domain_statistics(net)
    net.load_state_dict(trained.state_dict())  # strict: the missing target keys come from the source ones
    for n, b in trained.named_buffers():
        head, _, leaf = n.rpartition(".")
        assert torch.equal(net.get_buffer(f"{head}.target_{leaf}"), b), n
    # A state that has them keeps them.
    with torch.no_grad(), bn_domain(net, 1):
        net.train()(torch.randn(4, 3, 8, 8))
    state = copy.deepcopy(net.state_dict())
    other = a_net()
    add_domain_statistics(other)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in state.items())


@torch.no_grad()
def test_untracked_forward_normalises_by_the_batch_and_keeps_the_running_statistics():
    """track=False (self-training's mixed images): same training-mode output, no statistic or counter moves;
    a model without target statistics (bn_mode=separate) keeps tracking as before."""
    net = a_net()
    add_domain_statistics(net)
    x = torch.randn(4, 3, 8, 8) * 2 + 1
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with bn_domain(net, 1, track=False):
        untracked = net(x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert net[1].momentum == 0.1
    with bn_domain(net, 1):
        assert torch.equal(net(x), untracked)
    assert int(net[1].target_num_batches_tracked) == 1
    plain = a_net()
    with bn_domain(plain, 1, track=False):
        plain(x)
    assert int(plain[1].num_batches_tracked) == 1


@torch.no_grad()
def test_target_statistics_are_measured_exactly_and_leave_the_random_stream_alone():
    net = a_net()
    add_domain_statistics(net)
    source = stats(net)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(3, 3, 8, 8, generator=g) * 2 + 1 for _ in range(4)]
    rng = torch.get_rng_state()
    assert estimate_target_statistics(net.eval(), batches) == 12
    assert torch.equal(torch.get_rng_state(), rng) and not net.training  # mode restored
    conv_out = [net[0](x) for x in batches]  # the first BatchNorm's inputs
    mean = torch.stack([y.mean((0, 2, 3)) for y in conv_out]).mean(0)
    var = torch.stack([y.transpose(0, 1).flatten(1).var(1) for y in conv_out]).mean(0)  # unbiased, per batch
    torch.testing.assert_close(net[1].target_running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].target_running_var, var, rtol=1e-5, atol=1e-6)
    assert int(net[1].target_num_batches_tracked) == 4 and net[1].momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(stats(net), source))  # source untouched


def test_a_model_without_target_statistics_ignores_the_domain():
    net = a_net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), bn_domain(net, 1):
        assert torch.equal(net(x), a_net().eval()(x))
    with pytest.raises(ValueError, match="domain must be 0"):
        with bn_domain(net, 2):
            pass


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("UDA_THREADS", "1")


def target_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".target_running_" in k}


def source_of(key: str) -> str:
    return key.replace(".target_running_", ".running_")


def test_self_training_run_keeps_target_statistics_resumes_and_evaluates_with_them(toy_root, tmp_path):
    """A source-only start, then self-training with bn_mode=domain from it: the target statistics start as the
    start's source statistics and only target images move them; the teacher averages them; checkpoint, exact
    resume, and evaluation on the target use them."""
    from uda.engine import Trainer
    from uda.evaluate import evaluate, load_trained_model

    start_cfg = tiny_config(toy_root, tmp_path / "start", iterations=1)
    start = Trainer(start_cfg)
    start.fit()
    assert not has_domain_statistics(start.model)  # no target images: one domain
    start_state = {k: v.clone() for k, v in start.model.state_dict().items()}

    cfg = recipe_config(
        toy_root,
        tmp_path / "run",
        "self-training",
        "train.bn_mode=domain",
        f"train.init_from={tmp_path / 'start'}",
    )
    # train.adabn_images=0: the start's source statistics serve both domains.
    plain = Trainer(replace(cfg, train=replace(cfg.train, adabn_images=0), out=str(tmp_path / "plain")))
    from_source = target_stats(plain.model)
    assert from_source and all(torch.equal(v, start_state[source_of(k)]) for k, v in from_source.items())
    # By default they are measured on target training images before the teacher copies the model.
    trainer = Trainer(cfg)
    model, teacher = trainer.model, trainer.held["teacher"]
    first, state = target_stats(model), model.state_dict()
    assert first.keys() == from_source.keys() == target_stats(teacher).keys()
    assert all(torch.equal(v, target_stats(teacher)[k]) for k, v in first.items())
    assert [k for k, v in first.items() if torch.equal(v, from_source[k])] == []
    assert all(torch.equal(state[source_of(k)], start_state[source_of(k)]) for k in first)
    split = trainer.data.dataset(cfg.target, cfg.target.train_split, (), train=False, domain=1)
    batches = -(-min(cfg.train.adabn_images, len(split)) // cfg.target.batch_size)
    assert all(int(v) == batches for k, v in state.items() if k.endswith("target_num_batches_tracked"))

    # The engine's forward of both domains: the source batch moves the source statistics, the target batch the
    # target ones, as a replica fed the source batch in the source domain and the target batch in the target
    # domain (same dropout draws: same seed).
    replica = copy.deepcopy(model)
    batch = next(trainer.batches(0))
    with torch.no_grad():
        torch.manual_seed(1)
        trainer.forward_domains(batch)
        torch.manual_seed(1)
        replica(batch["source"]["image"])
        with bn_domain(replica, 1):
            replica(batch["target"]["image"])
    moved, state, expected = target_stats(model), model.state_dict(), replica.state_dict()
    assert all(not torch.equal(moved[k], first[k]) for k in first if k.endswith("running_var"))
    assert all(torch.equal(v, expected[k]) for k, v in moved.items())
    assert all(torch.equal(state[source_of(k)], expected[source_of(k)]) for k in first)
    assert any(not torch.equal(state[source_of(k)], moved[k]) for k in first)

    train_steps(trainer, 1)
    saved = trainer.save_checkpoint()
    weights = saved / "model.safetensors"
    from safetensors.torch import load_file

    assert set(first) <= set(load_file(str(weights)))
    assert set(first) <= set(load_file(str(saved / "teacher.safetensors")))
    train_steps(trainer, 1)
    straight = network_states(trainer)
    # The teacher's target statistics are the EMA of the student's (alpha_1 = 0.5 at the second step).
    resumed = Trainer(cfg)
    assert resumed.load_checkpoint() == saved
    train_steps(resumed, 1)
    again = network_states(resumed)
    for name, tensors in straight.items():
        assert all(torch.equal(v, again[name][k]) for k, v in tensors.items()), name

    # Evaluation on the target uses the target statistics: equal to a model whose running statistics are them.
    cfg_loaded, loaded, _ = load_trained_model(saved)
    assert has_domain_statistics(loaded) and cfg_loaded.train.bn_mode == "domain"
    _, swapped, _ = load_trained_model(saved)
    state = swapped.state_dict()
    for k in first:
        state[source_of(k)] = state[k].clone()
    swapped.load_state_dict(state)
    data = cfg.target
    dataset = trainer.data.dataset(data, data.val_split, cfg.tasks, train=False, domain=1)
    batches = [dataset[i] for i in range(2)]
    batch = {
        "image": torch.stack([b["image"] for b in batches]),
        "semseg": torch.stack([b["semseg"] for b in batches]),
        "depth": torch.stack([b["depth"] for b in batches]),
    }
    args = (cfg.tasks, cfg.eval, trainer.space)
    on_target = evaluate(loaded, [batch], *args, domain=1)
    assert on_target == evaluate(swapped, [batch], *args, domain=0)
    assert on_target != evaluate(loaded, [batch], *args, domain=0)
    # uda-export writes one set, the target's by default: the exported model predicts as the run on that domain.
    from uda.models.pretrained import export_pretrained, load_pretrained

    for which, domain in (("target", 1), ("source", 0)):
        exported = load_pretrained(export_pretrained(saved, tmp_path / f"export-{which}", which))
        assert exported.pretrained_config["bn_statistics"] == which
        with torch.no_grad(), bn_domain(loaded.eval(), domain):
            expected, got = loaded(batch["image"]), exported(batch["image"])
        assert all(torch.equal(got[t][0], expected[t][0]) for t in cfg.tasks), which
    # uda-evaluate on the target split: the target statistics too.
    from uda.commands.evaluate import metrics
    from uda.data.loader import eval_loader

    cli = metrics([str(saved), "--no-images", "--num-workers", "0", "--out", str(tmp_path / "eval")])
    whole = list(eval_loader(dataset, data.batch_size))
    assert cli == evaluate(loaded, whole, *args, domain=1) != evaluate(loaded, whole, *args, domain=0)


def test_bn_mode_domain_is_a_config_choice():
    from uda.config import ConfigError, ExperimentConfig, apply_overrides

    cfg = apply_overrides(ExperimentConfig(), ["train.bn_mode=domain"])
    assert cfg.train.bn_mode == "domain"
    with pytest.raises(ConfigError, match="bn_mode"):
        apply_overrides(ExperimentConfig(), ["train.bn_mode=target"])


def test_adabn_method_trains_on_source_labels_and_moves_only_target_statistics_with_target_images(
    toy_root, tmp_path
):
    """--method adabn: no target loss, but the target stream is read and its images move the target statistics
    (the engine asks for it under bn_mode=domain); the oracle, whose data is the target, reads no second stream."""
    from uda.engine import Trainer

    cfg = recipe_config(toy_root, tmp_path / "adabn", "adabn")
    assert cfg.train.bn_mode == "domain" and cfg.adapt is None and cfg.self_training is None
    # The self-training methods keep target statistics too (an override takes them away); the paper's
    # adversarial recipe keeps the authors' shared statistics.
    for method, mode in (
        ("self-training", "domain"),
        ("self-training+adversarial", "domain"),
        ("adversarial", "separate"),
    ):
        assert recipe_config(toy_root, tmp_path / "x", method).train.bn_mode == mode, method
    assert (
        recipe_config(toy_root, tmp_path / "x", "self-training", "train.bn_mode=separate").train.bn_mode
        == "separate"
    )
    assert cfg.name.startswith("synthia2cityscapes-adabn")
    trainer = Trainer(cfg)
    assert [o.section for o in trainer.objectives] == ["loss"] and trainer.data.uses_domain(1)
    first = target_stats(trainer.model)
    train_steps(trainer, 1)
    moved = target_stats(trainer.model)
    assert all(not torch.equal(moved[k], first[k]) for k in first if k.endswith("running_var"))

    oracle = replace(cfg, data=cfg.target, out=str(tmp_path / "oracle"))
    assert not Trainer(oracle).data.uses_domain(1)
