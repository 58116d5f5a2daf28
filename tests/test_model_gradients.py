"""Every trainable parameter of the ATRC, MTI-Net, affinity and XTasC architectures gets a gradient from one
backward of all the model's outputs. Training under DistributedDataParallel runs without
find_unused_parameters (uda.hardware.make_accelerator), so a parameter left out of a step's graph stops the next
step. Inputs are not multiples of 32."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from uda.config import ModelConfig
from uda.models.atrc import CONTEXTS, SEARCH, search_modules
from uda.models.multitask import build_model

TASKS = {"semseg": 5, "depth": 1, "normals": 3}
SIZE = (50, 70)

CASES = [
    *(("atrc", {"atrc_contexts": c}) for c in CONTEXTS),
    ("atrc", {"atrc_contexts": SEARCH}),
    ("atrc-fpm", {"atrc_contexts": "tlabel"}),
    ("atrc-fpm", {"atrc_contexts": SEARCH}),
    ("mti-net", {}),
    ("mti-net", {"aux_tasks": ("normals",)}),
    ("mti-net", {"fpm": False}),
    ("ctal-ms", {}),
    ("pap-net", {}),
    ("ctal", {}),
    ("xtasc-unet", {"backbone": "resnet18"}),
]


def _model(arch: str, **kw) -> torch.nn.Module:
    cfg = ModelConfig(**({"arch": arch, "backbone": "hrnetv2-w18-small", "pretrained": False} | kw))
    return build_model(cfg, TASKS)


def _backward(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    out = model(torch.rand(2, 3, *SIZE, generator=g))
    sum(o.float().mean() for per in out.values() for o in per.values()).backward()


@pytest.mark.parametrize(
    ("arch", "options"), CASES, ids=[f"{a}-{'-'.join(map(str, o.values()))}" for a, o in CASES]
)
def test_every_parameter_gets_a_gradient(arch, options):
    torch.manual_seed(0)
    model = _model(arch, **options)
    _backward(model)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["atrc", "atrc-fpm"])
@pytest.mark.parametrize("frozen", ["some", "all"])
def test_search_with_frozen_blocks_trains_under_ddp(arch, frozen, tmp_path):
    """A frozen block computes one context; under DDP the others enter the graph with weight 0 (two steps: DDP
    raises at the second if a parameter had no gradient in the first)."""
    torch.manual_seed(0)
    model = _model(arch, atrc_contexts=SEARCH)
    (module,) = search_modules(model)
    with torch.no_grad():
        if frozen == "all":
            module.frozen.fill_(CONTEXTS.index("global"))
        else:
            module.frozen[0, 1] = CONTEXTS.index("local")
            module.frozen[1, 0] = CONTEXTS.index("none")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for step in range(2):
            ddp.zero_grad(set_to_none=True)
            _backward(ddp, seed=step)
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing[:5]
    finally:
        dist.destroy_process_group()
