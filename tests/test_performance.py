"""Fast paths as options: activation checkpointing, channels-last, fused optimisers, compile, and the mixed
precision chosen by the device. Each must train exactly (or within float tolerance) like the plain path."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config, train_steps
from uda import hardware
from uda.config import ModelConfig
from uda.engine import Trainer
from uda.models import build_model

SMALL = (16, 32, 32, 64, 64)
REPO = Path(__file__).resolve().parents[1]


def saved_activation_bytes(model: torch.nn.Module, image: torch.Tensor) -> tuple[dict, int]:
    """The model's outputs and the bytes autograd keeps for the backward pass."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(image)
    return out, total


@pytest.mark.parametrize(
    "arch,decoder", [("mteb", "3ways"), ("stl", "deeplab"), ("padnet", "3ways"), ("cross-stitch", "3ways")]
)
def test_checkpointing_gives_the_same_step_with_less_kept_memory(arch, decoder):
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(
            arch=arch,
            decoder=decoder,
            backbone="resnet18",
            pretrained=False,
            decoder_channels=SMALL,
            checkpointing=checkpointing,
        )
        model = build_model(cfg, {"semseg": 5, "depth": 1}).train()
        torch.manual_seed(1)  # the same dropout masks (DeepLab's ASPP) in both runs
        out, kept = saved_activation_bytes(model, torch.rand(2, 3, 64, 128))
        loss = sum(o.square().mean() for per in out.values() for o in per.values())
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((loss.detach(), kept, grads, model.state_dict()))
    (loss0, kept0, grads0, state0), (loss1, kept1, grads1, state1) = results
    assert kept1 < 0.5 * kept0, (kept0, kept1)  # far fewer activations kept for the backward pass
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(torch.equal(grads0[k], grads1[k]) for k in grads0)
    # Same keys (checkpoints interchange) and BatchNorm statistics moved once, not twice by the recomputation.
    assert state0.keys() == state1.keys() and all(torch.equal(state0[k], state1[k]) for k in state0)


def test_checkpointed_blocks_run_plainly_in_evaluation():
    torch.manual_seed(0)
    cfg = ModelConfig(
        arch="mtl", backbone="resnet18", pretrained=False, decoder_channels=SMALL, checkpointing=True
    )
    model = build_model(cfg, {"semseg": 5}).eval()
    with torch.no_grad():
        _, kept = saved_activation_bytes(model, torch.rand(1, 3, 64, 128))
    assert kept == 0


def two_steps(cfg) -> tuple[Trainer, list[float]]:
    trainer = Trainer(cfg)
    return trainer, [logs["loss/total"] for logs in train_steps(trainer, 2)]


def test_channels_last_and_fused_optimiser_train_like_the_plain_path(toy_root, tmp_path):
    plain = tiny_config(toy_root, tmp_path / "plain", arch="mteb")
    fast = replace(
        plain,
        out=str(tmp_path / "fast"),
        train=replace(plain.train, channels_last=True),
        optim=replace(plain.optim, fused=True),
        model=replace(plain.model, checkpointing=True),
    )
    _, reference = two_steps(plain)
    trainer, losses = two_steps(fast)
    assert losses == pytest.approx(reference, rel=1e-4)  # step 2 follows the fused update of step 1
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    conv = trainer.model.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_option_compiles_the_model_and_checkpoints_keep_their_keys(
    toy_root, tmp_path, fresh_accelerator
):
    import torch._functorch.config as functorch_config

    from uda.hardware import set_compile_memory_budget

    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl")
    try:
        trainer = Trainer(replace(cfg, train=replace(cfg.train, compile=True, compile_memory_budget=0.5)))
        assert functorch_config.activation_memory_budget == 0.5  # read when the graphs compile, at step 1
    finally:
        set_compile_memory_budget(1.0)
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)  # compiled lazily, at step 1
    from safetensors.torch import load_file

    keys = load_file(trainer.save_checkpoint() / "model.safetensors").keys()
    plain = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    assert keys == plain.state_dict().keys()
    assert not any("_orig_mod" in k for k in keys)


def test_checkpointed_mteb_keeps_only_its_inputs_and_outputs_per_task():
    from uda.models.checkpointing import enable_checkpointing
    from uda.models.exchange import MTEB, XTAM

    tasks, shape = ("semseg", "depth", "normals"), (2, 16, 32, 64)
    kept, grads = {}, {}
    for mode in ("plain", "xtam", "mteb"):
        torch.manual_seed(0)
        block = MTEB(tasks, 16).train()
        if mode == "xtam":
            block.CHECKPOINT_METHODS = ()  # the xTAMs alone, as before per-task refinement was checkpointed
        if mode != "plain":
            enable_checkpointing(block, (XTAM,))
        torch.manual_seed(1)
        features = {t: torch.randn(shape, requires_grad=True) for t in tasks}
        stored: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t, kept=stored: kept.append(t) or t, lambda t: t
        ):
            out = block(features)
        inputs = {f.data_ptr() for f in features.values()}
        new = {t.data_ptr(): t.untyped_storage().nbytes() for t in stored if t.data_ptr() not in inputs}
        kept[mode] = sum(new.values())  # bytes the block keeps beyond its inputs
        sum(o.square().mean() for o in out.values()).backward()
        grads[mode] = [features[t].grad for t in tasks] + [p.grad for p in block.parameters()]
    # Only references to the inputs stay for the backward pass: the xTAMs and fusions rerun one task at a time.
    assert kept["mteb"] == 0 < kept["xtam"] < kept["plain"], kept
    for mode in ("xtam", "mteb"):
        assert all(torch.equal(a, b) for a, b in zip(grads["plain"], grads[mode])), mode


def test_checkpointing_and_compile_are_refused_together_in_one_line(toy_root, tmp_path):
    from uda.config import ConfigError

    cfg = tiny_config(toy_root, tmp_path / "run")
    with pytest.raises(ConfigError, match="^model.checkpointing=true and train.compile=true do not combine"):
        replace(cfg, model=replace(cfg.model, checkpointing=True), train=replace(cfg.train, compile=True))


@pytest.mark.parametrize(
    "budget,compile,says",
    [
        (0.0, True, r"^train.compile_memory_budget=0.0: must lie in \(0, 1\]"),
        (1.5, True, r"^train.compile_memory_budget=1.5: must lie in \(0, 1\]"),
        (
            0.5,
            False,
            r"^train.compile_memory_budget=0.5 acts on the compiled model only; set train.compile=true",
        ),
    ],
)
def test_a_compile_memory_budget_outside_its_range_or_without_compile_is_refused(budget, compile, says):
    from uda.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=says):
        TrainConfig(compile=compile, compile_memory_budget=budget)
    assert TrainConfig(compile=True, compile_memory_budget=0.5).compile_memory_budget == 0.5


def test_the_compile_memory_budget_makes_the_compiled_graph_keep_fewer_activations():
    # The same small convolutional network compiled twice: with a budget of 0.1 the partitioner must keep
    # fewer bytes for the backward pass than with 1 (torch's default), and give the same gradients.
    import torch._dynamo
    import torch._functorch.config as functorch_config

    from uda.hardware import set_compile_memory_budget

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        *[
            m
            for _ in range(3)
            for m in (torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        ]
    )
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    kept, grads = {}, {}
    try:
        for budget in (1.0, 0.1):
            torch._dynamo.reset()
            set_compile_memory_budget(budget)
            out, kept[budget] = saved_activation_bytes(torch.compile(net), x)
            out.sum().backward()
            grads[budget] = x.grad.clone()
            x.grad = None
    finally:
        set_compile_memory_budget(1.0)
        torch._dynamo.reset()
    assert functorch_config.activation_memory_budget == 1.0
    assert 0 < kept[0.1] < kept[1.0], kept
    torch.testing.assert_close(grads[0.1], grads[1.0], rtol=1e-4, atol=1e-5)


AVX2 = frozenset({"avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}


AMX = AVX512_BF16 | {"amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    "flags,ratio,requested,chosen,says",
    [
        (AVX2, None, "auto", "no", "fp32 (the CPU has no AVX-512 BF16 or AMX;"),
        # AVX-512 BF16 without AMX: the probe decides (measured 1.36x the fp32 step on a Xeon, 0.55x on an EPYC)
        (AVX512_BF16, 1.36, "auto", "no", "fp32 (AVX-512 BF16 without AMX; bf16 autocast measured 1.36x"),
        (AVX512_BF16, 0.55, "auto", "bf16", "bf16 (AVX-512 BF16 without AMX; bf16 autocast measured 0.55x"),
        (AVX512_BF16, 0.8, "auto", "bf16", "bf16 ("),
        (AVX512_BF16, 0.81, "auto", "no", "fp32 ("),
        (AMX, None, "auto", "bf16", "bf16 (the CPU has AMX-BF16)"),
        (
            AVX2,
            None,
            "bf16",
            "bf16",
            "slow here (the CPU has no AVX-512 BF16 or AMX; bf16 autocast measured 16x",
        ),
        (AVX512_BF16, 1.36, "bf16", "bf16", "bf16 autocast measured 1.36x the fp32 time on this CPU); use"),
        (AVX512_BF16, 0.55, "bf16", "bf16", None),
        (AMX, None, "bf16", "bf16", None),
        (AVX2, None, "no", "no", None),
        (AVX512_BF16, None, "no", "no", None),
        (AVX2, None, "fp16", "fp16", "no CPU autocast"),
    ],
)
def test_mixed_precision_follows_the_cpu(flags, ratio, requested, chosen, says, monkeypatch):
    def probe():
        assert ratio is not None, (
            "the bf16 probe runs only on AVX-512 BF16 CPUs without AMX, for auto and bf16"
        )
        return ratio

    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(hardware, "bf16_probe_ratio", probe)
    precision, message = hardware.choose_mixed_precision(requested, torch.device("cpu"))
    assert precision == chosen
    assert (message is None) if says is None else (says in message), message


def test_the_bf16_probe_measures_once_per_machine_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path))
    cache = tmp_path / hardware.PROBE_FILE
    cache.write_text("[1, 2]")  # JSON of another shape is measured again and rewritten
    hardware.bf16_probe_ratio()
    assert isinstance(json.loads(cache.read_text()), dict)
    cache.write_text("{not json")  # so is a damaged cache
    ratio = hardware.bf16_probe_ratio()
    assert 0 < ratio < 1000
    assert json.loads(cache.read_text()) == {hardware._probe_key(): ratio}
    monkeypatch.setattr(hardware, "_conv_step_times", lambda: pytest.fail("measured again"))
    assert hardware.bf16_probe_ratio() == ratio
    other_threads = torch.get_num_threads() + 1  # another thread count is another measurement
    monkeypatch.setattr(hardware, "_conv_step_times", lambda: (3.0, 2.0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: other_threads)
    assert hardware.bf16_probe_ratio() == 1.5
    assert len(json.loads(cache.read_text())) == 2


@pytest.mark.parametrize("bf16,chosen", [(True, "bf16"), (False, "fp16")])
def test_mixed_precision_auto_on_gpus(bf16, chosen, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    precision, message = hardware.choose_mixed_precision("auto", torch.device("cuda"))
    assert precision == chosen and message == f"train.mixed_precision=auto: {chosen} on Some GPU"
    assert hardware.choose_mixed_precision("no", torch.device("cuda")) == ("no", None)


def test_the_run_trains_with_the_chosen_precision_and_says_it(toy_root, tmp_path, capsys, fresh_accelerator):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", mixed_precision="auto")
    trainer = Trainer(cfg)
    expected = hardware.choose_mixed_precision("auto", torch.device("cpu"))[0]
    assert trainer.accelerator.mixed_precision == expected
    assert "train.mixed_precision=auto: " in capsys.readouterr().out


PAGE_FAULTS = """
import resource, sys, torch
from uda.hardware import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else False


def faults_of_a_64_mib_activation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 << 20)  # 64 MiB of float32, freed at once
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


# The first ones map new memory either way (kept, until freed blocks fit the next ones: a few steps).
for _ in range(8):
    faults_of_a_64_mib_activation()
print(applied, *(faults_of_a_64_mib_activation() for _ in range(16)))
"""


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc parameters"
)
def test_kept_memory_is_reused_without_page_faults():
    def faults(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run(
            [sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()
        return out[-17], [int(n) for n in out[-16:]]

    applied, kept = faults("keep")
    default_applied, default = faults("default")
    assert applied == "True" and default_applied == "False"
    # By default each freed 64 MiB went back to the system and is faulted in again (16384 pages of 4 KiB
    # each time); kept, the blocks are reused as they are. The heap sometimes needs a block or two more than the
    # warm-up to settle (15 runs: 0 or 1 of the 16 blocks faulted in again), hence a bound and not zero.
    assert min(default) > 4000 and sum(kept) < sum(default) / 4, (kept, default)


def test_cpu_runs_keep_freed_memory_unless_told_not_to(tmp_path, monkeypatch, fresh_accelerator):
    from uda.config import TrainConfig

    calls = []
    monkeypatch.setattr(hardware, "keep_freed_memory", lambda: calls.append(1) or True)
    hardware.make_accelerator(TrainConfig(log_with="none", mixed_precision="no"), str(tmp_path))
    assert calls == [1]
    hardware.make_accelerator(
        TrainConfig(log_with="none", mixed_precision="no", keep_cpu_memory=False), str(tmp_path)
    )
    assert calls == [1]
