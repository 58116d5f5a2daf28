"""ATRC (Bruggemann et al. 2021): CP contexts, the module's wiring, label spaces, the label-context objective,
uda-normal-clusters, and short engine runs of atrc / atrc-fpm."""

import json
import math

import numpy as np
import pytest
import torch

from uda.config import ModelConfig
from uda.models.atrc import (
    ATRCModule,
    GlobalContext,
    LabelContext,
    depth_bins,
    fibonacci_sphere,
    local_attention,
    normal_labels,
    prototypes,
    resolve_contexts,
    spatial_softmax,
)
from uda.models.multitask import build_model, intermediate_scales

TASKS = ("semseg", "depth")
SMALL = {"semseg": 5, "depth": 1}


def _cfg(**kw):
    return ModelConfig(**({"arch": "atrc", "backbone": "hrnetv2-w18-small", "pretrained": False} | kw))


def test_local_context_sees_only_its_window():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 14, 14), torch.randn(1, 4, 14, 14), torch.randn(1, 3, 14, 14)
    out = local_attention(q, k, v)
    i, j = 7, 7  # target pixel; its window spans rows/cols 3..11
    for (y, x), inside in [((3, 11), True), ((11, 3), True), ((2, 7), False), ((7, 12), False)]:
        k2, v2 = k.clone(), v.clone()
        k2[..., y, x] += 5.0
        v2[..., y, x] += 5.0
        changed = not torch.allclose(local_attention(q, k2, v2)[..., i, j], out[..., i, j], atol=1e-6)
        assert changed == inside, (y, x)


def test_local_context_matches_explicit_masked_softmax():
    torch.manual_seed(1)
    d, h, w = 3, 6, 5
    q, k, v = torch.randn(1, d, h, w), torch.randn(1, d, h, w), torch.randn(1, 2, h, w)
    out = local_attention(q, k, v, window=3)
    for i in range(h):
        for j in range(w):
            nb = [
                (y, x) for y in range(i - 1, i + 2) for x in range(j - 1, j + 2) if 0 <= y < h and 0 <= x < w
            ]
            logits = torch.stack([(q[0, :, i, j] * k[0, :, y, x]).sum() for y, x in nb]) / math.sqrt(d)
            ref = (torch.softmax(logits, 0)[:, None] * torch.stack([v[0, :, y, x] for y, x in nb])).sum(0)
            assert torch.allclose(out[0, :, i, j], ref, atol=1e-5)


def test_global_context_equals_normalised_kernel():
    torch.manual_seed(0)
    block = GlobalContext(6, 4).eval()
    target, source = torch.randn(2, 6, 3, 5), torch.randn(2, 6, 3, 5)
    out = block(target, source)
    q = block.query(target).flatten(2)  # [B,d,L], positive (softplus)
    k = block.key(source).flatten(2)
    v = block.value(source).flatten(2)
    kernel = q.transpose(1, 2) @ k  # [B,L,L]: sim(q_i, k_j) = q_i . k_j
    ref = (kernel / kernel.sum(2, keepdim=True)) @ v.transpose(1, 2)  # [B,L,m]
    assert torch.allclose(out.flatten(2), ref.transpose(1, 2), atol=1e-5)


def test_global_context_stays_finite_under_float16_autocast():
    # A training step at 512 x 1024: stride-4 task features of 128 x 256 pixels, C = 67 (HRNetV2-W18), d = 33.
    # The sums over every pixel exceed float16's range; the result, a weighted mean of the values, does not.
    torch.manual_seed(0)
    block = GlobalContext(67, 33).train()
    target, source = torch.randn(2, 67, 128, 256).relu(), torch.randn(2, 67, 128, 256).relu()
    with torch.no_grad():
        ref = block(target, source)
        with torch.autocast("cpu", dtype=torch.float16):
            out = block(target, source)
    assert torch.isfinite(out).all()
    # only the projections run in float16 (their rounding moves the output by ~1e-4 of its range)
    torch.testing.assert_close(out.float(), ref, atol=1e-3 * ref.abs().max().item(), rtol=0)


def test_label_prototypes_and_attention_by_hand():
    torch.manual_seed(0)
    aux = torch.randn(2, 3, 2, 4)  # R = 3 regions
    feats = torch.randn(2, 5, 2, 4)
    prob = spatial_softmax(aux)
    assert torch.allclose(prob.sum(2), torch.ones(2, 3))
    p = prototypes(prob, feats)  # [B,C,R]
    for b in range(2):
        for r in range(3):
            a = torch.softmax(aux[b, r].flatten(), 0)
            hand = sum(a[n] * feats[b, :, n // 4, n % 4] for n in range(8))
            assert torch.allclose(p[b, :, r], hand, atol=1e-6)
    block = LabelContext(5, 4, "slabel").eval()
    target = torch.randn(2, 5, 2, 4)
    out = block(target, feats, None, prob)
    k = block.key(p.unsqueeze(-1)).flatten(2)
    v = block.value(p.unsqueeze(-1)).flatten(2)
    q = block.query(target).flatten(2)
    ref = torch.einsum("bdl,bdr->blr", q, k) / 2.0  # sqrt(4)
    ref = torch.einsum("blr,bmr->bml", ref.softmax(-1), v)
    assert torch.allclose(out.flatten(2), ref, atol=1e-5)


def test_zero_initialised_fusion():
    contexts = resolve_contexts("global", TASKS)
    module = ATRCModule(TASKS, contexts, 8)
    feats = {t: torch.randn(2, 8, 4, 6) for t in TASKS}
    for t in TASKS:
        assert torch.equal(module.fused(feats, {}, t), torch.zeros(2, 8, 4, 6))


@pytest.mark.parametrize("context", ["global", "local", "tlabel", "slabel", "none"])
def test_every_context_shapes_and_gradients(context):
    cfg = _cfg(atrc_contexts=context)
    model = build_model(cfg, SMALL)
    assert intermediate_scales(cfg) == ()
    out = model(torch.rand(2, 3, 64, 96))
    label = context in ("tlabel", "slabel")
    for task, n in SMALL.items():
        assert out[task][0].shape == (2, n, 64, 96)
        assert ("aux" in out[task]) == label
    if label:
        assert out["semseg"]["aux"].shape == (2, 5, 16, 24) and out["depth"]["aux"].shape == (2, 40, 16, 24)
    sum(o.float().mean() for per in out.values() for o in per.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # the zero-initialised fusion's BN blocks the gradient into the CP blocks at the very first step only
    assert all(".cp." in n for n in missing), missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_aux_heads_send_no_gradient_into_the_backbone():
    model = build_model(_cfg(atrc_contexts="tlabel"), SMALL)
    out = model(torch.rand(1, 3, 64, 96))
    sum(per["aux"].sum() for per in out.values()).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.atrc.aux.parameters())


def test_atrc_fpm_builds_on_mtinet_front_end():
    cfg = _cfg(arch="atrc-fpm", atrc_contexts="slabel")
    assert intermediate_scales(cfg) == (2, 3, 4, 5)
    out = build_model(cfg, SMALL)(torch.rand(1, 3, 64, 96))
    assert set(out["semseg"]) == {0, 2, 3, 4, 5, "aux"}
    with pytest.raises(ValueError, match="multi-scale"):
        build_model(_cfg(arch="atrc", backbone="resnet18"), SMALL)


def test_contexts_json(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps(
            {"semseg": {"semseg": "global", "depth": "tlabel"}, "depth": {"semseg": "none", "depth": "local"}}
        )
    )
    model = build_model(_cfg(atrc_contexts=str(good)), SMALL)
    assert set(model.atrc.module.cp["depth"]) == {"depth"} and set(model.atrc.aux) == {"semseg"}
    for bad in (
        {"semseg": {"semseg": "global", "depth": "tlabel"}},
        {"semseg": {"semseg": "glob", "depth": "none"}, "depth": {"semseg": "none", "depth": "none"}},
    ):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError) as info:
            resolve_contexts(str(path), TASKS)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_depth_bins_and_normal_labels():
    ids = depth_bins(
        torch.tensor([0.0, 1.0, 1.99, 2.0, 3.9, 4.0, 100.0, 0.1]), bins=2, min_depth=1.0, max_depth=4.0
    )
    assert ids.tolist() == [255, 0, 0, 1, 1, 1, 1, 0]
    centroids = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    normals = torch.tensor([[0.1, 0.0, 0.9], [0.9, 0.3, 0.0], [0.0, -0.6, 0.5], [0.0, 0.0, 0.0]]).T
    assert normal_labels(normals.view(1, 3, 1, 4), centroids).tolist() == [[[0, 1, 2, 255]]]
    sphere = fibonacci_sphere(40)
    assert sphere.shape == (40, 3) and torch.allclose(sphere.norm(dim=1), torch.ones(40), atol=1e-6)


def test_label_context_objective_equals_hand_ce_and_trains():
    from uda.config import ExperimentConfig, LabelContextConfig
    from uda.objectives.base import RunContext, Step
    from uda.objectives.label_context import LabelContext as LabelObjective
    from uda.tasks import OutputSpace

    cfg = ExperimentConfig(
        tasks=TASKS, model=_cfg(atrc_contexts="tlabel"), label_context=LabelContextConfig()
    )
    run = RunContext(cfg, TASKS, dict(SMALL), OutputSpace(num_classes=5), ())
    objective = LabelObjective(run, cfg.label_context)
    torch.manual_seed(0)
    semseg = torch.randint(0, 5, (2, 8, 8))
    semseg[:, 0] = 255
    depth = torch.rand(2, 1, 8, 8) * 50
    depth[..., 0] = 0.0
    batch = {"semseg": semseg, "depth": depth}
    logits = {
        "semseg": torch.randn(2, 5, 4, 4, requires_grad=True),
        "depth": torch.randn(2, 40, 4, 4, requires_grad=True),
    }
    step = Step(0, {"source": batch}, {"source": {t: {"aux": a} for t, a in logits.items()}}, None)
    terms = objective.loss(step)
    hand = torch.nn.functional.cross_entropy(logits["semseg"], semseg[:, ::2, ::2].long(), ignore_index=255)
    assert torch.allclose(terms.tasks["semseg"][0], hand)
    assert "loss/depth/aux" in terms.logs
    opt = torch.optim.SGD(logits.values(), lr=1.0)
    losses = []
    for _ in range(5):
        loss = sum(v[0] for v in objective.loss(step).tasks.values())
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_parts_and_saliency_label_spaces():
    """PASCAL-Context's tasks: parts aux logits over the part classes, saliency binary; their labels keep 255
    (padding, images without people) ignored."""
    from uda.config import ExperimentConfig, LabelContextConfig
    from uda.objectives.base import RunContext
    from uda.objectives.label_context import LabelContext as LabelObjective
    from uda.tasks import OutputSpace, num_parts

    tasks = ("parts", "saliency")
    model = build_model(_cfg(atrc_contexts="tlabel"), {"parts": num_parts(), "saliency": 1})
    assert model.atrc.aux["parts"][-1].out_channels == num_parts()
    assert model.atrc.aux["saliency"][-1].out_channels == 2
    cfg = ExperimentConfig(
        tasks=tasks, model=_cfg(atrc_contexts="tlabel"), label_context=LabelContextConfig()
    )
    objective = LabelObjective(
        run=RunContext(cfg, tasks, {}, OutputSpace(num_classes=5), ()), cfg=cfg.label_context
    )
    parts = torch.tensor([[[0, 3], [255, 6]]])
    assert objective.labels("parts", parts, (2, 2)).tolist() == [[[0, 3], [255, 6]]]
    saliency = torch.tensor([[[[0.0, 1.0], [255.0, 0.2]]]])
    assert objective.labels("saliency", saliency, (2, 2)).tolist() == [[[0, 1], [255, 0]]]


def test_normal_clusters_command(toy_root, tmp_path):
    from uda.commands.normal_clusters import main

    out = tmp_path / "clusters.json"
    assert (
        main(
            [
                "--dataset",
                "synthia",
                "--data-root",
                str(toy_root),
                "-k",
                "4",
                "--limit",
                "4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    centroids = torch.tensor(json.loads(out.read_text())["centroids"])
    assert centroids.shape == (4, 3) and torch.allclose(centroids.norm(dim=1), torch.ones(4), atol=1e-5)
    cfg = _cfg(atrc_contexts="tlabel", normal_clusters=str(out))
    model = build_model(cfg, {"normals": 3})
    assert model.atrc.aux["normals"][-1].out_channels == 4


@pytest.mark.parametrize("arch", ["atrc", "atrc-fpm"])
def test_atrc_archs_train(arch, toy_root, tmp_path, fresh_accelerator):
    """Two steps through the engine with label contexts: finite losses, the aux terms in the loss log."""
    from dataclasses import replace

    from tests.conftest import tiny_config
    from uda.cli import model_defaults
    from uda.engine import Trainer

    tasks = ("semseg", "normals")
    cfg = tiny_config(toy_root, tmp_path / arch, arch=arch, tasks=tasks, iterations=2, deterministic=False)
    cfg = replace(
        cfg,
        model=replace(cfg.model, backbone="hrnetv2-w18-small", atrc_contexts="slabel"),
        data=replace(cfg.data, size=(32, 64)),  # HRNet takes multiples of 32
    )
    cfg = model_defaults(cfg)
    assert cfg.label_context is not None
    trainer = Trainer(cfg)
    trainer.fit()
    assert len(trainer.loss_log) == 2
    for row in trainer.loss_log:
        for t in tasks:
            assert np.isfinite(row[f"loss/{t}/s0"]) and np.isfinite(row[f"loss/{t}/aux"]), row
    # The normals' centroids are a buffer of the model (saved with the weights), the objective labels with
    # that very tensor, and the run folder keeps a copy in uda-normal-clusters' format.
    model = trainer.accelerator.unwrap_model(trainer.model)
    centroids = model.atrc.normal_centroids
    assert trainer.objective("label_context").centroids is centroids
    assert torch.allclose(centroids, fibonacci_sphere(cfg.model.atrc_normal_clusters))
    saved = json.loads((tmp_path / arch / "normal_clusters.json").read_text())
    assert torch.allclose(torch.tensor(saved["centroids"]), centroids)
    assert "atrc.normal_centroids" in model.state_dict()
