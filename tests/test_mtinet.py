"""MTI-Net (and CTAL-MS) on multi-scale backbones: outputs per scale, gradients, FPM, deep supervision, aux tasks."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from uda.config import ModelConfig
from uda.losses import MultiTaskLoss
from uda.models.exchange import EXCHANGE_BLOCKS, PADNetDistillation
from uda.models.mtinet import FeaturePropagation, MTINet
from uda.models.multitask import build_model, intermediate_scales

H, W = 64, 128
TASKS = {"semseg": 5, "depth": 1, "normals": 3}
WEIGHTS = {"semseg": 1.0, "depth": 2.0, "normals": 3.0}
SCALES = (2, 3, 4, 5)


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(arch="mti-net", backbone="hrnetv2-w18-small", pretrained=False, **kw)


def _batch(seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = {
        "image": torch.rand(batch, 3, H, W, generator=g),
        "semseg": torch.randint(0, TASKS["semseg"], (batch, H, W), generator=g),
        "depth": 1 + 60 * torch.rand(batch, 1, H, W, generator=g),
        "normals": F.normalize(torch.randn(batch, 3, H, W, generator=g), dim=1),
    }
    labels["semseg"][:, 0] = 255  # ignored pixels
    labels["depth"][..., 0] = 0  # no measurement
    return labels


def _step(model, cfg: ModelConfig, seed: int = 0, tasks=TASKS):
    """Forward a random batch, MTI-Net's loss (every scale with the final weight), backward."""
    batch = _batch(seed)
    outputs = model(batch["image"])
    criterion = MultiTaskLoss(
        list(tasks), WEIGHTS, intermediate_scales=intermediate_scales(cfg), intermediate="sum"
    )
    total, logs = criterion(outputs, batch)
    total.backward()
    return outputs, total, logs


@pytest.fixture(scope="module")
def trained():
    """One mti-net on HRNetV2-W18-small after one forward/backward: (cfg, model, outputs, total, logs)."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(cfg, TASKS)
    return (cfg, model, *_step(model, cfg))


def _shapes(outputs) -> dict[str, dict[int, tuple[int, ...]]]:
    return {t: {s: tuple(v.shape) for s, v in per.items()} for t, per in outputs.items()}


def _expected(tasks, main, batch: int = 2) -> dict[str, dict[int, tuple[int, ...]]]:
    out = {}
    for t, n in tasks.items():
        out[t] = {s: (batch, n, H >> s, W >> s) for s in SCALES}
        if t in main:
            out[t][0] = (batch, n, H, W)
    return out


def test_outputs_at_every_scale(trained):
    cfg, model, outputs, _, _ = trained
    assert isinstance(model, MTINet) and intermediate_scales(cfg) == SCALES
    assert _shapes(outputs) == _expected(TASKS, TASKS)
    # Eq. 1 at every scale on that scale's backbone width (18, 36, 72, 144).
    for s, c in zip(SCALES, model.encoder.channels):
        block = model.distill[str(s)]
        assert isinstance(block, PADNetDistillation) and block.channels == c
    assert sorted(model.fpm) == ["3", "4", "5"]  # propagated from 1/32, 1/16, 1/8 to the next finer scale


def test_gradients_reach_every_parameter(trained):
    _, model, _, _, _ = trained
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for part in ("encoder", "task_layers", "initial_head", "distill", "fpm", "features", "head"):
        assert any(p.grad.abs().sum() > 0 for p in getattr(model, part).parameters()), part
    groups = model.param_groups()
    assert {id(p) for p in groups["backbone"]} == {id(p) for p in model.encoder.parameters()}
    assert len(groups["backbone"]) + len(groups["decoder"]) == len(list(model.parameters()))
    (shared,) = model.shared_layer("depth")
    assert any(shared is p for p in groups["backbone"])


def test_deep_supervision_sums_every_scale(trained):
    _, _, _, total, logs = trained
    expected = 0.0
    for t, w in WEIGHTS.items():
        assert {k for k in logs if k.startswith(f"loss/{t}/")} == {f"loss/{t}/s{s}" for s in (0, *SCALES)}
        expected += w * (logs[f"loss/{t}/s0"] + sum(logs[f"loss/{t}/s{s}"] for s in SCALES))
    assert total.item() == pytest.approx(float(expected), rel=1e-5)


def test_fpm_attention_sums_to_one_over_tasks(trained):
    _, model, _, _, _ = trained
    fpm = model.fpm["4"]
    assert isinstance(fpm, FeaturePropagation) and fpm.channels == 72
    g = torch.Generator().manual_seed(1)
    feats = {t: torch.randn(2, 72, 4, 8, generator=g) for t in TASKS}
    fpm.eval()
    with torch.no_grad():
        masks = fpm.attention(feats)
        refined = fpm(feats)
        shared = fpm.reduce((masks * torch.stack([feats[t] for t in TASKS], 1)).flatten(1, 2))
    fpm.train()
    assert masks.shape == (2, 3, 72, 4, 8)
    torch.testing.assert_close(masks.sum(1), torch.ones(2, 72, 4, 8))
    assert masks.std() > 0  # not a uniform average
    for t in TASKS:  # residual refinement by the task's SE gate on the shared representation
        torch.testing.assert_close(refined[t], feats[t] + fpm.se[t](shared))


def test_aux_tasks_are_front_end_only():
    torch.manual_seed(0)
    cfg = _cfg(aux_tasks=("normals",))
    model = build_model(cfg, TASKS)
    assert model.main_tasks == ("semseg", "depth") and model.aux_tasks == ("normals",)
    assert "normals" not in model.head and "normals" in model.fpm["5"].se
    outputs, total, logs = _step(model, cfg, seed=2)
    assert _shapes(outputs) == _expected(TASKS, ("semseg", "depth"))
    assert "loss/normals/s0" not in logs and all(f"loss/normals/s{s}" in logs for s in SCALES)
    # Normals still feed the distillation of the main tasks (Eq. 1, l over every task) but receive none: no gate
    # into normals exists, and every parameter gets a finite gradient.
    gates = model.distill["2"].gates
    assert {f"normals_to_{t}" for t in ("semseg", "depth")} <= set(gates)
    assert not any(name.endswith("_to_normals") for name in gates)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("aux", [("edges",), tuple(TASKS)])
def test_bad_aux_tasks_are_rejected(aux):
    with pytest.raises(ValueError, match="model.aux_tasks"):
        MTINet(TASKS, _cfg(aux_tasks=aux))


def test_without_fpm_nothing_is_propagated(trained):
    _, with_fpm, _, _, _ = trained
    torch.manual_seed(0)
    model = build_model(_cfg(fpm=False), TASKS)
    assert len(model.fpm) == 0
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) < count(with_fpm)
    with torch.no_grad():
        outputs = model(_batch(3)["image"])
    assert _shapes(outputs) == _expected(TASKS, TASKS)


def test_fpn_backbone():
    torch.manual_seed(0)
    tasks = {"semseg": 5, "depth": 1}
    model = build_model(dataclasses.replace(_cfg(), backbone="fpn-resnet18"), tasks)
    assert model.encoder.channels == [256] * 4
    with torch.no_grad():
        outputs = model(_batch(4)["image"])
    assert _shapes(outputs) == _expected(tasks, tasks)


def test_ctal_ms():
    if "ctal" not in EXCHANGE_BLOCKS:
        pytest.skip('no "ctal" exchange block registered')
    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg(), arch="ctal-ms")
    tasks = {"semseg": 5, "depth": 1}  # two tasks: the HW x HW affinities at stride 4 are the slow part
    model = build_model(cfg, tasks)
    # As the released MEMANet: MTI-Net's front end and FPM, no per-scale distillation, one CTAL block on the
    # aggregated task features (67 channels on HRNetV2-W18-small: a quarter of 18 + 36 + 72 + 144).
    assert len(model.distill) == 0 and sorted(model.fpm) == ["3", "4", "5"]
    assert isinstance(model.aggregated, EXCHANGE_BLOCKS["ctal"]) and model.aggregated.channels == 67
    outputs, total, _ = _step(model, cfg, seed=5, tasks=tasks)
    assert _shapes(outputs) == _expected(tasks, tasks) and torch.isfinite(total)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
