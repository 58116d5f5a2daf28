"""Models: encoder, 3-ways decoder, exchange blocks (xTAM, mTEB, PAD-Net), assembled models, discriminator."""

from __future__ import annotations

import dataclasses
import math
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models import resnet18

from uda.config import ModelConfig
from uda.models import (
    MTEB,
    XTAM,
    PADNetDistillation,
    PatchDiscriminator,
    PretrainedWeightsError,
    ResNetEncoder,
    build_exchange,
    build_model,
)

SD = {"semseg": 5, "depth": 1}
SDNE = {"semseg": 5, "depth": 1, "normals": 3, "edges": 1}
SMALL = (8, 16, 16, 32, 32)  # small decoder widths keep the training tests fast on 2 CPU cores
H, W = 64, 128


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"backbone": "resnet18", "pretrained": False, **kw})


def _shapes(out) -> dict:
    return {t: {s: tuple(v.shape) for s, v in d.items()} for t, d in out.items()}


# --------------------------------------------------------------------------- encoder


@pytest.mark.parametrize(
    ("name", "channels"), [("resnet18", [64, 64, 128, 256, 512]), ("resnet50", [64, 256, 512, 1024, 2048])]
)
def test_encoder_output_stride_16(name, channels):
    enc = ResNetEncoder(name).eval()
    assert enc.channels == channels
    with torch.no_grad():
        feats = enc(torch.rand(1, 3, H, W))
    sizes = [(H // 2, W // 2), (H // 4, W // 4), (H // 8, W // 8), (H // 16, W // 16), (H // 16, W // 16)]
    assert [tuple(f.shape[1:]) for f in feats] == [(c, *s) for c, s in zip(channels, sizes)]


def test_pretrained_download_failure_explains_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError) as err:
        ResNetEncoder("resnet18", pretrained=True)
    message = str(err.value)
    assert "\n" not in message
    assert "model.pretrained=false" in message and "model.weights_path=" in message
    assert torch.hub.get_dir() in message and "resnet18-" in message


def test_weights_path_loads_a_torchvision_state_dict(tmp_path):
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    enc = ResNetEncoder("resnet18", pretrained=True, weights_path=str(path))
    assert torch.equal(enc.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    with pytest.raises(PretrainedWeightsError, match="model.pretrained=false"):
        ResNetEncoder("resnet18", weights_path=str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------- xTAM


def test_xtam_correlation_branch_is_silent_at_init_but_alpha_learns():
    torch.manual_seed(0)
    xtam = XTAM(16, downscale=4)
    f_i, f_j = torch.randn(2, 16, 12, 20), torch.randn(2, 16, 12, 20)
    out = xtam(f_i, f_j)
    with torch.no_grad():
        for proj in (xtam.query, xtam.key, xtam.value):
            proj[0].weight.add_(torch.randn_like(proj[0].weight))
    assert torch.equal(xtam(f_i, f_j), out)
    plain = xtam.correlation_tokens
    xtam.correlation_tokens = lambda f, g: torch.zeros_like(plain(f, g))  # the branch removed altogether
    assert torch.equal(xtam(f_i, f_j), out)
    del xtam.correlation_tokens
    xtam.zero_grad()
    xtam(f_i, f_j).square().mean().backward()
    assert xtam.alpha.grad.abs().sum() > 0
    assert xtam.query[0].weight.grad.abs().sum() == 0  # reached only through alpha, which is zero


def test_xtam_and_mteb_without_self_attention_learn_from_the_start():
    # App. A.2's variant f_{j->i} = P(alpha * xtask): with a zero alpha P's input is exactly 0, BN(0) = 0 and the
    # ReLU passes no gradient at 0, so the block and mTEB's fusion would stay dead (mTEB = identity) forever.
    torch.manual_seed(0)
    xtam = XTAM(8, downscale=2, self_attention=False).train()
    f_i, f_j = torch.randn(2, 8, 8, 12), torch.randn(2, 8, 8, 12)
    out = xtam(f_i, f_j)
    assert out.abs().sum() > 0
    (out * torch.randn_like(out)).sum().backward()
    assert xtam.alpha.grad.abs().sum() > 0 and xtam.query[0].weight.grad.abs().sum() > 0
    assert XTAM(8).alpha.abs().sum() == 0  # with self-attention: zero, as the paper

    block = MTEB(["semseg", "depth"], 8, downscale=2, self_attention=False).train()
    feats = {"semseg": torch.randn(2, 8, 8, 12), "depth": torch.randn(2, 8, 8, 12)}
    refined = block(feats)
    assert not torch.equal(refined["semseg"], feats["semseg"])
    sum((v * torch.randn_like(v)).sum() for v in refined.values()).backward()
    dead = [n for n, p in block.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def explicit_correlation(xtam: XTAM, f_i: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """xTAM's correlation-guided attention (downscale 2, one image) written out with the full matrices."""
    q = xtam.query(f_i[..., ::2, ::2]).flatten(2)[0]  # [C,N]: nearest downscale by 2
    src = F.max_pool2d(g, 2)
    k, v = xtam.key(src).flatten(2)[0], xtam.value(src).flatten(2)[0]
    c, n = q.shape
    expected = torch.zeros(c, n)
    if xtam.attention in ("spatial", "both"):
        expected = expected + v @ torch.softmax(q.T @ k / math.sqrt(c), dim=1).T  # the N x N matrix
    if xtam.attention in ("channel", "both"):
        expected = expected + torch.softmax(q @ k.T / math.sqrt(n), dim=1) @ v
    h, w = f_i.shape[-2] // 2, f_i.shape[-1] // 2
    return expected.view(1, c, h, w).repeat_interleave(2, -2).repeat_interleave(2, -1)


@pytest.mark.parametrize("attention", ["spatial", "channel", "both"])
def test_xtam_correlation_matches_the_formula_in_outputs_and_gradients(attention):
    torch.manual_seed(0)
    xtam = XTAM(8, downscale=2, attention=attention).train()  # train: BatchNorm from the batch, both ways
    f_i, g = torch.randn(1, 8, 6, 10, requires_grad=True), torch.randn(1, 8, 6, 10, requires_grad=True)
    weight = torch.randn(1, 8, 6, 10)  # a loss that weighs every output differently
    grads = []
    for correlation in (xtam.correlation, lambda a, b: explicit_correlation(xtam, a, b)):
        out = correlation(f_i, g)
        grads.append(
            torch.autograd.grad((out * weight).sum(), [f_i, g, *xtam.parameters()], allow_unused=True)
        )
        grads[-1] = [torch.zeros(()) if t is None else t for t in grads[-1]]
        grads[-1].insert(0, out.detach())
    fused, explicit = grads
    assert any(t.abs().sum() > 0 for t in explicit[1:])
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [(12, 20), (13, 21)])
@pytest.mark.parametrize("self_attention", [True, False])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_xtam_projects_the_correlation_at_token_resolution_exactly(size, self_attention, layout):
    # The forward applies P's 1x1 weights to the correlation branch before its nearest upsampling; it must
    # equal the paper's order P(cat[alpha * up(x), self(g)]) in outputs and in every gradient (train mode:
    # BatchNorm from the batch), also where the size is not a multiple of the downscale, and in channels-last.
    # In float64, so that the only difference left, the order of the sums, stays far below the tolerance.
    torch.manual_seed(0)
    xtam = XTAM(8, downscale=4, attention="both", self_attention=self_attention).train().double()
    xtam = xtam.to(memory_format=layout)
    with torch.no_grad():
        xtam.alpha.normal_()  # the correlation branch on
    f_i, f_j = (
        torch.randn(2, 8, *size, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        for _ in range(2)
    )
    weight = torch.randn(2, 8, *size, dtype=torch.float64)

    def paper_order(f_i, f_j):
        g = xtam.extract(f_j)
        parts = [xtam.alpha * xtam.correlation(f_i, g)]
        if xtam.self_attention is not None:
            parts.append(xtam.self_attention(g))
        return xtam.proj(torch.cat(parts, dim=1))

    results = []
    for forward in (xtam, paper_order):
        out = forward(f_i, f_j)
        grads = torch.autograd.grad((out * weight).sum(), [f_i, f_j, *xtam.parameters()])
        results.append([out.detach(), *grads])
    assert xtam.alpha.abs().sum() > 0 and results[1][3].abs().sum() > 0
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


class LargestTensor(TorchDispatchMode):
    """Records the size of the largest tensor any operation produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


@pytest.mark.parametrize("attention", ["spatial", "both"])
def test_xtam_never_holds_the_token_by_token_matrix(attention):
    # 64 x 64 tokens (N = 4096): the attention matrix would hold N^2 = 16.8M numbers, every other tensor of
    # the block at most C x 4 x N (the upsampled output). Memory stays linear in tokens, forward and backward.
    xtam = XTAM(16, downscale=1, attention=attention).train()
    f_i, g = torch.randn(1, 16, 64, 64, requires_grad=True), torch.randn(1, 16, 64, 64, requires_grad=True)
    with LargestTensor() as largest:
        xtam.correlation(f_i, g).sum().backward()
    assert largest.numel <= 16 * 4 * 4096 < 4096**2, largest.numel
    assert f_i.grad.abs().sum() > 0 and xtam.query[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(12, 20), (13, 21), (3, 5)])
@pytest.mark.parametrize("attention", ["spatial", "channel", "both"])
@pytest.mark.parametrize("self_attention", [True, False])
def test_xtam_standalone_any_size_and_options(size, attention, self_attention):
    torch.manual_seed(0)
    xtam = XTAM(6, downscale=4, attention=attention, self_attention=self_attention)
    f_i, f_j = torch.randn(2, 6, *size), torch.randn(2, 6, *size)
    out = xtam(f_i, f_j)
    assert out.shape == f_i.shape
    with torch.no_grad():
        xtam.alpha.fill_(1.0)  # once alpha is on, the correlation path changes the output
        before = xtam(f_i, f_j)
        xtam.query[0].weight.mul_(-3.0)
        assert not torch.allclose(xtam(f_i, f_j), before)


def test_xtam_rejects_bad_options():
    with pytest.raises(ValueError, match="spatial"):
        XTAM(8, attention="temporal")
    with pytest.raises(ValueError, match="equal shape"):
        XTAM(8)(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 6))


# --------------------------------------------------------------------------- mTEB and other blocks


def test_mteb_parameter_count_matches_paper_table3():
    block = MTEB(["semseg", "depth"], 128, downscale=4)
    count = sum(p.numel() for p in block.parameters())
    assert count == 773_120  # per direction: extract 147584, SA 147456, xTAM 50048, proj 24832; post 16640
    assert 0.77e6 * 0.98 <= count <= 0.77e6 * 1.02


@pytest.mark.parametrize("fusion", ["add", "prod", "concat"])
@pytest.mark.parametrize("attention", ["spatial", "channel", "both"])
@pytest.mark.parametrize("self_attention", [True, False])
def test_mteb_options_keep_shapes(fusion, attention, self_attention):
    torch.manual_seed(0)
    tasks = ["semseg", "depth", "normals"]
    block = build_exchange(
        "mteb", tasks, 8, downscale=2, fusion=fusion, attention=attention, self_attention=self_attention
    )
    assert len(block.xtam) == 6  # one per ordered pair
    feats = {t: torch.randn(2, 8, 9, 14) for t in tasks}
    out = block(feats)
    assert set(out) == set(tasks) and all(out[t].shape == feats[t].shape for t in tasks)
    if fusion == "add":  # post's ReLU output is >= 0, added as a residual
        assert all((out[t] >= feats[t] - 1e-6).all() for t in tasks)


def test_padnet_distillation_is_a_residual_of_gated_messages():
    torch.manual_seed(0)
    block = PADNetDistillation(["semseg", "depth"], 8)
    feats = {"semseg": torch.randn(2, 8, 6, 6), "depth": torch.randn(2, 8, 6, 6)}
    gate = block.gates["depth_to_semseg"]
    expected = feats["semseg"] + gate.feature(feats["depth"]) * torch.sigmoid(gate.mask(feats["depth"]))
    torch.testing.assert_close(block(feats)["semseg"], expected)
    with torch.no_grad():
        for g in block.gates.values():
            g.feature.weight.zero_()
    assert all(torch.equal(v, feats[t]) for t, v in block(feats).items())


def test_build_exchange_registry():
    feats = {"semseg": torch.randn(1, 4, 3, 3), "depth": torch.randn(1, 4, 3, 3)}
    assert build_exchange("none", list(feats), 4)(feats) == feats
    with pytest.raises(ValueError, match="mteb"):
        build_exchange("mti-net", list(feats), 4)
    with pytest.raises(ValueError, match=">= 2"):
        build_exchange("mteb", ["semseg"], 4)


# --------------------------------------------------------------------------- assembled models


def _loss(out, targets) -> torch.Tensor:
    total = 0.0
    for task, scales in out.items():
        for pred in scales.values():
            target = F.interpolate(targets[task], size=pred.shape[-2:], mode="nearest")
            if task == "semseg":
                total = total + F.cross_entropy(pred, target[:, 0].long())
            else:
                total = total + F.l1_loss(pred, target)
    return total


EXPECTED_SCALES = {
    "stl": (1, 0),
    "mtl": (1, 0),
    "3ways-padnet": (1, 0),
    "mteb": (1, 0),
    "padnet": (4, 0),
    "cross-stitch": (1, 0),
}


@pytest.mark.parametrize("tasks", [SD, SDNE], ids=["SD", "SDNE"])
@pytest.mark.parametrize("arch", list(EXPECTED_SCALES))
def test_every_arch_trains_with_exact_output_shapes(arch, tasks):
    torch.manual_seed(0)
    model = build_model(_cfg(arch=arch, decoder_channels=SMALL), tasks)
    image = torch.rand(2, 3, H, W)
    targets = {
        "semseg": torch.randint(0, 5, (2, 1, H, W)).float(),
        "depth": torch.rand(2, 1, H, W),
        "normals": F.normalize(torch.randn(2, 3, H, W), dim=1),
        "edges": (torch.rand(2, 1, H, W) > 0.9).float(),
    }
    out = model(image)
    assert _shapes(out) == {
        t: {s: (2, n, H >> s, W >> s) for s in EXPECTED_SCALES[arch]} for t, n in tasks.items()
    }
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    for _ in range(4):
        loss = _loss(model(image), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_cross_stitch_at_identity_is_exactly_the_separate_task_networks():
    torch.manual_seed(0)
    stitched = build_model(
        _cfg(arch="cross-stitch", decoder_channels=SMALL, cross_stitch_init=1.0), SD
    ).eval()
    stl = build_model(_cfg(arch="stl", decoder_channels=SMALL, decoder="3ways"), SD).eval()
    stl.load_state_dict({k: v for k, v in stitched.state_dict().items() if not k.startswith("units.")})
    image = torch.rand(2, 3, H, W)
    a, b = stitched(image), stl(image)
    assert all(torch.equal(a[t][s], b[t][s]) for t in b for s in b[t])
    # the paper's initialisation (0.9 self, 0.1 other) mixes the task networks; the units learn
    torch.manual_seed(0)
    mixed = build_model(_cfg(arch="cross-stitch", decoder_channels=SMALL), SD).eval()
    assert torch.allclose(mixed.units[0].alpha[:, :, 0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    mixed.load_state_dict(
        {**stitched.state_dict(), **{k: v for k, v in mixed.state_dict().items() if "units" in k}}
    )
    out = mixed(image)
    assert not torch.equal(out["depth"][0], b["depth"][0])
    out["semseg"][0].sum().backward()
    assert all(u.alpha.grad is not None and u.alpha.grad.abs().sum() > 0 for u in mixed.units)
    assert (
        len(mixed.units) == 5
        and [u.alpha.shape[-1] for u in mixed.units] == mixed.nets["semseg"].encoder.channels
    )


def test_exchange_at_several_scales_emits_intermediates_there():
    torch.manual_seed(0)
    model = build_model(_cfg(arch="mteb", exchange_scales=(1, 2)), SD)  # default decoder widths
    assert set(model.exchange) == {"1", "2"}
    assert model.exchange["2"].channels == 128 and model.exchange["2"].xtam["depth_to_semseg"].downscale == 2
    out = model(torch.rand(2, 3, H, W))
    assert _shapes(out) == {t: {s: (2, n, H >> s, W >> s) for s in (2, 1, 0)} for t, n in SD.items()}
    odd = model(torch.rand(2, 3, 70, 130))  # sizes not divisible by 2^s: scale 0 is still the input size
    assert odd["depth"][0].shape[-2:] == (70, 130) and odd["depth"][1].shape[-2:] == (35, 65)


def test_intermediate_outputs_come_before_the_exchange():
    torch.manual_seed(0)
    model = build_model(_cfg(arch="mtl", decoder_channels=SMALL), SD).eval()
    image = torch.rand(1, 3, H, W)
    with torch.no_grad():
        plain = model(image)
        model.exchange["1"].forward = lambda feats: {t: torch.zeros_like(f) for t, f in feats.items()}
        zeroed = model(image)
    for t in SD:
        assert torch.equal(plain[t][1], zeroed[t][1])
        assert not torch.allclose(plain[t][0], zeroed[t][0])


def test_disparity_heads_and_output_scales():
    torch.manual_seed(0)
    cfg = _cfg(arch="mteb", decoder_channels=SMALL, depth_output="disparity", output_scales=(0, 1, 2, 3))
    out = build_model(cfg, SD)(torch.rand(2, 3, H, W))
    assert sorted(out["depth"]) == [0, 1, 2, 3] and sorted(out["semseg"]) == [0, 1, 2, 3]
    assert all(((v > 0) & (v < 1)).all() for v in out["depth"].values())
    assert (out["semseg"][0] < 0).any()  # semseg stays raw logits


@pytest.mark.parametrize("arch", ["mteb", "stl", "padnet"])
def test_param_groups_split_backbone_from_decoder(arch):
    model = build_model(_cfg(arch=arch, decoder_channels=SMALL), SD)
    groups = model.param_groups()
    backbone, decoder = {id(p) for p in groups["backbone"]}, {id(p) for p in groups["decoder"]}
    assert not backbone & decoder and backbone | decoder == {id(p) for p in model.parameters()}
    encoders = [m for m in model.modules() if isinstance(m, ResNetEncoder)]
    assert len(encoders) == (2 if arch == "stl" else 1)
    assert backbone == {id(p) for e in encoders for p in e.parameters()}


def test_bad_model_configs_are_rejected():
    with pytest.raises(ValueError, match="exchange_scales"):
        build_model(_cfg(arch="mteb", exchange_scales=(0,)), SD)
    with pytest.raises(ValueError, match="arch"):
        build_model(dataclasses.replace(_cfg(), arch="mti-net"), SD)


# --------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_patch_discriminator(spectral_norm):
    torch.manual_seed(0)
    disc = PatchDiscriminator(5, ndf=16, spectral_norm=spectral_norm)
    x = torch.randn(2, 5, H, W)
    for _ in range(30):  # power iterations of the spectral norm run in train-mode forwards
        out = disc(x)
    assert out.shape == (2, 1, 2, 4)
    convs = [m for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    sigma = torch.linalg.matrix_norm(convs[1].weight.detach().flatten(1), ord=2)
    assert (abs(sigma.item() - 1.0) < 0.05) == spectral_norm
