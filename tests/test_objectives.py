"""Objectives composed by the loop: the loop knows none by name, task weightings run inside it with every model
and resume exactly, and the cross-task consistency objective sends its gradients where XTasC says."""

import ast
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config, train_steps
from uda.config import ConsistencyConfig
from uda.data.loader import move_to
from uda.engine import Trainer, TrainingError
from uda.objectives import OBJECTIVES
from uda.tasks import TASK_DEFS

REPO = Path(__file__).resolve().parent.parent
ARCHS = ("stl", "mtl", "padnet", "3ways-padnet", "mteb", "xtasc-unet", "xtasc-stl")


def test_the_loop_imports_no_concrete_objective():
    tree = ast.parse((REPO / "uda" / "engine.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("uda"):
            imported |= {f"{node.module}.{a.name}" for a in node.names}
    concrete = {f"uda.objectives.{cls.__module__.rsplit('.', 1)[1]}" for cls in OBJECTIVES}
    names = {cls.__name__ for cls in OBJECTIVES}
    assert not any(i.rsplit(".", 1)[0] in concrete or i.rsplit(".", 1)[1] in names for i in imported), (
        imported
    )
    source = (REPO / "uda" / "engine.py").read_text()
    for section in ("adapt", "photometric", "consistency", "posenet", "discriminator"):
        assert f"cfg.{section}" not in source and f".{section}." not in source, section
    assert len(source.splitlines()) < 500


def with_consistency(cfg, **kwargs):
    return replace(cfg, consistency=ConsistencyConfig(**kwargs))


def first_step(trainer):
    batch = move_to(next(trainer.batches(0)), trainer.accelerator.device)
    from uda.objectives import Step

    return Step(0, batch, trainer.forward_domains(batch), trainer.accelerator)


# ------------------------------------------------------------------------------------------ task weighting


@pytest.mark.parametrize(
    "weighting, arch, precision",
    # bf16 runs a slow reference kernel on CPUs without AVX-512 BF16: autocast is covered on the small model.
    # (accelerate applies no fp16 autocast on a CPU: fp16 with its GradScaler is a GPU path.)
    [
        ("fixed", "mtl", "bf16"),
        ("uncertainty", "mtl", "bf16"),
        ("dwa", "mtl", "no"),
        ("gradnorm", "mtl", "bf16"),
    ]
    + [("gradnorm", arch, "no") for arch in ARCHS if arch != "mtl"]
    + [("uncertainty", "stl", "no"), ("dwa", "padnet", "no")],
)
def test_every_weighting_trains_every_model_under_autocast(
    weighting, arch, precision, toy_root, tmp_path, fresh_accelerator
):
    cfg = tiny_config(toy_root, tmp_path / "run", arch=arch, iterations=2, mixed_precision=precision)
    if arch.startswith("xtasc"):
        cfg = replace(cfg, data=replace(cfg.data, size=(32, 64)))  # its decoders are 128 channels wide
    cfg = replace(cfg, loss=replace(cfg.loss, weighting=weighting, dwa_period=1))
    trainer = Trainer(cfg)
    before = json.dumps(trainer.weighting.checkpoint_state())
    for logs in train_steps(trainer, cfg.train.iterations):
        assert logs["finite"] == 1.0 and all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
        assert {"weight/semseg", "weight/depth"} <= set(logs)
    if weighting in ("uncertainty", "gradnorm"):  # learnt weights moved
        assert json.dumps(trainer.weighting.checkpoint_state()) != before
    if weighting == "gradnorm":
        assert logs["gradnorm/grad_norm/semseg"] > 0 and logs["gradnorm/grad_norm/depth"] > 0


@pytest.mark.parametrize("weighting", ["uncertainty", "dwa", "gradnorm"])
def test_weighting_state_resumes_exactly(weighting, toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=4, ckpt_every=2)
    cfg = replace(cfg, loss=replace(cfg.loss, weighting=weighting, dwa_period=1))
    full = Trainer(cfg)
    full.fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    resumed = Trainer(cfg)
    resumed.fit(resume=True)
    assert [row["step"] for row in resumed.loss_log] == [3, 4]
    for a, b in zip(full.loss_log[2:], resumed.loss_log):
        assert a == b, (a, b)  # losses and learnt weights, bit for bit
    assert full.weighting.checkpoint_state() == resumed.weighting.checkpoint_state()


def test_a_checkpoint_of_another_weighting_is_refused(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=1, ckpt_every=1)
    Trainer(cfg).fit()
    other = replace(
        cfg, loss=replace(cfg.loss, weighting="uncertainty"), train=replace(cfg.train, iterations=2)
    )
    with pytest.raises(TrainingError, match=r'loss.weighting \(checkpoint "fixed", this run "uncertainty"\)'):
        Trainer(other).fit(resume=True)


def test_a_checkpoint_of_another_dwa_period_is_refused_by_name(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=1, ckpt_every=1)
    cfg = replace(cfg, loss=replace(cfg.loss, weighting="dwa", dwa_period=1))
    Trainer(cfg).fit()
    other = replace(cfg, loss=replace(cfg.loss, dwa_period=2), train=replace(cfg.train, iterations=2))
    with pytest.raises(TrainingError, match=r"loss.dwa_period \(checkpoint 1, this run 2\)"):
        Trainer(other).fit(resume=True)


# ------------------------------------------------------------------------------------------ consistency


@pytest.fixture
def xtasc(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="xtasc-unet")
    return Trainer(with_consistency(cfg, lambdas={"semseg": 0.2, "depth": 0.5}))


def test_consistency_gradients_reach_the_other_branch_and_the_transfer_net_only(xtasc):
    step = first_step(xtasc)
    objective = xtasc.objective("consistency")
    terms = objective.loss(step)
    model = xtasc.model
    for target, source in (("semseg", "depth"), ("depth", "semseg")):
        (term,) = terms.tasks[target]
        own = list(model.decoders[target].parameters())
        other = list(model.decoders[source].parameters())
        net = list(objective.transfer.nets[f"{source}_to_{target}"].parameters())
        unused = list(objective.transfer.nets[f"{target}_to_{source}"].parameters())
        grads = torch.autograd.grad(term, own + other + net + unused, retain_graph=True, allow_unused=True)
        split = [len(own), len(own) + len(other), len(own) + len(other) + len(net)]
        assert all(g is None or not g.any() for g in grads[: split[0]]), "the target is detached"
        assert any(g is not None and g.abs().sum() > 0 for g in grads[split[0] : split[1]])
        assert all(g is not None for g in grads[split[1] : split[2]])
        assert all(g is None for g in grads[split[2] :])


def test_consistency_terms_follow_eq_11(xtasc):
    step = first_step(xtasc)
    objective = xtasc.objective("consistency")
    terms = objective.loss(step)
    out = step.outputs["source"]
    space = xtasc.space
    with torch.no_grad():
        seg = TASK_DEFS["semseg"].transfer_input(out["semseg"][0], space)
        depth_from_seg = objective.transfer.nets["semseg_to_depth"](seg)
        expected = TASK_DEFS["depth"].consistency_loss(depth_from_seg, out["depth"][0], space)
        # L1 to the normalised inverse depth of the direct prediction (Eq. 15).
        target = space.normalised_depth(out["depth"][0].float())
        assert torch.allclose(expected, (depth_from_seg - target).abs().mean())
    assert torch.allclose(terms.tasks["depth"][0], 0.5 / (1 - 0.5) * expected)
    # Segmentation: soft cross-entropy against the detached class probabilities (Eq. 13).
    with torch.no_grad():
        depth_in = TASK_DEFS["depth"].transfer_input(out["depth"][0], space)
        seg_from_depth = objective.transfer.nets["depth_to_semseg"](depth_in)
        p = out["semseg"][0].float().softmax(1)
        soft_ce = -(p * seg_from_depth.log_softmax(1)).sum(1).mean()
    assert torch.allclose(terms.tasks["semseg"][0], 0.2 / 0.8 * soft_ce)


def test_alignment_compares_with_the_labels(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl")
    trainer = Trainer(with_consistency(cfg, mode="alignment"))
    step = first_step(trainer)
    objective = trainer.objective("consistency")
    terms = objective.loss(step)
    out, labels = step.outputs["source"], step.batch["source"]
    with torch.no_grad():
        depth_in = TASK_DEFS["depth"].transfer_input(out["depth"][0], trainer.space)
        logits = objective.transfer.nets["depth_to_semseg"](depth_in)
        ce = torch.nn.functional.cross_entropy(logits, labels["semseg"], ignore_index=255)
    assert torch.allclose(terms.tasks["semseg"][0], 0.01 / 0.99 * ce)
    # The label-side target gets no gradient path to the semseg decoder through the transferred prediction.
    grads = torch.autograd.grad(
        terms.tasks["semseg"][0], list(trainer.model.decoders["semseg"].parameters()), allow_unused=True
    )
    assert all(g is None or not g.any() for g in grads)


def test_consistency_on_the_target_needs_no_labels(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mteb", adapt=True, iterations=2)
    trainer = Trainer(with_consistency(cfg, domains=("source", "target")))
    step = first_step(trainer)
    assert "semseg" not in step.batch["target"] and "depth" not in step.batch["target"]
    terms = trainer.objective("consistency").loss(step)
    assert [len(terms.tasks[t]) for t in ("semseg", "depth")] == [2, 2]  # one per domain
    assert "loss/consistency/semseg_to_depth/target" in terms.logs
    summary = trainer.fit()
    assert summary["step"] == 2 and trainer.loss_log[-1]["finite"] == 1.0
    assert "loss/adv" in trainer.loss_log[-1] and "loss/disc" in trainer.loss_log[-1]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tasks": ("semseg", "normals")}, "must name two different tasks of this run"),
        ({"lambdas": {"semseg": 1.0, "depth": 0.1}}, "one value in [0, 1) per task"),
        ({"domains": ("target",)}, "needs a target dataset"),
    ],
)
def test_bad_consistency_settings_are_refused(change, message, toy_root, tmp_path):
    cfg = with_consistency(tiny_config(toy_root, tmp_path / "run", arch="mtl"), **change)
    with pytest.raises(
        TrainingError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        Trainer(cfg)


def test_alignment_on_the_target_is_refused(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", adapt=True)
    with pytest.raises(TrainingError, match="alignment compares with labels"):
        Trainer(with_consistency(cfg, mode="alignment", domains=("source", "target")))


def test_a_short_run_lowers_both_consistency_losses(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=20)
    trainer = Trainer(with_consistency(cfg, lr=1e-3))
    log = train_steps(trainer, cfg.train.iterations)
    for key, factor in (("semseg_to_depth", 0.5), ("depth_to_semseg", 0.95)):
        first = sum(row[f"loss/consistency/{key}"] for row in log[:5]) / 5
        last = sum(row[f"loss/consistency/{key}"] for row in log[-5:]) / 5
        assert last < factor * first, (key, first, last)
