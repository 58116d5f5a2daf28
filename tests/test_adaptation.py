"""Multi-task UDA: which weights each update moves, where the adversarial gradient flows, the recipe end to end."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config
from uda.data.loader import move_to
from uda.engine import Trainer

REPO = Path(__file__).resolve().parent.parent


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def changed(before, module):
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


@pytest.fixture(params=["separate", "joint"])
def trainer(request, toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", adapt=True)
    cfg.train.bn_mode = request.param
    trainer = Trainer(cfg)
    trainer.batch = move_to(next(trainer.batches(0)), trainer.accelerator.device)
    trainer.adversarial = trainer.objective("adapt")
    return trainer


def test_mixed_batch_has_both_domains(trainer):
    assert trainer.batch["source"]["domain"].tolist() == [0, 0]
    assert trainer.batch["target"]["domain"].tolist() == [1, 1]
    assert "semseg" in trainer.batch["source"] and "semseg" not in trainer.batch["target"]


def test_model_update_leaves_discriminators_unchanged(trainer):
    discs, model = snapshot(trainer.adversarial.discriminators), snapshot(trainer.model)
    _, logs, finite = trainer.model_update(trainer.batch)
    assert finite and "loss/adv" in logs
    assert not changed(discs, trainer.adversarial.discriminators)
    assert changed(model, trainer.model)
    assert all(p.grad is None for p in trainer.adversarial.discriminators.parameters())


def test_discriminator_update_leaves_model_unchanged(trainer):
    step, _, _ = trainer.model_update(trainer.batch)
    discs, model = snapshot(trainer.adversarial.discriminators), snapshot(trainer.model)
    trainer.adversarial.update(step)
    assert not changed(model, trainer.model)
    learnt = {k.split(".")[0] for k in changed(discs, trainer.adversarial.discriminators)}
    assert learnt == {k.split(".")[0] for k in discs}  # every (task, scale) discriminator learns
    assert all(p.grad is None for p in trainer.model.parameters())


def test_adversarial_term_reaches_the_model_only_through_target_outputs(trainer):
    outputs = trainer.forward_domains(trainer.batch)
    out_src, out_tgt = outputs["source"], outputs["target"]
    size = tuple(trainer.batch["target"]["image"].shape[-2:])
    adv = trainer.adversarial.generator_loss(out_tgt, size)
    src = [o for per in out_src.values() for o in per.values()]
    tgt = [o for per in out_tgt.values() for o in per.values()]
    grads = torch.autograd.grad(adv, src + tgt, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in grads[: len(src)])
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(src) :])
    assert len(trainer.adversarial.aligned) == 4  # (semseg, depth) x (intermediate scale 1, final scale 0)


def test_adversarial_term_sums_tasks_and_scales_as_eq9(trainer):
    # Eq. 9: lambda_adv x sum_t (mean_{s in S} L_adv_t^s + L_adv_t^final), next to Eq. 6's sums of the supervised
    # terms; with S = {1} every (task, scale) discriminator's BCE counts once. A mean over the four weighed the
    # adversarial terms a quarter of the paper's against the supervised ones.
    from uda.objectives import Step

    adversarial = trainer.adversarial
    adversarial.cfg.flip_inputs = False  # the same inputs here and in the loss
    with torch.no_grad():
        outputs = trainer.forward_domains(trainer.batch)
    size = tuple(trainer.batch["target"]["image"].shape[-2:])
    expected = 0.0
    for task, scale in adversarial.aligned:
        x = adversarial.discriminator_input(task, outputs["target"][task][scale], size)
        logits = adversarial.discriminators[f"{task}_s{scale}"](x)
        expected += torch.nn.functional.softplus(-logits).mean()  # BCE against the source label 1
    step = Step(0, trainer.batch, outputs, trainer.accelerator, trainer.model)
    terms = adversarial.loss(step)
    assert sorted(adversarial.aligned) == [("depth", 0), ("depth", 1), ("semseg", 0), ("semseg", 1)]
    torch.testing.assert_close(terms.logs["loss/adv"], expected.detach())
    torch.testing.assert_close(terms.total, adversarial.cfg.lambda_adv * expected.detach())


def test_depth_input_uses_the_fixed_source_range(trainer):
    g = torch.full((1, 1, 8, 8), trainer.cfg.loss.d_far / 10.0)  # 10 m everywhere
    a = trainer.adversarial.discriminator_input("depth", g, (8, 8))
    b = trainer.adversarial.discriminator_input("depth", torch.cat([g, g * 3]), (8, 8))[:1]
    assert torch.equal(a, b)
    near, far = trainer.cfg.adapt.depth_range
    expected = (1 / 10 - 1 / far) / (1 / near - 1 / far)
    assert torch.allclose(a, torch.full_like(a, expected), atol=1e-6)


def run_recipe(argv):
    sys.path.insert(0, str(REPO / "recipes"))
    from uda.adaptation import adaptation_config, adaptation_parser
    from uda.cli import main

    build = lambda args: adaptation_config(args, "synthia", "synthia16", "cityscapes16")  # noqa: E731
    return main(build, adaptation_parser("test"), "synthia2cityscapes", argv)


def test_synthia2cityscapes_recipe_end_to_end_and_resume(toy_root, tmp_path):
    common = [
        "--data-root",
        str(toy_root),
        "model.backbone=resnet18",
        "model.pretrained=false",
        "model.decoder_channels=16,32,32,64,64",
        "adapt.disc_channels=8",
        "data.size=64,128",
        "target.size=48,96",
        "data.num_workers=0",
        "target.num_workers=0",
        "train.val_batches=2",
        "train.ckpt_every=2",
        "train.val_every=0",
        "train.deterministic=true",
        "train.iterations=4",
        "train.mixed_precision=no",  # fp32 on every CPU (auto picks bf16 on one with AVX-512 BF16)
    ]
    summary = run_recipe(["--out", str(tmp_path / "full"), *common])
    results = summary["results"]
    assert set(results) == {"target", "target@labels", "source"}
    assert results["target@labels"]["depth/rmse"] != results["target"]["depth/rmse"]  # 64x128 labels vs 48x96
    assert {"semseg/miou", "semseg/miou_subset", "depth/rmse", "depth_unscaled/rmse"} <= set(
        results["target"]
    )
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["protocol"]["target"]["median_scaling"] is True
    assert metrics["protocol"]["target@labels"]["ground_truth_resolution"] == "native label files"
    assert (
        results["target"]["depth/abs_rel"] < results["target"]["depth_constant/abs_rel"] * 2
    )  # both computed
    assert metrics["protocol"]["target"]["checkpoint"].endswith("(last)")
    images = {p.name.split("_")[1] for p in (tmp_path / "full" / "images").glob("*.png")}
    assert images == {"target", "target@labels", "source"}
    # Resume from step 2 with discriminator state and reach the same final weights.
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-0000002", tmp_path / "cut" / "checkpoints" / "step-0000002"
    )
    run_recipe(["--out", str(tmp_path / "cut"), "--resume", *common])
    final_a = tmp_path / "full" / "checkpoints" / "step-0000004"
    final_b = tmp_path / "cut" / "checkpoints" / "step-0000004"
    from safetensors.torch import load_file

    for name in ("model.safetensors", "model_1.safetensors"):
        a, b = load_file(final_a / name), load_file(final_b / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@torch.no_grad()
def test_bn_mode_decides_whether_target_outputs_see_source_statistics(trainer):
    """joint: one forward over source+target, so BatchNorm mixes their statistics; separate: it does not."""
    batch = trainer.batch
    other = {**batch, "source": {**batch["source"], "image": batch["source"]["image"].flip(-1) * 0.5}}
    torch.manual_seed(0)  # same dropout masks in both forwards
    a = trainer.forward_domains(batch)["target"]
    torch.manual_seed(0)
    b = trainer.forward_domains(other)["target"]
    target_changed = not torch.allclose(a["semseg"][0], b["semseg"][0])
    assert target_changed == (trainer.cfg.train.bn_mode == "joint")


def test_discriminator_inputs_of_both_domains_are_randomly_flipped(trainer):
    adversarial = trainer.adversarial
    assert adversarial.cfg.flip_inputs and adversarial.cfg.spectral_norm  # the authors' defaults
    seen = []
    hook = adversarial.discriminators["semseg_s0"].register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    outputs = {
        d: {t: {s: o.detach() for s, o in per.items()} for t, per in out.items()}
        for d, out in trainer.forward_domains(trainer.batch).items()
    }
    torch.manual_seed(0)
    flipped = {}
    for domain in ("source", "target"):
        size = tuple(trainer.batch[domain]["image"].shape[-2:])
        plain = adversarial.discriminator_input("semseg", outputs[domain]["semseg"][0], size)
        assert not torch.equal(plain, plain.flip(-1))
        flips = []
        for _ in range(16):
            seen.clear()
            adversarial.discriminators(adversarial.inputs(outputs[domain], size, detach=True))
            (x,) = seen
            assert torch.equal(x, plain) or torch.equal(x, plain.flip(-1))
            flips.append(torch.equal(x, plain.flip(-1)))
        flipped[domain] = flips
    hook.remove()
    for domain, flips in flipped.items():
        assert 0 < sum(flips) < len(flips), (domain, flips)  # both orientations, for both domains


def test_adapt_tasks_align_only_tasks_with_a_final_output(tmp_path):
    # adapt.tasks naming no task of the run is a one-line error, not an objective aligning nothing; an auxiliary
    # task (model.aux_tasks: deep supervision only, no scale-0 output) is left out instead of failing at the first
    # step with a KeyError on its missing output.
    from dataclasses import replace

    from uda.models.multitask import intermediate_scales
    from uda.objectives import RunContext
    from uda.objectives.adversarial import Adversarial
    from uda.objectives.base import ObjectiveError
    from uda.tasks import output_space, task_channels

    def build(cfg):
        run = RunContext(
            cfg,
            cfg.tasks,
            task_channels(cfg.tasks, 16),
            output_space(cfg, 16),
            intermediate_scales(cfg.model),
        )
        return Adversarial(run, cfg.adapt)

    cfg = tiny_config(
        tmp_path, tmp_path / "run", arch="mti-net", tasks=("semseg", "depth", "normals"), adapt=True
    )
    cfg = replace(cfg, model=replace(cfg.model, backbone="fpn-resnet18", aux_tasks=("normals",)))
    both = build(replace(cfg, adapt=replace(cfg.adapt, tasks=("semseg", "normals"))))
    assert {t for t, _ in both.aligned} == {"semseg"}
    assert all(k.startswith("semseg_") for k in both.discriminators)
    for tasks in (("normals",), ("edges",)):
        with pytest.raises(
            ObjectiveError, match=r"names no task of this run with a final output \['semseg', 'depth'\]"
        ):
            build(replace(cfg, adapt=replace(cfg.adapt, tasks=tasks)))


def test_fp16_discriminator_overflow_lowers_the_loss_scale(toy_root, tmp_path):
    # fp16 (GPUs without bf16): the GradScaler shared with the model must see an overflow of the discriminators'
    # scaled gradients, skip their step and lower its scale. Skipped by the objective instead, the scale never
    # came down and the discriminators stopped learning for good. A GradScaler on CPU stands in for the GPU's.
    from accelerate.optimizer import AcceleratedOptimizer

    trainer = Trainer(tiny_config(toy_root, tmp_path / "run", adapt=True))
    adversarial = trainer.objective("adapt")
    batch = move_to(next(trainer.batches(0)), trainer.accelerator.device)
    step, _, finite = trainer.model_update(batch)
    assert finite
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.accelerator.scaler = scaler
    adversarial.discriminators_optimizer = AcceleratedOptimizer(
        adversarial.discriminators_optimizer.optimizer, scaler=scaler
    )

    def overflow(module, args, out):  # what an fp16 overflow leaves in the scaled gradients
        out.register_hook(lambda g: torch.full_like(g, float("inf")))

    params = {k: p.detach().clone() for k, p in adversarial.discriminators.named_parameters()}
    hook = adversarial.discriminators["semseg_s0"].register_forward_hook(overflow)
    adversarial.update(step)
    hook.remove()
    assert all(torch.equal(params[k], p) for k, p in adversarial.discriminators.named_parameters())
    assert scaler.get_scale() == 2.0**15  # backed off once
    adversarial.update(step)  # finite gradients: the discriminators learn at the lowered scale
    assert not any(torch.equal(params[k], p) for k, p in adversarial.discriminators.named_parameters())
    assert all(p.grad is None for p in trainer.model.parameters())


def test_adapt_scales_without_an_output_are_refused(tmp_path):
    # A scale the model has no output at is a one-line error when the objective is built, not a KeyError at the
    # first step.
    from dataclasses import replace

    from uda.models.multitask import intermediate_scales
    from uda.objectives import RunContext
    from uda.objectives.adversarial import Adversarial
    from uda.objectives.base import ObjectiveError
    from uda.tasks import output_space, task_channels

    cfg = tiny_config(tmp_path, tmp_path / "run", adapt=True)
    run = RunContext(
        cfg, cfg.tasks, task_channels(cfg.tasks, 16), output_space(cfg, 16), intermediate_scales(cfg.model)
    )
    assert len(Adversarial(run, replace(cfg.adapt, scales=(1, 0))).aligned) == 4
    with pytest.raises(
        ObjectiveError, match=r"adapt.scales=\[2, 0\]: .* no output at scale 2; choose among \[0, 1\]"
    ):
        Adversarial(run, replace(cfg.adapt, scales=(2, 0)))
    for depth_range in ((100.0, 1.0), (0.0, 80.0)):  # was a ValueError at the first step, or a division by 0
        with pytest.raises(ObjectiveError, match=r"adapt.depth_range=.*must be 0 < near < far"):
            Adversarial(run, replace(cfg.adapt, depth_range=depth_range))
