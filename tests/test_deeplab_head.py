"""DeepLab task decoder (model.decoder=deeplab) of the STL/MTL baselines: layout, outputs, counts, errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead

from uda.config import ModelConfig
from uda.models import PADNet, build_model
from uda.models.decoder import DeepLabDecoder
from uda.models.multitask import MultiTaskModel, STLModel, intermediate_scales

SD = {"semseg": 16, "depth": 1}
H, W = 64, 128
SMALL = (32, 64)  # deepest map 2x4: the smallest the disparity head's reflection padding takes


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": "resnet18", "pretrained": False, "decoder": "deeplab", **kw})


def _numel(params) -> int:
    return sum(p.numel() for p in params)


# Built once per file: building and running the ResNet-18 models dominates the runtime on 2 CPU cores.
@pytest.fixture(scope="module")
def mtl() -> MultiTaskModel:
    torch.manual_seed(0)
    return build_model(_cfg(arch="mtl"), SD).train()


@pytest.fixture(scope="module")
def stl() -> STLModel:
    return build_model(_cfg(arch="stl"), SD).train()


# --------------------------------------------------------------------------- layout


def test_head_is_torchvision_aspp_at_rates_12_24_36_with_256_channels(mtl):
    head = mtl.decoders["semseg"]
    assert isinstance(head, DeepLabDecoder)
    aspp = head[0]
    assert isinstance(aspp, ASPP)
    # Branches: 1x1, three 3x3 atrous, image pooling; all 256 channels on the 512-channel layer4 of ResNet-18.
    assert len(aspp.convs) == 5
    assert aspp.convs[0][0].kernel_size == (1, 1)
    assert [branch[0].dilation for branch in aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert all(branch[0].kernel_size == (3, 3) for branch in aspp.convs[1:4])
    assert isinstance(aspp.convs[4][0], nn.AdaptiveAvgPool2d)
    assert [branch[1 if i == 4 else 0].in_channels for i, branch in enumerate(aspp.convs)] == [512] * 5
    assert {m.out_channels for m in aspp.modules() if isinstance(m, nn.Conv2d)} == {256}
    project = aspp.project
    assert project[0].in_channels == 5 * 256 and isinstance(project[3], nn.Dropout) and project[3].p == 0.5
    conv, bn = head[1], head[2]
    assert (conv.kernel_size, conv.in_channels, conv.out_channels, conv.bias) == ((3, 3), 256, 256, None)
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(head[3], nn.ReLU)
    out = head[4]
    assert isinstance(out, nn.Conv2d) and out.kernel_size == (1, 1) and out.out_channels == 16


def test_raw_head_is_torchvision_deeplabhead_then_bilinear_x16():
    torch.manual_seed(0)
    ours = DeepLabDecoder(512, 16).eval()
    theirs = DeepLabHead(512, 16).eval()
    theirs.load_state_dict(ours.state_dict())  # same module layout, strict
    x = torch.randn(2, 512, 4, 8)
    with torch.no_grad():
        expected = nn.functional.interpolate(theirs(x), size=(H, W), mode="bilinear", align_corners=False)
        assert torch.allclose(ours(x, (H, W)), expected, atol=1e-6)
        assert ours(x).shape == (2, 16, 4 * 16, 8 * 16)  # default: x16


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("arch", ["stl", "mtl"])
def test_outputs_are_scale_0_at_input_size(arch, request):
    model = request.getfixturevalue(arch).eval()  # eval: batch 1 (ASPP's pooled BN needs 2 in training)
    for size in [(H, W), (50, 70)]:  # 50x70: not a multiple of 16
        with torch.no_grad():
            out = model(torch.rand(1, 3, *size))
        assert {t: {s: tuple(v.shape) for s, v in d.items()} for t, d in out.items()} == {
            "semseg": {0: (1, 16, *size)},
            "depth": {0: (1, 1, *size)},
        }
    model.train()


def test_disparity_head_is_sigmoid_3x3_in_0_1():
    model = build_model(_cfg(arch="mtl", depth_output="disparity"), {"depth": 1}).train()
    last = model.decoders["depth"][4]
    assert [type(m) for m in last] == [nn.ReflectionPad2d, nn.Conv2d, nn.Sigmoid]
    assert last[1].kernel_size == (3, 3)
    with torch.no_grad():
        disparity = model(torch.rand(2, 3, *SMALL))["depth"][0]
    assert disparity.shape == (2, 1, *SMALL)
    assert disparity.min() > 0 and disparity.max() < 1


def test_inverse_depth_head_starts_at_depth_init(mtl):
    cfg = _cfg(arch="mtl")
    assert cfg.depth_output == "inverse"
    assert isinstance(mtl.decoders["depth"][4], nn.Conv2d)
    assert torch.all(mtl.decoders["depth"][4].bias == cfg.depth_init)
    assert not torch.any(mtl.decoders["semseg"][4].bias == cfg.depth_init)
    with torch.no_grad():
        depth = mtl(torch.rand(2, 3, *SMALL))["depth"][0]
    # Random 1x1 weights on 256 BN+ReLU features move the mean by ~0.2 (std): far from 0 = infinitely far.
    assert abs(depth.mean().item() - cfg.depth_init) < 2.0


# --------------------------------------------------------------------------- training


def test_gradients_reach_encoder_and_every_head_parameter(mtl):
    mtl.zero_grad(set_to_none=True)
    out = mtl(torch.rand(2, 3, *SMALL))
    (out["semseg"][0].square().mean() + out["depth"][0].mean()).backward()
    for task in SD:
        for name, p in mtl.decoders[task].named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (task, name)
        assert all(p.grad.abs().sum() > 0 for p in mtl.shared_layer(task))
    assert all(p.grad is not None for p in mtl.encoder.parameters())
    mtl.zero_grad(set_to_none=True)


def test_stl_networks_are_separate_and_param_groups_split_encoders(stl):
    stl.zero_grad(set_to_none=True)
    stl(torch.rand(2, 3, *SMALL))["depth"][0].mean().backward()
    assert all(p.grad is None for p in stl.nets["semseg"].parameters())
    assert all(p.grad is not None for p in stl.nets["depth"].parameters())
    stl.zero_grad(set_to_none=True)
    assert stl.shared_layer("depth") == stl.nets["depth"].encoder.last_layer()
    groups = stl.param_groups()
    encoders = [p for net in stl.nets.values() for p in net.encoder.parameters()]
    heads = [p for net in stl.nets.values() for p in net.decoders.parameters()]
    assert [id(p) for p in groups["backbone"]] == [id(p) for p in encoders]
    assert {id(p) for p in groups["decoder"]} == {id(p) for p in heads}
    assert len(groups["backbone"]) + len(groups["decoder"]) == len(list(stl.parameters()))


# --------------------------------------------------------------------------- parameter counts


def _aspp_conv_head(in_channels: int, out_channels: int, disparity: bool = False) -> int:
    """Parameters of one DeepLab head, from the layer shapes (BN: weight + bias = 2 x channels)."""
    bn = 2 * 256
    aspp_1x1 = in_channels * 256 + bn  # 1x1 conv (no bias) + BN
    aspp_atrous = 3 * (in_channels * 256 * 3 * 3 + bn)  # three 3x3 atrous convs (no bias) + BN
    aspp_pool = in_channels * 256 + bn  # image pooling: 1x1 conv (no bias) + BN
    aspp_project = 5 * 256 * 256 + bn  # 1x1 projection of the 5 concatenated branches + BN
    conv3x3 = 256 * 256 * 3 * 3 + bn  # Conv3x3(256) (no bias) + BN
    last = 256 * out_channels * (9 if disparity else 1) + out_channels  # 1x1 conv (3x3 for disparity) + bias
    return aspp_1x1 + aspp_atrous + aspp_pool + aspp_project + conv3x3 + last


def test_sd_parameter_counts_match_the_layer_shapes_resnet18(mtl, stl):
    encoder = _numel(resnet18().parameters()) - (512 * 1000 + 1000)  # torchvision ResNet-18 minus fc
    assert encoder == 11_689_512 - 513_000 == 11_176_512
    heads = _aspp_conv_head(512, 16) + _aspp_conv_head(512, 1)
    # ASPP 131_584 + 3 x 1_180_160 + 131_584 + 328_192 = 4_131_840; 3x3 590_336; 1x1 4_112 (semseg) / 257.
    assert heads == (4_131_840 + 590_336 + 4_112) + (4_131_840 + 590_336 + 257)
    assert _numel(mtl.parameters()) == encoder + heads == 20_625_233
    assert _numel(stl.parameters()) == 2 * encoder + heads == 31_801_745
    assert _numel(mtl.param_groups()["backbone"]) == encoder
    assert _numel(mtl.param_groups()["decoder"]) == heads
    assert _numel(stl.param_groups()["backbone"]) == 2 * encoder


def test_sd_parameter_counts_match_the_layer_shapes_resnet50():
    encoder = _numel(resnet50().parameters()) - (2048 * 1000 + 1000)  # torchvision ResNet-50 minus fc
    assert encoder == 25_557_032 - 2_049_000 == 23_508_032
    heads = _aspp_conv_head(2048, 16) + _aspp_conv_head(2048, 1)  # 16_129_552 + 16_125_697
    assert heads == 32_255_249
    model = build_model(_cfg(arch="mtl", backbone="resnet50"), SD)
    assert _numel(model.parameters()) == encoder + heads
    assert _numel(model.param_groups()["decoder"]) == heads


def test_disparity_head_parameter_count():
    model = build_model(_cfg(arch="mtl", depth_output="disparity"), {"depth": 1})
    assert _numel(model.decoders["depth"].parameters()) == _aspp_conv_head(512, 1, disparity=True)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("arch", ["mteb", "3ways-padnet", "padnet", "xtasc-unet", "xtasc-stl"])
def test_other_archs_refuse_the_deeplab_decoder(arch):
    cfg = _cfg(arch=arch)
    for call in (lambda: build_model(cfg, SD), lambda: intermediate_scales(cfg)):
        with pytest.raises(ValueError, match="model.decoder=deeplab") as err:
            call()
        assert "stl or mtl" in str(err.value) and f"model.arch={arch}" in str(err.value)


def test_direct_construction_refuses_exchange_blocks_and_side_outputs():
    with pytest.raises(ValueError, match="model.decoder=deeplab.*stl or mtl"):
        MultiTaskModel(SD, _cfg(arch="mteb"))
    with pytest.raises(ValueError, match="model.decoder=deeplab.*stl or mtl"):
        MultiTaskModel(SD, _cfg(arch="mtl"), exchange="padnet")
    with pytest.raises(ValueError, match="model.decoder=deeplab.*stl or mtl"):
        PADNet(SD, _cfg(arch="padnet"))
    # Side outputs at scales > 0 (e.g. the photometric objective's 0-3) do not exist without decoder stages.
    with pytest.raises(ValueError, match="output_scales"):
        MultiTaskModel(SD, _cfg(arch="mtl", output_scales=(0, 1, 2, 3)))
    with pytest.raises(ValueError, match="output_scales"):
        STLModel(SD, _cfg(arch="stl", output_scales=(1, 0)))


def test_intermediate_scales():
    assert intermediate_scales(_cfg(arch="mtl")) == ()
    assert intermediate_scales(_cfg(arch="stl")) == ()
    assert intermediate_scales(_cfg(arch="mtl", decoder="3ways")) == (1,)
    assert intermediate_scales(_cfg(arch="mtl", decoder="3ways", exchange_scales=(2, 1))) == (2, 1)


# --------------------------------------------------------------------------- 3-ways checkpoints unchanged

# Computed from the 3-ways MTL model (ResNet-18, semseg 5 + depth) before the deeplab decoder existed:
# sha256 of "key:shape" lines of its state dict, in order. A change here breaks existing checkpoints.
MTL_3WAYS_KEYS = 236
MTL_3WAYS_DIGEST = "8049e953f4cd1e49aab7a665cb6fbc1e0ce644ee1d55686f1f409362b27639cc"


def test_default_3ways_mtl_state_dict_is_unchanged():
    default = ModelConfig(arch="mtl", backbone="resnet18", pretrained=False)
    assert default.decoder == "3ways"
    torch.manual_seed(0)
    reference = build_model(default, {"semseg": 5, "depth": 1})
    torch.manual_seed(0)
    explicit = build_model(_cfg(arch="mtl", decoder="3ways"), {"semseg": 5, "depth": 1})
    ref_state, state = reference.state_dict(), explicit.state_dict()
    assert list(state) == list(ref_state)
    assert all(torch.equal(state[k], ref_state[k]) for k in state)
    assert [n for n, _ in explicit.named_parameters()] == [n for n, _ in reference.named_parameters()]
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert (len(state), hashlib.sha256(lines.encode()).hexdigest()) == (MTL_3WAYS_KEYS, MTL_3WAYS_DIGEST)
    assert not any(isinstance(m, DeepLabDecoder) for m in explicit.modules())
