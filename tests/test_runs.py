"""Run options and run folders: the launcher's mixed precision, trackers, gradient accumulation, the text log,
loss file, curves and report history, checkpoint rotation, the `latest` pointer and named network files."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config
from uda import checkpoint
from uda.config import ConfigError, TrainConfig
from uda.hardware import make_accelerator, trackers
from uda.runlog import flat_config

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ mixed precision and trackers


def test_the_launchers_mixed_precision_reaches_the_run(fresh_accelerator, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(
        "ACCELERATE_MIXED_PRECISION", "bf16"
    )  # what `accelerate launch --mixed_precision bf16` sets
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    # Before a run's log exists the line goes to the console: no run log left by an earlier test in this process.
    monkeypatch.setattr(logging.getLogger("uda"), "handlers", [])
    acc = make_accelerator(TrainConfig(log_with="none"), str(tmp_path))
    assert acc.mixed_precision == "bf16"
    assert "mixed precision: bf16 (from accelerate launch)" in capsys.readouterr().out


def test_the_configs_mixed_precision_wins_over_the_launchers(fresh_accelerator, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert (
        make_accelerator(TrainConfig(mixed_precision="no", log_with="none"), str(tmp_path)).mixed_precision
        == "no"
    )


def test_accelerate_launch_mixed_precision_flag_reaches_the_accelerator(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from uda.config import TrainConfig\n"
        "from uda.hardware import make_accelerator\n"
        f"print('precision=' + make_accelerator(TrainConfig(log_with='none'), {str(tmp_path)!r}).mixed_precision)\n"
    )
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "UDA_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision=bf16" in done.stdout and "(from accelerate launch)" in done.stdout


def test_trackers_are_checked_before_the_run():
    assert trackers("none") == [] and trackers("tensorboard") == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        trackers("tensorbord")
    missing = next(
        n for n, (module, _) in __import__("uda.hardware").hardware.TRACKERS.items() if not _has(module)
    )
    with pytest.raises(ConfigError, match=r"pip install \S+"):
        trackers(f"tensorboard+{missing}")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_hyper_parameters_are_logged_flat():
    flat = flat_config(
        {"model": {"arch": "mteb", "decoder_channels": (16, 32)}, "adapt": None, "loss": {"weights": {}}}
    )
    assert flat == {
        "model.arch": "mteb",
        "model.decoder_channels": "16,32",
        "adapt": "none",
        "loss.weights": "none",
    }


# ------------------------------------------------------------------ gradient accumulation


def test_grad_accum_sums_the_micro_batch_gradients(toy_root, tmp_path):
    """grad_accum=2 on two micro-batches: the gradient of the one optimiser step is the mean of the two
    micro-batches' gradients, each computed alone (BatchNorm in train mode uses batch statistics only)."""
    from dataclasses import replace

    from uda.data.loader import move_to
    from uda.engine import Trainer
    from uda.objectives import Step

    def trainer(accum: int) -> Trainer:
        cfg = tiny_config(toy_root, tmp_path / f"a{accum}", grad_accum=accum)
        return Trainer(replace(cfg, optim=replace(cfg.optim, clip_grad_norm=0.0)))

    accumulated = trainer(2)
    stream = accumulated.batches(0)
    micro = [move_to(next(stream), accumulated.accelerator.device) for _ in range(2)]
    seen, steps = [], []
    opt = accumulated.optimizer

    def record_step(*args, **kwargs):
        seen.append(
            {n: p.grad.clone() for n, p in accumulated.model.named_parameters() if p.grad is not None}
        )

    opt.step = record_step
    logs = accumulated.train_step(micro)
    assert len(seen) == 1 and logs["finite"] == 1.0

    single = trainer(1)
    for batch in micro:
        single.optimizer.zero_grad(set_to_none=True)
        loss, _ = single.compose(Step(0, batch, single.forward_domains(batch), single.accelerator))
        single.accelerator.backward(loss)
        steps.append({n: p.grad.clone() for n, p in single.model.named_parameters() if p.grad is not None})
    assert seen[0].keys() == steps[0].keys()
    for name, grad in seen[0].items():
        torch.testing.assert_close(
            grad, (steps[0][name] + steps[1][name]) / 2, rtol=1e-4, atol=1e-6, msg=name
        )


def test_merged_step_is_the_iterations_whole_batch():
    from uda.objectives import Step

    def step(value: float) -> Step:
        out = torch.full((2, 1, 4, 4), value, requires_grad=True) * 2
        batch = {"target": {"image": torch.full((2, 3, 4, 4), value), "meta": [{"id": value}] * 2}}
        return Step(3, batch, {"target": {"depth": {0: out}}}, None)

    merged = Step.merge([step(1.0), step(2.0)])
    assert merged.index == 3 and merged.batch["target"]["image"].shape[0] == 4
    assert len(merged.batch["target"]["meta"]) == 4
    out = merged.outputs["target"]["depth"][0]
    assert out.shape[0] == 4 and not out.requires_grad and out[2:].eq(4.0).all()


# ------------------------------------------------------------------ checkpoints


def test_latest_pointer_named_files_and_fallback(fresh_accelerator, tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model, disc = nn.Linear(3, 2), nn.Linear(2, 1)
    opt, dopt = torch.optim.Adam(model.parameters()), torch.optim.Adam(disc.parameters())
    model, opt, disc, dopt = acc.prepare(model, opt, disc, dopt)
    names = {"model_1.safetensors": "discriminators.safetensors"}
    config = {"model": {"arch": "mtl"}}
    for step in (1, 2, 3):
        checkpoint.save(acc, tmp_path, step, {"config": config}, keep=2, names=names)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert checkpoint.latest_checkpoint(tmp_path) == root / "step-0000003"
    named = root / "step-0000003" / "discriminators.safetensors"
    assert named.read_bytes() == (root / "step-0000003" / "model_1.safetensors").read_bytes()
    assert (
        "discriminators.safetensors"
        in json.loads((named.parent / checkpoint.STATE_FILE).read_text())["files"]
    )
    # A stale pointer (its checkpoint gone) is ignored: loading scans the complete checkpoints.
    (root / "latest").unlink()
    (root / "latest").write_text("step-0000009\n")
    assert checkpoint.latest_checkpoint(tmp_path) is None
    found, state = checkpoint.load(acc, tmp_path, config)
    assert found == root / "step-0000003" and state["step"] == 3


def test_run_folder_a_person_can_read(toy_root, tmp_path, monkeypatch):
    import uda.engine
    from uda.engine import Trainer

    monkeypatch.setattr(uda.engine, "ETA_STEPS", 1)  # the expected time is said after the warm steps

    out = tmp_path / "run"
    cfg = tiny_config(
        toy_root, out, iterations=2, val_every=1, ckpt_every=1, keep_checkpoints=1, val_batches=1
    )
    trainer = Trainer(cfg)
    trainer.fit()
    log = (out / "train.log").read_text()
    assert "images/s" in log and "peak memory" in log and "step 1: validation val/semseg/miou=" in log
    assert re.search(r"expected: 0 more steps at [0-9.]+ s/step", log), log
    rows = [json.loads(line) for line in (out / "train_losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("loss/total" in r for r in rows)
    assert (out / "curves" / "losses.png").stat().st_size > 0 and (out / "curves" / "metrics.png").is_file()
    report = (out / "report.md").read_text()
    assert "## Validation history" in report and "| 1 |" in report and "| 2 |" in report
    assert "](curves/metrics.png)" in report
    assert json.loads((out / "metrics.json").read_text())["history"][0]["step"] == 1
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000002"]
    assert os.path.realpath(out / "checkpoints" / "latest") == str(
        (out / "checkpoints" / "step-0000002").resolve()
    )
