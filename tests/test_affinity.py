"""Affinity exchange blocks: PAP-Net propagation and CTAL (cross-task affinity learning)."""

from __future__ import annotations

import pytest
import torch

from uda.config import ModelConfig
from uda.models.affinity import CTAL, PAPPropagation
from uda.models.checkpointing import enable_checkpointing
from uda.models.exchange import EXCHANGE_BLOCKS
from uda.models.multitask import build_model

TASKS = ("semseg", "depth", "normals")
NYUD = {"semseg": 40, "depth": 1, "normals": 3, "edges": 1}
BLOCKS = {"pap": PAPPropagation, "ctal": CTAL}


def _features(tasks=TASKS, b=2, c=8, h=8, w=12, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t: torch.randn(b, c, h, w, generator=g) for t in tasks}


@pytest.mark.parametrize("kind", ["pap", "ctal"])
def test_shapes_and_every_parameter_gets_a_finite_gradient(kind):
    torch.manual_seed(0)
    block = BLOCKS[kind](TASKS, 8)
    x = _features()
    out = block(x)
    assert set(out) == set(TASKS)
    assert all(out[t].shape == (2, 8, 8, 12) for t in TASKS)
    sum(o.sum() for o in out.values()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["pap", "ctal"])
def test_gamma_zero_is_the_identity(kind):
    block = BLOCKS[kind](TASKS, 8, gamma=0.0)
    x = _features()
    out = block(x)
    assert all(torch.equal(out[t], x[t]) for t in TASKS)


@pytest.mark.parametrize("kind", ["pap", "ctal"])
def test_invalid_options_name_the_config_key(kind):
    with pytest.raises(ValueError, match="model.affinity_gamma"):
        BLOCKS[kind](TASKS, 8, gamma=1.5)
    with pytest.raises(ValueError, match="needs >= 2"):
        BLOCKS[kind](("semseg",), 8)
    key, bad = ("pap_iterations", {"iterations": 0}) if kind == "pap" else ("ctal_kernel", {"kernel": 4})
    with pytest.raises(ValueError, match=f"model.{key}"):
        BLOCKS[kind](TASKS, 8, **bad)


def test_pap_affinity_rows_sum_to_one_and_a_constant_map_stays_constant():
    torch.manual_seed(0)
    block = PAPPropagation(TASKS, 8, iterations=3)
    x = _features()
    affinity = block.affinities(*(x[t] for t in TASKS))
    assert affinity.shape == (2, 3, 96, 96)
    assert (affinity >= 0).all()
    torch.testing.assert_close(affinity.sum(-1), torch.ones(2, 3, 96), atol=1e-5, rtol=0)
    torch.testing.assert_close(block.mixing_weights().sum(1), torch.ones(3))
    # initial mixing: own task 0.5, the others share the rest
    torch.testing.assert_close(block.mixing_weights()[0], torch.tensor([0.5, 0.25, 0.25]))
    constant = torch.full((2, 8, 8, 12), 0.7)
    for k in range(3):
        torch.testing.assert_close(block.propagate(k, affinity, constant), constant, atol=1e-5, rtol=0)


def _loop_fused_affinity(block: CTAL, features: list[torch.Tensor]) -> torch.Tensor:
    """M[b, i, j] = bias + sum_t sum_(dy,dx) w[t, dy, dx] * A_t[b, i, j shifted by (dy - p, dx - p)]."""
    b, _, h, w = features[0].shape
    n, p = h * w, block.kernel // 2
    emb = []
    for t, f in zip(block.tasks, features):
        e = block.reduce[t](f)  # [B,C',H,W]
        emb.append(e / e.norm(dim=1, keepdim=True).clamp_min(1e-12))
    weight, bias = block.fusion.weight[0], block.fusion.bias[0]  # [T,k,k], scalar
    m = torch.zeros(b, n, n)
    for bi in range(b):
        for i in range(n):
            yi, xi = divmod(i, w)
            for j in range(n):
                yj, xj = divmod(j, w)
                total = bias.clone()
                for k, e in enumerate(emb):
                    for dy in range(block.kernel):
                        for dx in range(block.kernel):
                            ys, xs = yj + dy - p, xj + dx - p
                            if 0 <= ys < h and 0 <= xs < w:
                                cosine = (e[bi, :, yi, xi] * e[bi, :, ys, xs]).sum()
                                total = total + weight[k, dy, dx] * cosine
                m[bi, i, j] = total
    return m


@torch.no_grad()
def test_ctal_shared_fusion_equals_an_explicit_loop():
    torch.manual_seed(0)
    block = CTAL(("semseg", "depth"), 6, kernel=3)
    x = _features(("semseg", "depth"), b=1, c=6, h=4, w=5)
    f = [x[t] for t in block.tasks]
    torch.testing.assert_close(block.fused_affinity(*f), _loop_fused_affinity(block, f), atol=1e-5, rtol=0)
    # forward: propagated_i = mean_j M[i, j] value_j
    m = block.fused_affinity(*f)
    value = block.value["depth"](x["depth"]).flatten(2)  # [1,C,HW]
    attended = torch.einsum("ij,bcj->bci", m[0], value) / 20
    expected = 0.05 * attended.view(1, 6, 4, 5) + 0.95 * x["depth"]
    torch.testing.assert_close(block(x)["depth"], expected, atol=1e-5, rtol=1e-5)


def test_ctal_runs_at_any_resolution_with_the_same_weights():
    torch.manual_seed(0)
    block = CTAL(TASKS, 8, kernel=5).eval()
    state = {k: v.clone() for k, v in block.state_dict().items()}
    assert block(_features())["semseg"].shape == (2, 8, 8, 12)
    out = block(_features(h=16, w=20))
    assert all(out[t].shape == (2, 8, 16, 20) for t in TASKS)
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())
    assert block.fusion.weight.shape == (1, 3, 5, 5)


def _materialised_ctal(block: CTAL, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTAL as released (up to the shared fusion and the 1/HW): M formed, attended = value · Mᵀ / HW."""
    f = [x[t] for t in block.tasks]
    b, c, h, w = f[0].shape
    m = block.fused_affinity(*f)
    out = {}
    for t in block.tasks:
        value = block.value[t](x[t]).flatten(2)
        attended = torch.bmm(value, m.transpose(1, 2)) / (h * w)
        out[t] = block.gamma * attended.view(b, c, h, w) + (1 - block.gamma) * x[t]
    return out


def test_ctal_factored_forward_equals_the_materialised_affinity_with_gradients():
    torch.manual_seed(0)
    block = CTAL(TASKS, 8, gamma=0.3)
    results = []
    for run in (block, lambda x: _materialised_ctal(block, x)):
        block.zero_grad()
        x = {t: v.requires_grad_() for t, v in _features().items()}
        out = run(x)
        sum((o * o).sum() for o in out.values()).backward()
        results.append([out[t] for t in TASKS] + [p.grad.clone() for p in block.parameters()])
        results[-1] += [x[t].grad for t in TASKS]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pap_checkpointed_propagation_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = PAPPropagation(TASKS, 8, gamma=0.5, iterations=2)
    ckpt = PAPPropagation(TASKS, 8, gamma=0.5, iterations=2)
    ckpt.load_state_dict(plain.state_dict())
    enable_checkpointing(ckpt, ())
    grads = []
    for block in (plain, ckpt):
        x = {t: v.requires_grad_() for t, v in _features().items()}
        out = block(x)
        sum((o * o).sum() for o in out.values()).backward()
        grads.append([p.grad for p in block.parameters()] + [x[t].grad for t in TASKS])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("kind", "cls"), [("pap", PAPPropagation), ("ctal", CTAL)])
def test_registered_and_built_from_config(kind, cls):
    assert EXCHANGE_BLOCKS[kind] is cls
    cfg = ModelConfig(affinity_gamma=0.1, ctal_kernel=5, pap_iterations=2)
    block = cls.from_config(TASKS, 8, cfg, scale=2)
    assert block.gamma == 0.1
    if kind == "pap":
        assert block.iterations == 2
    else:
        assert block.kernel == 5 and block.fusion.kernel_size == (5, 5)
    with pytest.raises(ValueError, match="model.affinity_gamma"):
        cls.from_config(TASKS, 8, ModelConfig(affinity_gamma=-0.1), scale=2)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ["pap-net", "ctal"])
def test_hrnet_models_build_and_predict_at_the_input_size(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, backbone="hrnetv2-w18-small", pretrained=False), NYUD).eval()
    kind = {"pap-net": PAPPropagation, "ctal": CTAL}[arch]
    assert isinstance(model.exchange, kind)
    if arch == "pap-net":  # ATRC Table 1: PAP 4.54 M on HRNet18 with the four NYUD-v2 tasks
        assert _params(model) == pytest.approx(4.54e6, rel=0.05)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 128))
    assert all(out[t][0].shape == (1, n, 64, 128) for t, n in NYUD.items())
    assert all(out[t][2].shape == (1, n, 16, 32) for t, n in NYUD.items())


@pytest.mark.parametrize("arch", ["pap-net", "ctal"])
def test_resnet_3ways_models_put_the_block_at_decoder_scale_3(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch,
        backbone="resnet18",
        pretrained=False,
        decoder_channels=(16, 32, 32, 64, 64),
        exchange_scales=(3,),
    )
    tasks = {"semseg": 5, "depth": 1}
    model = build_model(cfg, tasks).eval()
    block = model.exchange["3"]
    assert isinstance(block, {"pap-net": PAPPropagation, "ctal": CTAL}[arch]) and block.channels == 64
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 128))
    assert all(out[t][0].shape == (1, n, 64, 128) for t, n in tasks.items())
