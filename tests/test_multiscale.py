"""Multi-scale backbones (HRNetV2 through timm, FPN) and MultiScaleModel, ATRC's controlled comparison head."""

import numpy as np
import pytest
import torch

from uda.config import ModelConfig
from uda.models.backbone import PretrainedWeightsError
from uda.models.multiscale import HRNetBackbone, MultiScaleModel, build_backbone
from uda.models.multitask import build_model, intermediate_scales

NYUD = {"semseg": 40, "depth": 1, "normals": 3, "edges": 1}
SMALL = {"semseg": 5, "depth": 1}


def _cfg(**kw):
    return ModelConfig(**({"backbone": "hrnetv2-w18-small", "pretrained": False} | kw))


@pytest.mark.parametrize(
    "backbone, channels",
    [
        ("hrnetv2-w18-small", [18, 36, 72, 144]),
        ("hrnetv2-w18", [18, 36, 72, 144]),
        ("fpn-resnet18", [256] * 4),
    ],
)
def test_backbone_gives_four_scales(backbone, channels):
    net = build_backbone(_cfg(backbone=backbone))
    maps = net(torch.rand(1, 3, 64, 128))
    assert net.channels == channels
    assert [tuple(m.shape) for m in maps] == [
        (1, c, 64 // s, 128 // s) for c, s in zip(channels, (4, 8, 16, 32))
    ]


def test_hrnet_w48_channels():
    assert build_backbone(_cfg(backbone="hrnetv2-w48")).channels == [48, 96, 192, 384]


@pytest.mark.parametrize("arch", ["mtl", "padnet", "mteb", "cross-stitch"])
def test_shapes_and_gradients(arch):
    cfg = _cfg(arch=arch)
    model = build_model(cfg, SMALL)
    out = model(torch.rand(2, 3, 64, 128))
    scales = {0} | set(intermediate_scales(cfg))
    for task, n in SMALL.items():
        assert set(out[task]) == scales
        assert out[task][0].shape == (2, n, 64, 128)
        for s in scales - {0}:
            assert out[task][s].shape == (2, n, 64 >> s, 128 >> s)
    sum(o.float().mean() for per in out.values() for o in per.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_fpn_task_features_are_panoptic_fpn():
    """FPN backbones decode as Panoptic FPN's semantic branch (MTI-Net's FPN rows): 1, 1, 2, 3 conv stages from
    strides 4, 8, 16, 32 to stride 4, summed, 128 channels; HRNet keeps the concatenation head."""
    from uda.models.multiscale import ConcatHead, PanopticFPNHead

    model = build_model(_cfg(arch="mtl", backbone="fpn-resnet18"), SMALL)
    head = model.features["semseg"]
    assert isinstance(head, PanopticFPNHead) and head.width == 128
    convs = [sum(isinstance(m, torch.nn.Conv2d) for m in branch.modules()) for branch in head.branches]
    assert convs == [1, 1, 2, 3]
    maps = model.encoder(torch.rand(1, 3, 64, 128))
    assert head(maps).shape == (1, 128, 16, 32)
    assert isinstance(build_model(_cfg(arch="mtl"), SMALL).features["semseg"], ConcatHead)


def test_stl_is_one_network_per_task():
    model = build_model(_cfg(arch="stl"), SMALL)
    out = model(torch.rand(1, 3, 64, 128))
    assert set(out["semseg"]) == {0} and out["depth"][0].shape == (1, 1, 64, 128)
    assert len(model.nets) == 2 and all(isinstance(n, MultiScaleModel) for n in model.nets.values())


def test_cross_stitch_identity_init_is_plain_multitask():
    """Self weight 1: the units pass each task's features through, so outputs equal the MTL model's."""
    torch.manual_seed(0)
    stitched = build_model(_cfg(arch="cross-stitch", cross_stitch_init=1.0), SMALL).eval()
    plain = build_model(_cfg(arch="mtl"), SMALL).eval()
    plain.load_state_dict(
        {k: v for k, v in stitched.state_dict().items() if not k.startswith(("exchange.", "initial_head."))}
    )
    image = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        a, b = stitched(image), plain(image)
    for t in SMALL:
        assert torch.equal(a[t][0], b[t][0])


def test_parameter_counts_match_atrc_table1():
    """ATRC (Bruggemann et al. 2021) Table 1, NYUD-v2, HRNetV2-W18-small, four tasks: single task 16.09 M,
    multi-task 4.52 M, cross-stitch 4.52 M, PAD-Net C (MTI-Net's distillation) 5.50 M; within 1 %."""
    expected = {"stl": 16.09, "mtl": 4.52, "cross-stitch": 4.52, "padnet": 5.50}
    for arch, millions in expected.items():
        n = sum(p.numel() for p in build_model(_cfg(arch=arch), NYUD).parameters()) / 1e6
        assert abs(n - millions) / millions < 0.01, (arch, n)


def test_archs_that_do_not_fit_the_backbone_are_refused():
    with pytest.raises(ValueError, match="needs a dilated ResNet backbone"):
        build_model(_cfg(arch="3ways-padnet"), SMALL)
    with pytest.raises(ValueError, match="multi-scale backbone"):
        build_model(ModelConfig(arch="mti-net", backbone="resnet18", pretrained=False), SMALL)
    with pytest.raises(ValueError, match="model.aux_tasks"):
        build_model(_cfg(arch="mtl", aux_tasks=("depth",)), SMALL)
    # The paper tables' DeepLab head of stl/mtl is a dilated-ResNet head; multi-scale backbones keep theirs.
    assert isinstance(build_model(_cfg(arch="mtl", decoder="deeplab"), SMALL), MultiScaleModel)


def test_weights_path_loads_a_timm_checkpoint(tmp_path):
    """A local timm classification checkpoint (head included, .pth or .safetensors) loads exactly into the
    features-only backbone."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    full = timm.create_model("hrnet_w18_small_v2", pretrained=False).state_dict()
    torch.save(full, tmp_path / "hrnet_w18_small_v2.pth")
    save_file(full, str(tmp_path / "hrnet_w18_small_v2.safetensors"))
    for suffix in ("pth", "safetensors"):
        net = HRNetBackbone("hrnetv2-w18-small", weights_path=str(tmp_path / f"hrnet_w18_small_v2.{suffix}"))
        loaded = net.net.state_dict()
        assert loaded and all(torch.equal(v, full[k]) for k, v in loaded.items()), suffix
    with pytest.raises(
        PretrainedWeightsError, match=r"model.weights_path=.*missing\.pth.*model.pretrained=false"
    ):
        HRNetBackbone("hrnetv2-w18-small", weights_path=str(tmp_path / "missing.pth"))


def test_weights_path_that_does_not_fit_is_refused(tmp_path):
    """timm loads features-only models non-strictly: a file whose keys do not fit must not train from random
    weights silently."""
    import timm

    full = timm.create_model("hrnet_w18_small_v2", pretrained=False).state_dict()
    files = {
        "prefixed.pth": {f"encoder.{k}": v for k, v in full.items()},  # saved from a wrapper model
        "foreign.pth": {"foo.weight": torch.zeros(3)},
        "partial.pth": {k: v for k, v in full.items() if not k.startswith("stage4.")},
    }
    for name, state in files.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(PretrainedWeightsError) as info:
            HRNetBackbone("hrnetv2-w18-small", weights_path=str(tmp_path / name))
        message = str(info.value)
        assert "\n" not in message and name in message and "missing keys" in message, message
        assert "hrnet_w18_small_v2" in message and "model.pretrained=false" in message


def test_hrnet_takes_any_input_size():
    """Sizes that are not multiples of 32 are padded and every map cropped to ceil(size / stride), as a ResNet's;
    multiples of 32 are untouched."""
    net = build_backbone(_cfg()).eval()
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        before = net.net((image - net.mean) / net.std)  # what forward returned before padding existed
        after = net(image)
        odd = net(torch.rand(1, 3, 70, 90))
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert [tuple(m.shape[-2:]) for m in odd] == [(18, 23), (9, 12), (5, 6), (3, 3)]


@pytest.mark.parametrize("arch", ["mtl", "mteb", "mti-net", "atrc"])
def test_models_on_odd_input_sizes(arch):
    """Every HRNet model runs at 70x90 (KITTI's 375x1242 is no multiple of 32 either): outputs at the input size,
    scale s at ceil(size / 2^s), ATRC's aux at stride 4."""
    cfg = _cfg(arch=arch, atrc_contexts="tlabel")
    model = build_model(cfg, SMALL)
    out = model(torch.rand(1, 3, 70, 90))
    for task, n in SMALL.items():
        for s, o in out[task].items():
            stride = 4 if s == "aux" else 2**s
            assert o.shape[-2:] == (-(-70 // stride), -(-90 // stride)), (task, s)
        assert out[task][0].shape == (1, n, 70, 90)
    if arch == "mti-net":
        sum(o.float().mean() for per in out.values() for o in per.values()).backward()
        grads = [p.grad for p in model.encoder.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_offline_hub_gives_one_line_error(monkeypatch):
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(PretrainedWeightsError) as info:
        HRNetBackbone("hrnetv2-w18-small", pretrained=True)
    message = str(info.value)
    assert "\n" not in message and "model.pretrained=false" in message and "model.weights_path=" in message


def _run_config(toy_root, out, arch, **train):
    from dataclasses import replace

    from tests.conftest import tiny_config

    cfg = tiny_config(toy_root, out, arch=arch, tasks=("semseg", "depth", "normals"), **train)
    model = replace(cfg.model, backbone="hrnetv2-w18-small")
    loss = replace(cfg.loss, intermediate="sum" if arch in ("mti-net", "ctal-ms") else "mean")
    return replace(cfg, model=model, loss=loss)


def test_multiscale_run_resumes_exactly(toy_root, tmp_path, fresh_accelerator):
    """MTI-Net on HRNetV2-W18-small through the engine: stopped at step 3 and resumed, it ends where an
    uninterrupted run ends (losses and every weight bitwise)."""
    import shutil

    from uda.engine import Trainer

    cfg = _run_config(toy_root, tmp_path / "run", "mti-net", iterations=6, ckpt_every=3)
    full = Trainer(cfg)
    full.fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000006")
    resumed = Trainer(cfg)
    resumed.fit(resume=True)
    assert [row["step"] for row in resumed.loss_log] == [4, 5, 6]
    assert {f"loss/semseg/s{s}" for s in (0, 2, 3, 4, 5)} <= set(resumed.loss_log[0])
    for a, b in zip(full.loss_log[3:], resumed.loss_log):
        assert a["loss/total"] == b["loss/total"], (a, b)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize(
    "arch", ["stl", "mtl", "padnet", "cross-stitch", "pap-net", "ctal", "mti-net", "ctal-ms"]
)
def test_every_multiscale_arch_trains_in_bf16(arch, toy_root, tmp_path, fresh_accelerator):
    """Two bf16-autocast steps through the engine: finite losses for every task."""
    from uda.engine import Trainer
    from uda.models.exchange import EXCHANGE_BLOCKS

    if (
        arch in ("pap-net", "ctal", "ctal-ms")
        and ("pap" if arch == "pap-net" else "ctal") not in EXCHANGE_BLOCKS
    ):
        pytest.skip(f"{arch} not built yet")
    trainer = Trainer(_run_config(toy_root, tmp_path / arch, arch, iterations=2, mixed_precision="bf16"))
    trainer.fit()
    assert len(trainer.loss_log) == 2
    for row in trainer.loss_log:
        assert all(np.isfinite(row[f"loss/{t}/s0"]) for t in ("semseg", "depth", "normals")), row
