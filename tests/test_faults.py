"""Fault injection: what a killed, damaged, misconfigured or diverging run does.

Training runs last days, so every fault here must either be survived exactly (a SIGKILL, a kill during a
save, a damaged newest checkpoint, a non-finite step) or stop early with one line naming the file or key
and the fix (bad data, bad config, an unwritable run folder, a checkpoint of another model).

1. exact resume after SIGKILL            2. checkpoints: atomic, verified, never executed, config-checked
3. bad inputs through the real entry points   4. non-finite steps   5. two processes (gloo)
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_OVERRIDES, tiny_config, train_steps
from uda import checkpoint
from uda.cli import error_line
from uda.config import to_dict
from uda.data.decode import DataError
from uda.data.loader import EndlessSampler, train_loader
from uda.data.readers import build_dataset
from uda.data.transforms import EvalTransform
from uda.engine import Trainer, TrainingError
from uda.evaluate import load_trained_model

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

TINY = TINY_OVERRIDES
TINY_UDA = [*TINY, "adapt.disc_channels=8", "target.size=64,128", "target.num_workers=0"]


# ------------------------------------------------------------------------------------------------ helpers


def recipe_in_process(name: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Run recipes/<name>.py as `python recipes/<name>.py argv` inside this process: (exit code, out, err)."""
    path = REPO / "recipes" / f"{name}.py"
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def the_error_line(err: str) -> str:
    """The single `error: ...` line of a failed run's stderr (progress bars aside), and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a folder tree whose checkpoint and dataset files are hard links (cheap); change those only
    through rewrite() or rewrite_png() (which unlink first). Other run files (config.json, report.md,
    images), which a run writes in place, are real copies."""

    def copy(a: str, b: str) -> None:
        run_file = (Path(src) / "config.json").is_file() and f"{os.sep}checkpoints{os.sep}" not in a
        shutil.copy2(a, b) if run_file else os.link(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)  # checkpoints/latest stays a link
    return dst


def rewrite(path: Path, data: bytes) -> None:
    """Replace a (possibly hard-linked) file by new content without touching the other links."""
    path.unlink()
    path.write_bytes(data)


def rewrite_png(path: Path, array: np.ndarray) -> None:
    path.unlink()
    assert cv2.imwrite(str(path), array)


def differing(a: dict, b: dict) -> list[str]:
    """Names whose tensors differ (or exist on one side only)."""
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))


def optimizer_state(ckpt: Path, name: str = "optimizer.bin") -> list[torch.Tensor]:
    state = torch.load(ckpt / name, weights_only=True)
    return [t for _, per in sorted(state["state"].items()) for _, t in sorted(per.items())]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], processes: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of N CPU processes (gloo), output captured.

    Not `--cpu --num_processes N`: accelerate 1.15 then starts ONE process (its simple launcher spawns several
    only through mpirun with a hostfile). `--multi_gpu` goes through torch.distributed.run, and
    ACCELERATE_USE_CPU=1 keeps every process on the CPU, so the processes talk over gloo.
    """
    cmd = [
        ACCELERATE,
        "launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


# ================================================================================ 1. exact resume after SIGKILL


def kill_and_resume(recipe: str, argv: list[str], out: Path, iterations: int, log: Path) -> str:
    """Start the recipe as a subprocess, SIGKILL it at a random point after a random checkpoint exists,
    resume it with --resume; returns a description of where it was killed."""
    rng = random.Random(os.urandom(8))
    kill_after = rng.randint(1, iterations // 2)  # a checkpoint of this step (or later) must exist
    delay = rng.uniform(0.0, 0.4)  # then a random moment: mid-step, mid-save or mid-validation
    cmd = [PYTHON, str(REPO / "recipes" / f"{recipe}.py"), "--out", str(out), *argv]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 300
        while not any(checkpoint.step_of(c) >= kill_after for c in checkpoint.complete_checkpoints(out)):
            assert proc.poll() is None, f"run ended before being killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before the kill; the test proved nothing"
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    where = f"killed {delay:.2f}s after checkpoint {kill_after} existed; left {left}"
    assert f"step-{iterations:07d}" not in left, where
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, f"{where}\n{resumed.stderr[-3000:]}"
    assert "resumed from" in resumed.stdout, where
    return where


def assert_same_run(ref: Path, run: Path, iterations: int, models: tuple[str, ...], where: str) -> None:
    """Final weights, optimiser states and metrics.json of two run folders are identical."""
    a = ref / "checkpoints" / f"step-{iterations:07d}"
    b = run / "checkpoints" / f"step-{iterations:07d}"
    for name in models:
        assert not differing(load_file(a / name), load_file(b / name)), (name, where)
    for x, y in zip(optimizer_state(a), optimizer_state(b), strict=True):
        assert torch.equal(x, y), ("optimizer.bin", where)
    # The objectives' and task weighting's own state (e.g. learnt log-variances), bit for bit.
    states = [json.loads((d / checkpoint.STATE_FILE).read_text())["components"] for d in (a, b)]
    assert states[0] == states[1], where
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (ref, run))
    assert ma["history"] and ma == mb, where  # results, protocol and the validation history


# Two settings cover every kind of state: a supervised run with learnt task weights, and an adaptation run with
# its discriminators (own optimiser), the consistency objective's transfer networks (trained with the model)
# and self-training's EMA teacher (held by its objective, no optimiser).
@pytest.mark.parametrize("setting", ["uncertainty", "consistency+self-training"])
def test_sigkill_at_a_random_step_then_resume_is_exact(setting, toy_root, tmp_path, capsys, monkeypatch):
    iterations = 6
    schedule = [
        f"train.iterations={iterations}",
        "train.ckpt_every=1",
        "train.val_every=3",  # the validation history must survive the kill too
        "train.val_batches=1",
        "optim.lr_step_fraction=0.5",  # the learning rate drops mid-run: schedules follow the step
    ]
    if setting == "uncertainty":
        recipe, argv, models = (
            "synthia",
            ["--data-root", str(toy_root), *TINY, *schedule, "loss.weighting=uncertainty"],
            ("model.safetensors",),
        )
    else:  # adversarial + self-training + consistency on both domains
        recipe = "synthia2cityscapes"
        argv = ["--data-root", str(toy_root), *TINY_UDA, *schedule, "--consistency", "consistency"]
        argv += ["--method", "self-training+adversarial"]
        # the model, the discriminators, the task-transfer networks, the EMA teacher
        models = ("model.safetensors", "model_1.safetensors", "model_2.safetensors", "teacher.safetensors")
    code, _, _ = recipe_in_process(recipe, ["--out", str(tmp_path / "ref"), *argv], capsys, monkeypatch)
    assert code == 0
    where = kill_and_resume(recipe, argv, tmp_path / "cut", iterations, tmp_path / "killed.log")
    print(f"{setting}: {where}")  # shown with -s or -rP
    assert_same_run(tmp_path / "ref", tmp_path / "cut", iterations, models, where)


# ================================================================================ 2. checkpoints


@pytest.fixture(scope="module")
def run(toy_root, tmp_path_factory):
    """A finished 3-step run (checkpoints step-2 and step-3) and the torch RNG state at each save."""
    out = tmp_path_factory.mktemp("faults") / "run"
    cfg = tiny_config(toy_root, out, arch="mtl", iterations=3, ckpt_every=1, val_batches=1)
    trainer = Trainer(cfg)
    rng_at_save, save = {}, trainer.save_checkpoint

    def recording_save(*args, **kwargs):
        rng_at_save[trainer.step] = torch.get_rng_state()
        return save(*args, **kwargs)

    trainer.save_checkpoint = recording_save
    trainer.fit()
    assert [p.name for p in trainer.checkpoint_dirs()] == ["step-0000003", "step-0000002"]
    return cfg, out, rng_at_save


def copy_of(run, tmp_path: Path, **train):
    """(config pointing at a hard-linked copy of the run, that copy's folder) with train overrides."""
    cfg, out, _ = run
    copy = link_copy(out, tmp_path / "run")
    return replace(cfg, out=str(copy), train=replace(cfg.train, **train)), copy


def test_save_writes_a_temporary_folder_then_renames_it(run, tmp_path):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    trainer = Trainer(cfg)
    trainer.load_checkpoint()
    seen, save_state = [], trainer.accelerator.save_state

    def spy(folder):
        seen.append(Path(folder).name)
        result = save_state(folder)
        # Written, but not yet a checkpoint: no final folder, the newest complete one is still step 3.
        assert not (out / "checkpoints" / "step-0000004").exists()
        assert checkpoint.complete_checkpoints(out)[0].name == "step-0000003"
        return result

    trainer.accelerator.save_state = spy
    trainer.step = 4
    final = trainer.save_checkpoint()
    assert seen == [".tmp-step-0000004"] and final.name == "step-0000004"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-0000003",
        "step-0000004",
    ]
    assert checkpoint.latest_checkpoint(out) == final
    state = json.loads((final / checkpoint.STATE_FILE).read_text())
    # Every file is recorded with its size and hash; the config and history travel with the weights.
    assert set(state["files"]) >= {"model.safetensors", "optimizer.bin", "random_states_0.pkl"}
    assert state["step"] == 4 and state["config"]["model"]["arch"] == "mtl"
    assert [row["step"] for row in state["history"]] == [3]  # the run's final validation, kept from step 3


def test_kill_during_save_leaves_the_previous_checkpoint_usable(run, tmp_path, capsys):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    trainer = Trainer(cfg)
    trainer.load_checkpoint()
    save_state = trainer.accelerator.save_state

    def killed_half_way(folder):
        save_state(folder)
        rewrite(Path(folder) / "optimizer.bin", b"")  # the rest was never written
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after this line runs

    trainer.accelerator.save_state = killed_half_way
    trainer.step = 4
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    # A half-written newest checkpoint under its final name (a copy without trainer_state.json) is ignored too.
    partial = out / "checkpoints" / "step-0000005"
    shutil.copytree(out / "checkpoints" / ".tmp-step-0000004", partial, copy_function=os.link)
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["step-0000003", "step-0000002"]
    resumed = Trainer(cfg)
    summary = resumed.fit(resume=True)
    assert "resumed from" in capsys.readouterr().out and summary["step"] == 4
    assert [row["step"] for row in resumed.loss_log] == [4]
    assert not (out / "checkpoints" / ".tmp-step-0000004").exists()  # leftovers go at the next save


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_folder(run, tmp_path):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    trainer = Trainer(cfg)
    save_state = trainer.accelerator.save_state

    def disk_full(folder):
        save_state(folder)
        rewrite(Path(folder) / "optimizer.bin", b"\0" * 1000)  # as far as the disk took it
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.accelerator.save_state = disk_full
    with pytest.raises(TrainingError) as info:
        trainer.fit(resume=True)  # step 4, then its save fails
    message = str(info.value)
    assert message.startswith(f"{out / 'checkpoints' / 'step-0000004'}: checkpoint not written (OSError: ")
    assert "No space left on device" in message and "MiB free on its disk" in message, message
    assert "the newest checkpoint step-0000003 is intact" in message and "--resume" in message
    assert "\n" not in message
    # The partial folder is gone (its space is needed); the earlier checkpoints are as they were.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-0000002",
        "step-0000003",
    ]
    assert Trainer(cfg).load_checkpoint().name == "step-0000003"


class ThreadRank:
    """An accelerator stand-in for one of two processes, run as threads: barriers and sum-reductions are real
    across them, save_state writes this rank's file."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, rank: int, barrier: threading.Barrier, slots: list) -> None:
        self.process_index, self.is_main_process = rank, rank == 0
        self.barrier, self.slots = barrier, slots

    def wait_for_everyone(self) -> None:
        self.barrier.wait()

    def reduce(self, t: torch.Tensor, reduction: str) -> torch.Tensor:
        self.slots[self.process_index] = t.clone()
        self.barrier.wait()
        total = sum(self.slots)
        self.barrier.wait()
        return total

    def save_state(self, folder: str) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"random_states_{self.process_index}.pkl").write_bytes(b"rng")


@pytest.mark.parametrize("failing", [0, 1])
def test_a_save_failing_on_one_process_stops_every_process_with_the_error(failing, tmp_path, monkeypatch):
    # Without agreement the processes that did not fail would wait for the failed one at the next barrier forever.
    barrier, slots, results = threading.Barrier(2, timeout=20), [None, None], [None, None]
    complete = checkpoint._complete

    def main_disk_full(*args, **kwargs):
        complete(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == 0:
        monkeypatch.setattr(checkpoint, "_complete", main_disk_full)

    def rank(index: int) -> None:
        acc = ThreadRank(index, barrier, slots)
        if index == failing == 1:

            def full(folder):
                raise OSError(errno.ENOSPC, "No space left on device")

            acc.save_state = full
        try:
            checkpoint.save(acc, tmp_path / "run", 5, {"history": []})
            results[index] = "saved"
        except checkpoint.CheckpointError as exc:
            results[index] = str(exc)
        except threading.BrokenBarrierError:
            results[index] = "hung"

    threads = [threading.Thread(target=rank, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(
        r is not None and r.startswith(f"{tmp_path / 'run' / 'checkpoints' / 'step-0000005'}: checkpoint not")
        for r in results
    ), results
    assert "No space left on device" in results[failing]
    assert "failed on another process" in results[1 - failing]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == []  # no partial folder


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        rewrite(path, data[: len(data) // 2])
    elif how == "flip":
        middle = len(data) // 2
        rewrite(
            path, data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
        )
    elif how == "json":
        rewrite(path, data[:-40])
    elif how == "edit":  # still valid JSON, one value changed (a flipped digit, a hand edit)
        assert b'"bad_steps": 0' in data
        rewrite(path, data.replace(b'"bad_steps": 0', b'"bad_steps": 7'))


@pytest.mark.parametrize(
    "file, how, reason",
    [
        ("model.safetensors", "truncate", "model.safetensors: truncated or overwritten"),
        ("optimizer.bin", "flip", "optimizer.bin: corrupted (SHA-256 differs"),
        ("random_states_0.pkl", "flip", "random_states_0.pkl: corrupted (SHA-256 differs"),
        ("trainer_state.json", "json", "trainer_state.json: unreadable or damaged"),
        ("trainer_state.json", "edit", "trainer_state.json: unreadable or damaged (its content differs"),
    ],
)
def test_damaged_checkpoint_is_refused_and_resume_falls_back(run, tmp_path, capsys, file, how, reason):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    damage(out / "checkpoints" / "step-0000003" / file, how)
    trainer = Trainer(cfg)
    if file == "model.safetensors":  # once all the way: the run completes from the older checkpoint
        summary = trainer.fit(resume=True)
        assert summary["step"] == 4 and [row["step"] for row in trainer.loss_log] == [3, 4]
        assert checkpoint.complete_checkpoints(out)[0].name == "step-0000004"
    else:
        assert trainer.load_checkpoint().name == "step-0000002" and trainer.step == 2
    warning = [line for line in capsys.readouterr().out.splitlines() if "checkpoint refused" in line]
    assert len(warning) == 1 and reason in warning[0] and "trying an older one" in warning[0], warning


def test_no_usable_checkpoint_is_a_clear_error(run, tmp_path):
    cfg, out = copy_of(run, tmp_path)
    for step in (2, 3):
        damage(out / "checkpoints" / f"step-{step:07d}" / "model.safetensors", "truncate")
    with pytest.raises(TrainingError, match=r"no usable checkpoint \(.*step-0000003.*step-0000002") as info:
        Trainer(cfg).fit(resume=True)
    assert "\n" not in str(info.value) and str(info.value).endswith(
        "delete the damaged folders or start a new run"
    )


def test_intact_checkpoints_that_do_not_load_are_not_called_damaged(run, tmp_path):
    cfg, out = copy_of(run, tmp_path)
    trainer = Trainer(cfg)

    def does_not_fit(folder):  # e.g. a setting that changes a tensor without a config key saying so
        raise RuntimeError("Error(s) in loading state_dict: size mismatch for encoder.conv1.weight")

    trainer.accelerator.load_state = does_not_fit
    with pytest.raises(
        TrainingError, match=r"no usable checkpoint \(.*step-0000003: RuntimeError: .*size mismatch"
    ) as info:
        trainer.load_checkpoint()
    message = str(info.value)
    assert "damaged" not in message and "resume with the settings and number of processes" in message, message


class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("file", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"])
def test_loading_never_runs_code_from_a_checkpoint(run, tmp_path, capsys, file):
    cfg, out = copy_of(run, tmp_path)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    ckpt = out / "checkpoints" / "step-0000003"
    rewrite(ckpt / file, payload)
    assert Trainer(cfg).load_checkpoint().name == "step-0000002"  # refused by its size record
    assert f"{file}: truncated or overwritten" in capsys.readouterr().out
    # A crafted checkpoint whose record matches the payload is refused by the loaders themselves.
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    state["files"][file] = {"bytes": len(payload), "sha256": checkpoint.sha256(ckpt / file)}
    rewrite(ckpt / checkpoint.STATE_FILE, json.dumps(state).encode())
    assert Trainer(cfg).load_checkpoint().name == "step-0000002"
    refused = [line for line in capsys.readouterr().out.splitlines() if "checkpoint refused" in line]
    assert len(refused) == 1 and "step-0000003" in refused[0], refused
    if file == "model.safetensors":  # the evaluation loader reads it with safetensors too
        with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
            load_trained_model(ckpt)
    assert not marker.exists()


@pytest.mark.parametrize(
    "change, keys",
    [
        ({"model": {"arch": "mteb"}}, ['model.arch (checkpoint "mtl", this run "mteb")']),
        ({"model": {"backbone": "resnet34"}}, ["model.backbone"]),
        ({"tasks": ("semseg",)}, ['tasks (checkpoint ["semseg", "depth"], this run ["semseg"])']),
        (
            {"model": {"decoder_channels": (8, 16, 16, 32, 32)}, "data": {"label_set": "cityscapes16"}},
            ["data.label_set", "model.decoder_channels"],
        ),
    ],
)
def test_checkpoint_of_another_model_config_is_refused_before_loading(
    run, tmp_path, monkeypatch, change, keys
):
    cfg, out = copy_of(run, tmp_path, iterations=5)  # a longer schedule is fine
    for section, values in change.items():
        value = replace(getattr(cfg, section), **values) if isinstance(values, dict) else values
        cfg = replace(cfg, **{section: value})
    cfg = replace(cfg, model=replace(cfg.model, depth_init=10.0, sync_bn=True))  # init-only: may change
    trainer = Trainer(cfg)
    loaded = []
    monkeypatch.setattr(trainer.accelerator, "load_state", lambda *a, **k: loaded.append(a))
    saved_config = (out / "config.json").read_text()
    with pytest.raises(TrainingError, match="trained with another model config") as info:
        trainer.fit(resume=True)
    message = str(info.value)
    assert all(k in message for k in keys), message
    assert "another --out" in message and "\n" not in message and not loaded
    assert "depth_init" not in message and "sync_bn" not in message
    # The run folder still describes its checkpoints (uda-compare and --config read config.json).
    assert (out / "config.json").read_text() == saved_config


def test_resume_without_the_target_statistics_of_bn_mode_domain_is_refused_by_name(
    toy_root, tmp_path, monkeypatch
):
    # train.bn_mode=domain keeps target BatchNorm statistics in the weights; another mode's model cannot load them.
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", adapt=True, iterations=1, bn_mode="domain")
    Trainer(cfg).fit()
    loaded = []
    for mode in ("separate", "joint"):
        trainer = Trainer(replace(cfg, train=replace(cfg.train, iterations=2, bn_mode=mode)))
        monkeypatch.setattr(trainer.accelerator, "load_state", lambda *a, **k: loaded.append(a))
        with pytest.raises(TrainingError, match="trained with another model config") as info:
            trainer.fit(resume=True)
        assert 'train.bn_mode (checkpoint "domain", this run "not domain")' in str(info.value) and not loaded
    # separate and joint keep one set of statistics: switching between them is no mismatch.
    separate = to_dict(replace(cfg, train=replace(cfg.train, bn_mode="separate")))
    joint = to_dict(replace(cfg, train=replace(cfg.train, bn_mode="joint")))
    assert checkpoint.config_mismatches(separate, joint) == []
    assert checkpoint.config_mismatches(joint, to_dict(cfg)) == [
        'train.bn_mode (checkpoint "not domain", this run "domain")'
    ]


def test_evaluation_loader_refuses_weights_of_another_model(run, tmp_path):
    _, out = copy_of(run, tmp_path)
    ckpt = out / "checkpoints" / "step-0000003"
    cfg, model, found = load_trained_model(out)  # the newest checkpoint, as tools/evaluate.py loads it
    assert found == ckpt and cfg.model.arch == "mtl"
    state = json.loads((ckpt / checkpoint.STATE_FILE).read_text())
    state["config"]["model"]["arch"] = "mteb"  # weights of an mtl model, config of an mteb model
    rewrite(ckpt / checkpoint.STATE_FILE, json.dumps(state).encode())
    with pytest.raises(ValueError, match=r"weights do not fit this model config \(missing: \w") as info:
        load_trained_model(ckpt)
    assert "evaluate with the config the checkpoint was trained with" in str(info.value)
    damage(ckpt / "model.safetensors", "truncate")
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights .*use an older one"):
        load_trained_model(ckpt)


@pytest.mark.parametrize(
    "how, reason",
    [("flip", "model.safetensors: corrupted (SHA-256 differs"), ("truncate", "model.safetensors: truncated")],
)
def test_init_from_a_damaged_checkpoint_is_refused_naming_the_file(run, tmp_path, how, reason):
    # A flipped byte inside a tensor still parses: only the recorded hash tells the weights are not the saved ones.
    _, source = copy_of(run, tmp_path)
    damage(source / "checkpoints" / "step-0000003" / "model.safetensors", how)
    cfg, _, _ = run
    cfg = replace(cfg, out=str(tmp_path / "new"), train=replace(cfg.train, init_from=str(source)))
    with pytest.raises(TrainingError) as info:
        Trainer(cfg)
    message = str(info.value)
    assert reason in message and "step-0000003" in message, message
    assert "train.init_from" in message and "\n" not in message


def test_init_from_a_missing_folder_is_one_line(toy_root, tmp_path, capsys, monkeypatch):
    missing = tmp_path / "no-such-run"
    argv = synthia_args(toy_root, tmp_path / "new", f"train.init_from={missing}")
    code, _, err = recipe_in_process("synthia", argv, capsys, monkeypatch)
    line = the_error_line(err)
    assert code == 1 and f"{missing}: no such run folder" in line and "train.init_from" in line, line


def test_init_from_a_run_of_another_backbone_is_refused(run, tmp_path):
    # ResNet-50 from ResNet-18 weights: only the stem has the same names and shapes; the run would start from
    # scratch while the log says "initialised".
    cfg, source, _ = run
    model = replace(cfg.model, backbone="resnet50")
    cfg = replace(
        cfg, model=model, out=str(tmp_path / "new"), train=replace(cfg.train, init_from=str(source))
    )
    with pytest.raises(TrainingError, match=r"only \d+/\d+ encoder tensors fit this model") as info:
        Trainer(cfg)
    assert "train.init_from" in str(info.value) and "\n" not in str(info.value)


def test_resume_of_an_initialised_run_does_not_read_its_init_from_source_again(run, tmp_path):
    _, source = copy_of(run, tmp_path)
    cfg, _, _ = run
    cfg = replace(
        cfg, out=str(tmp_path / "new"), train=replace(cfg.train, iterations=1, init_from=str(source))
    )
    Trainer(cfg).fit()
    shutil.rmtree(source)  # the source run is deleted (or damaged) later: the run's own checkpoints resume it
    longer = replace(cfg, train=replace(cfg.train, iterations=2))
    assert Trainer(longer).fit(resume=True)["step"] == 2


def test_extending_a_finished_run_keeps_its_final_validation(run, tmp_path):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    last = checkpoint.latest_checkpoint(out)
    assert last.name == "step-0000003" and [r["step"] for r in checkpoint.read_state(last)["history"]] == [3]
    trainer = Trainer(cfg)
    trainer.fit(resume=True)
    assert [r["step"] for r in trainer.history] == [3, 4]  # the first run's final validation is kept
    report = (out / "report.md").read_text()
    assert "step 4" in report
    # A finished run resumed as it is validates again: its row is replaced, not repeated.
    again = Trainer(cfg)
    again.fit(resume=True)
    assert [r["step"] for r in again.history] == [3, 4]


def test_optimiser_settings_follow_the_config_on_resume(run, tmp_path):
    # The checkpoint gives the optimiser's state; a changed weight decay or betas (config.json says so) must act.
    cfg, out = copy_of(run, tmp_path, iterations=4)
    cfg = replace(cfg, optim=replace(cfg.optim, weight_decay=0.01, betas=(0.8, 0.95)))
    trainer = Trainer(cfg)
    ckpt = trainer.load_checkpoint()
    saved = torch.load(ckpt / "optimizer.bin", weights_only=True)
    assert [(g["weight_decay"], g["betas"]) for g in saved["param_groups"]] == [(0.0, (0.9, 0.98))] * 2
    assert [(g["weight_decay"], g["betas"]) for g in trainer.optimizer.param_groups] == [
        (0.01, (0.8, 0.95))
    ] * 2
    # ... while the moments and step counts are the checkpoint's.
    state = trainer.optimizer.state_dict()["state"]
    restored = [t for _, per in sorted(state.items()) for _, t in sorted(per.items())]
    assert all(torch.equal(x, y) for x, y in zip(optimizer_state(ckpt), restored, strict=True))
    assert {float(s["step"]) for s in state.values()} == {3.0}


def test_resume_names_the_settings_changed_since_the_checkpoint(run, tmp_path):
    cfg, out = copy_of(run, tmp_path, iterations=4)
    cfg = replace(cfg, optim=replace(cfg.optim, lr_decoder=cfg.optim.lr_decoder / 2))
    Trainer(cfg).load_checkpoint()
    line = (out / "train.log").read_text().splitlines()[-1]
    assert line.endswith(
        "resumed with settings changed since the checkpoint: "
        f"optim.lr_decoder (checkpoint {run[0].optim.lr_decoder}, this run {cfg.optim.lr_decoder}); "
        "train.iterations (checkpoint 3, this run 4)"
    ), line
    # Another seed or batch size changes the data stream from here on: the run says it is no exact continuation.
    cfg = replace(cfg, train=replace(cfg.train, seed=cfg.train.seed + 1))
    Trainer(cfg).load_checkpoint()
    line = (out / "train.log").read_text().splitlines()[-1]
    assert "warning: resumed with settings changed" in line and line.endswith(
        "with another train.seed the run is not an exact continuation"
    ), line
    # Another number of processes splits each global batch otherwise: also no exact continuation.
    state = checkpoint.read_state(checkpoint.latest_checkpoint(out))
    assert state["processes"] == 1
    line = checkpoint.changed_settings(state, to_dict(run[0]), processes=2)
    assert line.startswith("warning: ") and "processes (checkpoint 1, this run 2)" in line, line
    assert checkpoint.changed_settings(state, state["config"], processes=1) is None
    # The same config: nothing to say.
    before = (out / "train.log").read_text()
    Trainer(replace(run[0], out=str(out))).load_checkpoint()
    assert "settings changed" not in (out / "train.log").read_text()[len(before) :]


def fp16_accelerator():
    """A fresh accelerator with an fp16 gradient scaler (growth every step) on the CPU, the forward in fp32 (see
    test_fp16_steps_skipped_by_a_non_finite_loss_or_the_scaler_leave_the_model_as_it_was)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1), True
    acc.state._mixed_precision = "fp16"
    acc.autocast = lambda *a, **k: torch.autocast("cpu", enabled=False)
    return acc


def test_gradient_scaler_is_saved_restored_and_may_start_on_resume(run, tmp_path, capsys, fresh_accelerator):
    # An fp32 or bf16 checkpoint holds no scaler.pt: resuming it with fp16 (e.g. `auto` on an older GPU) goes on
    # with a fresh scaler instead of refusing every checkpoint as damaged.
    cfg, out = copy_of(run, tmp_path, iterations=4)
    trainer = Trainer(cfg, fp16_accelerator())
    assert trainer.load_checkpoint().name == "step-0000003"
    note = "step-0000003 holds no gradient scaler (saved without fp16); it starts afresh"
    assert note in capsys.readouterr().out
    train_steps(trainer, 1)
    grown = trainer.accelerator.scaler.get_scale()
    assert grown == 2.0**5  # one finite step from the initial scale
    # The fp16 checkpoint holds the scaler, and a resume restores its scale.
    ckpt = trainer.save_checkpoint()
    assert (ckpt / "scaler.pt").is_file()
    resumed = Trainer(cfg, fp16_accelerator())
    assert resumed.load_checkpoint() == ckpt and resumed.accelerator.scaler.get_scale() == grown


def test_rng_state_and_schedule_are_restored(run, tmp_path):
    cfg, out = copy_of(run, tmp_path, iterations=8)
    _, _, rng_at_save = run
    trainer = Trainer(cfg)
    trainer.load_checkpoint(out / "checkpoints" / "step-0000002")
    assert torch.equal(torch.get_rng_state(), rng_at_save[2])
    # Learning rates are a function of the step alone (so nothing about them needs restoring).
    lrs = {}
    for step in (8, 0, 5, 7, 1):
        trainer.set_learning_rates(step)
        lrs[step] = [g["lr"] for g in trainer.optimizer.param_groups]
    for step in sorted(lrs):
        trainer.set_learning_rates(step)
        assert [g["lr"] for g in trainer.optimizer.param_groups] == lrs[step]
    assert lrs[8][0] < lrs[7][0] == lrs[0][0]  # the step decay at lr_step_fraction=1.0 of 8 steps


# ================================================================================ 3. bad inputs


@pytest.fixture
def data_root(toy_root, tmp_path) -> Path:
    """A hard-linked copy of the toy datasets that a test may damage (through rewrite / rewrite_png)."""
    return link_copy(toy_root, tmp_path / "data")


def synthia_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-root",
        str(data_root),
        "--out",
        str(out),
        *TINY,
        "train.iterations=2",
        "train.ckpt_every=0",
        "train.val_every=0",
        "train.val_batches=1",
        *extra,
    ]


def first_train_id(data_root: Path) -> str:
    """The id of the first sample of the recipe's first training batch (seed 42)."""
    ids = build_dataset("synthia", "train", (), root=data_root / "synthia").ids
    index, _ = next(iter(EndlessSampler(len(ids), 2, 42)))
    return ids[index]


def drop(path: Path) -> Path:
    path.unlink()
    return path


def truncate(path: Path) -> Path:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 2])
    return path


def corrupt_png(path: Path) -> Path:
    data = path.read_bytes()
    at = data.find(b"IDAT") + 40
    rewrite(path, data[:at] + bytes(20) + data[at + 20 :])  # signature and IEND intact, pixel data not
    return path


def label_200(path: Path) -> Path:
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    label[3, 5, 2] = 200  # the class id is in R (the last channel in cv2's BGR order)
    rewrite_png(path, label)
    return path


def depth_8bit(path: Path) -> Path:
    rewrite_png(path, (cv2.imread(str(path), cv2.IMREAD_UNCHANGED) // 256).astype(np.uint8))
    return path


def half_size(path: Path) -> Path:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    rewrite_png(
        path, cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_NEAREST)
    )
    return path


def empty_split(path: Path) -> Path:
    rewrite(path, b"")
    return path


BAD_DATA = {
    # case: (file to damage, relative to <data root>/synthia; how; what the message must say, fix included)
    "image without label": (
        "GT/LABELS/{id}.png",
        drop,
        ["missing label file (partial dataset?); re-extract"],
    ),
    "image without depth": (
        "Depth/Depth/{id}.png",
        drop,
        ["missing depth file (partial dataset?); re-extract"],
    ),
    "label without image": ("RGB/{id}.png", drop, ["(partial dataset?); complete the dataset or regenerate"]),
    "truncated PNG": (
        "RGB/{id}.png",
        truncate,
        ["truncated PNG (image); re-extract or re-download the file"],
    ),
    "corrupt PNG": (
        "RGB/{id}.png",
        corrupt_png,
        ["unreadable image (corrupt file?); re-extract or re-download"],
    ),
    "label ids outside the table": (
        "GT/LABELS/{id}.png",
        label_200,
        ["label ids 200 are not synthia class ids", "; use the original label files of the dataset"],
    ),
    "8-bit depth PNG": (
        "Depth/Depth/{id}.png",
        depth_8bit,
        ["depth PNG is 8-bit, expected 16-bit; use the original"],
    ),
    "label of another size": (
        "GT/LABELS/{id}.png",
        half_size,
        ["differs from image", "; use files of the same resolution"],
    ),
    "empty train split": ("splits/train.txt", empty_split, ["split file is empty; regenerate it with"]),
    "empty val split": ("splits/val.txt", empty_split, ["split file is empty; regenerate it with"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_stops_the_recipe_with_one_line(case, data_root, tmp_path, capsys, monkeypatch):
    pattern, how, says = BAD_DATA[case]
    path = how(data_root / "synthia" / pattern.format(id=first_train_id(data_root)))
    code, _, err = recipe_in_process(
        "synthia", synthia_args(data_root, tmp_path / "out"), capsys, monkeypatch
    )
    line = the_error_line(err)
    assert code == 1 and str(path) in line and all(part in line for part in says), line
    # Found before any training: an empty validation split must not wait for the end of a long run.
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_missing_dataset_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "nowhere").mkdir()
    code, _, err = recipe_in_process(
        "synthia", synthia_args(tmp_path / "nowhere", tmp_path / "out"), capsys, monkeypatch
    )
    line = the_error_line(err)
    assert code == 1 and line.startswith(f"error: {tmp_path / 'nowhere'}: no synthia folder here"), line
    assert "see datasets/synthia/README.md" in line
    assert not (tmp_path / "out").exists(), "a user error creates no run folder"


def test_a_corrupt_sample_fails_loudly_when_loaded_never_skipped(data_root, tmp_path, capsys, monkeypatch):
    dataset = build_dataset("synthia", "train", ("semseg", "depth"), root=data_root / "synthia")
    sampler = iter(EndlessSampler(len(dataset), 2, 7))
    order = [next(sampler)[0] for _ in range(len(dataset))]
    path = truncate(data_root / "synthia" / "RGB" / f"{dataset.ids[order[7]]}.png")  # in the 4th batch
    seen = 0
    with pytest.raises(DataError) as info:
        # One epoch, with a worker process (the error crosses a process boundary).
        for _ in islice(train_loader(dataset, 2, seed=7, num_workers=1), len(dataset) // 2):
            seen += 1
    assert seen == 3, "batches before the bad sample arrive, the bad one is an error, nothing is skipped"
    assert error_line(info.value) == f"{path}: truncated PNG (image); re-extract or re-download the file"
    # The recipe with a worker: the same single line.
    first = truncate(data_root / "synthia" / "RGB" / f"{first_train_id(data_root)}.png")
    argv = synthia_args(data_root, tmp_path / "out", "data.num_workers=1")
    code, _, err = recipe_in_process("synthia", argv, capsys, monkeypatch)
    assert (
        code == 1
        and the_error_line(err)
        == f"error: {first}: truncated PNG (image); re-extract or re-download the file"
    )


def cityscapes_jpeg(data_root: Path) -> Path:
    """Turn the first Cityscapes val image into a JPEG (the reader takes .jpg when the .png is absent)."""
    png = sorted((data_root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]
    jpg = png.with_suffix(".jpg")
    assert cv2.imwrite(str(jpg), cv2.imread(str(png)))
    png.unlink()
    return jpg


@pytest.mark.parametrize(
    "how, message",
    [
        (truncate, "truncated JPEG (image); re-extract or re-download the file"),
        (
            lambda p: rewrite(p, p.read_bytes()[:2] + bytes(38) + p.read_bytes()[40:]),
            "unreadable image (corrupt",
        ),
    ],
    ids=["truncated", "corrupt header"],
)
def test_bad_jpeg_through_the_loader(how, message, data_root):
    jpg = cityscapes_jpeg(data_root)
    how(jpg)
    dataset = build_dataset("cityscapes", "val", ("semseg",), "cityscapes16", root=data_root / "cityscapes")
    with pytest.raises(DataError) as info:
        for _ in islice(train_loader(dataset, 1, seed=0), len(dataset)):
            pass
    assert str(info.value).startswith(f"{jpg}: {message}") and "\n" not in str(info.value)


@pytest.mark.xfail(
    strict=True,
    reason="known limit: cv2 (and PIL, torchvision) decode a JPEG whose entropy-coded data "
    "is damaged with only a libjpeg warning; headers and the end marker are checked",
)
def test_jpeg_damaged_mid_stream_is_detected(data_root):
    jpg = cityscapes_jpeg(data_root)
    data = jpg.read_bytes()
    rewrite(jpg, data[: len(data) // 2] + bytes(50) + data[len(data) // 2 + 50 :])
    dataset = build_dataset("cityscapes", "val", (), "cityscapes16", root=data_root / "cityscapes")
    with pytest.raises(DataError):
        for i in range(len(dataset)):
            dataset[i]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train.iteratoins=3"],
            "error: unknown config key train.iteratoins (did you mean train.iterations?)",
        ),
        (["trian.iterations=3"], "error: unknown config key trian (did you mean train?)"),
        (["train.iterations=many"], "error: train.iterations: expected int, got 'many'"),
        (["train.iterations"], "error: override 'train.iterations' is not of the form section.key=value"),
        (["model.arch=segformer"], "error: model.arch: 'segformer' is not one of stl, mtl, padnet"),
        (["model.backbone=resnet19"], "error: model.backbone: 'resnet19' is not one of resnet18"),
        (
            ["tasks=semseg,segmentation"],
            "error: tasks: 'segmentation' is not one of semseg, depth, normals, edges",
        ),
        (["data.dataset=kitti"], "error: data.dataset: 'kitti' is not one of synthia, cityscapes"),
        (
            ["data.label_set=cityscapes99"],
            "error: data.label_set: unknown label set 'cityscapes99'; valid names:",
        ),
        (["--model", "segformer"], "error: argument --model: invalid choice: 'segformer'"),
        (["--tasks", "SX"], "error: argument --tasks: invalid choice: 'SX'"),
    ],
)
def test_config_errors_exit_2_with_one_line(argv, message, tmp_path, capsys, monkeypatch):
    code, _, err = recipe_in_process("synthia", ["--out", str(tmp_path / "out"), *argv], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err
    assert not (tmp_path / "out").exists()


def test_config_error_on_the_real_command_line(tmp_path):
    result = subprocess.run(
        [PYTHON, "recipes/synthia2cityscapes.py", "--out", str(tmp_path / "out"), "adapt.lambda_adv=strong"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: adapt.lambda_adv: expected float, got 'strong'\n"


def test_unwritable_run_folder_is_refused_before_training(toy_root, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out, reason in ((blocker / "run", "Not a directory"), (blocker, "File exists")):
        with pytest.raises(TrainingError) as info:
            Trainer(tiny_config(toy_root, out))
        assert (
            str(info.value)
            == f"{out}: run folder is not writable ({reason}); pass --out to a writable folder"
        )
    code, _, err = recipe_in_process("synthia", synthia_args(toy_root, blocker / "run"), capsys, monkeypatch)
    assert (
        code == 1
        and the_error_line(err)
        == f"error: {blocker / 'run'}: run folder is not writable (Not a directory); pass --out to a writable folder"
    )


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(run, tmp_path):
    cfg, out = copy_of(run, tmp_path)
    with pytest.raises(
        TrainingError, match=r"holds checkpoints of an earlier run \(newest step-0000003\); pass --resume"
    ):
        Trainer(cfg).fit()


# ================================================================================ 4. numerical faults


def nan_images(trainer: Trainer, steps: set[int], domain: str = "source") -> None:
    """Make the training stream return all-NaN images (of one domain) at the given 0-based steps."""
    make = trainer.batches

    def batches(start: int):
        for step, batch in enumerate(make(start), start):
            if step in steps:
                batch[domain]["image"] = torch.full_like(batch[domain]["image"], float("nan"))
            yield batch

    trainer.batches = batches


def record_states(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """States (weights and buffers of the model and discriminators) before the first step and after each."""
    states, step = [], trainer.train_step

    def full_state():
        state = {f"model.{k}": v for k, v in snapshot(trainer.model).items()}
        if trainer.objective("adapt") is not None:
            state |= {f"disc.{k}": v for k, v in snapshot(trainer.objective("adapt").discriminators).items()}
        return state

    def recording_step(batch):
        if not states:
            states.append(full_state())
        logs = step(batch)
        states.append(full_state())
        return logs

    trainer.train_step = recording_step
    return states


@pytest.mark.parametrize("adapt", [False, True], ids=["supervised", "adaptation"])
def test_non_finite_step_is_skipped_and_logged(adapt, toy_root, tmp_path, capsys):
    trainer = Trainer(
        tiny_config(toy_root, tmp_path / "run", arch="mtl", adapt=adapt, iterations=3, val_batches=1)
    )
    nan_images(trainer, {1}, "target" if adapt else "source")
    states = record_states(trainer)
    trainer.fit()
    assert [row["finite"] for row in trainer.loss_log] == [1.0, 0.0, 1.0]
    assert not differing(states[1], states[2]), "a skipped step changed weights or BatchNorm statistics"
    assert differing(states[0], states[1]) and differing(states[2], states[3])
    assert all(v.isfinite().all() for v in states[3].values() if v.is_floating_point())
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: step 2: non-finite ")]
    assert (
        len(warning) == 1 and "loss/total" in warning[0] and "update skipped, weights unchanged" in warning[0]
    )


def test_fp16_steps_skipped_by_a_non_finite_loss_or_the_scaler_leave_the_model_as_it_was(
    toy_root, tmp_path, fresh_accelerator
):
    # fp16 (older GPUs): the GradScaler unscales the gradients for clipping, then skips a step whose gradients
    # overflowed. A non-finite loss must close the scaler's step too (else the next unscale raises), and a step
    # the scaler skipped is a skipped step: weights and BatchNorm statistics as before, objectives not updated.
    # CPU autocast has no fp16 scaler, so the one accelerate makes on a GPU is installed by hand.
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**4), True
    acc.state._mixed_precision = "fp16"  # accelerate unscales only then (reset by the fixture)
    acc.autocast = lambda *a, **k: torch.autocast("cpu", enabled=False)  # the forward stays fp32 on a CPU
    trainer = Trainer(tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=4, val_batches=1), acc)
    nan_images(trainer, {1})  # a non-finite loss at step 1
    compose = trainer.compose

    def overflowing(step):  # step 2: a finite loss whose scaled gradients overflow
        loss, logs = compose(step)
        return (loss * 1e36 if step.index == 2 else loss), logs

    trainer.compose = overflowing
    scales = []
    step = trainer.train_step
    trainer.train_step = lambda batch: (scales.append(acc.scaler.get_scale()), step(batch))[1]
    states = record_states(trainer)
    trainer.fit()
    assert [row["finite"] for row in trainer.loss_log] == [1.0, 0.0, 0.0, 1.0]
    assert not differing(states[1], states[2]) and not differing(states[2], states[3])
    assert differing(states[0], states[1]) and differing(states[3], states[4])
    assert scales == [16.0, 16.0, 8.0, 4.0]  # each skipped step halved the scale


def test_consecutive_non_finite_steps_stop_the_run_with_a_checkpoint(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", arch="mtl", iterations=20, max_bad_steps=3, val_batches=1)
    trainer = Trainer(cfg)
    nan_images(trainer, set(range(1, 20)))
    states = record_states(trainer)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000004"
    assert str(info.value) == (
        f"3 consecutive non-finite steps at step 4; stopped, checkpoint {ckpt}; lower the learning rates or "
        "check the data"
    )
    # The checkpoint holds the last good weights (step 1) and is a normal, resumable checkpoint.
    weights = load_file(ckpt / "model.safetensors")
    assert not differing(weights, {k[len("model.") :]: v for k, v in states[1].items()})
    resumed = Trainer(cfg)
    assert resumed.load_checkpoint() == ckpt and resumed.step == 4 and resumed.bad_steps == 3


# ================================================================================ 5. two processes (gloo)

EVAL_SCRIPT = '''\
"""Evaluate one checkpoint as Trainer.validate does and record the reduced metric sums (python or accelerate)."""
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from uda.checkpoint import read_state
from uda.config import ExperimentConfig, from_dict
from uda.engine import Trainer

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = from_dict(ExperimentConfig, read_state(ckpt)["config"])
trainer = Trainer(replace(cfg, out=str(out)))
trainer.load_checkpoint(ckpt)
torch.set_num_threads(1)  # the kernels of 2 processes on 2 cores, so per-image outputs are bitwise equal
acc, sums, reduce = trainer.accelerator, [], trainer.accelerator.reduce


def recording_reduce(state, reduction="sum", scale=1.0):
    total = reduce(state, reduction, scale)
    sums.append({k: v.tolist() for k, v in total.items()})
    return total


acc.reduce = recording_reduce
results = trainer.validate(final=True)
if acc.is_main_process:
    record = {"processes": acc.num_processes, "results": results, "sums": sums}
    (out / "eval.json").write_text(json.dumps(record))
acc.wait_for_everyone()
acc.end_training()
'''


def flatten(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{name}/{k}": v for name, metrics in results.items() for k, v in metrics.items()}


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-15)


# One launch set covers the supervised terms, learnt task weights and a joint objective network (consistency);
# another a multi-scale model (timm HRNet backbone, deep supervision at four scales, FPM). `rel`: the tolerance of
# the float sums. The ResNet model's per-image outputs are bitwise equal whether an image is evaluated in a batch
# of 5 or a shard of 3 or 2; HRNet's convolutions pick batch-size dependent kernels, ~1e-9 apart.
@pytest.mark.parametrize(
    "objectives, rel",
    [
        (["--consistency", "consistency", "loss.weighting=uncertainty"], 1e-12),
        (["--model", "mti-net", "model.backbone=hrnetv2-w18-small"], 1e-7),
    ],
    ids=["consistency+uncertainty", "mti-net-hrnet"],
)
def test_two_processes_train_resume_and_evaluate_like_one(objectives, rel, toy_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = [
        "recipes/synthia.py",
        "--data-root",
        str(toy_root),
        "--out",
        str(out),
        *TINY,
        *objectives,
        "train.iterations=2",
        "train.ckpt_every=1",
        "train.val_every=0",
        "train.val_batches=1",
    ]
    script = tmp_path / "evaluate_checkpoint.py"
    script.write_text(EVAL_SCRIPT)
    ckpt = out / "checkpoints" / "step-0000003"
    launches = {
        "train": argv,
        "resume": [
            argv[0],
            "--resume",
            *argv[1:],
            "train.iterations=3",
        ],  # a longer schedule from the step-2 checkpoint
        "evaluate": [str(script), str(ckpt), str(tmp_path / "eval2")],
    }
    for name, args in launches.items():  # three launches, each must exit cleanly
        result = launch(args, 2)
        assert result.returncode == 0, (name, result.stderr[-4000:])
        assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, (
            name,
            result.stderr,
        )
        assert name != "resume" or "resumed from" in result.stdout
    monkeypatch.setattr(sys, "argv", [str(script), str(ckpt), str(tmp_path / "eval1")])
    runpy.run_path(str(script), run_name="__main__")
    one, two = (json.loads((tmp_path / f"eval{n}" / "eval.json").read_text()) for n in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    # Every validation sample exactly once (5, an odd number: the shards are 3 and 2) in each evaluation
    # (at the working size, then at the label files' resolution) ...
    assert len(one["sums"]) == len(two["sums"]) >= 1
    labelled = []
    for native in (False, True):
        transform = EvalTransform((64, 128), keep_label_resolution=native)
        val = build_dataset("synthia", "val", ("semseg",), root=toy_root / "synthia", transform=transform)
        labelled.append(sum(int((val[i]["semseg"] != 255).sum()) for i in range(len(val))))
    assert len(val) == 5 and labelled[0] != labelled[1]
    for n, (sums1, sums2) in enumerate(zip(one["sums"], two["sums"])):
        assert sums1["depth/images"] == sums2["depth/images"] == 5
        assert np.sum(sums1["semseg/confusion"]) == np.sum(sums2["semseg/confusion"]) == labelled[n]
        # ... and exact reductions: counts identical, float sums equal up to the order of additions.
        assert sums1.keys() == sums2.keys()
        for key in sums1:
            a, b = np.asarray(sums1[key]), np.asarray(sums2[key])
            if key.endswith(("confusion", "count", "images", "hist")):
                assert np.array_equal(a, b), key
            else:
                assert np.allclose(a, b, rtol=rel, atol=0), key
    flat1, flat2 = (flatten(e["results"]) for e in (one, two))
    assert flat1.keys() == flat2.keys() and all(close(flat1[k], flat2[k], rel) for k in flat1)
    # The resumed 2-process run's own final validation of that checkpoint reported the same numbers.
    final = flatten(json.loads((out / "metrics.json").read_text())["results"])
    assert final.keys() == flat2.keys() and all(close(final[k], flat2[k], rel) for k in final)


def test_sync_batchnorm_option(toy_root, tmp_path):
    # One process: nothing to synchronise, the model keeps plain BatchNorm.
    cfg = tiny_config(toy_root, tmp_path / "one", arch="mtl")
    trainer = Trainer(replace(cfg, model=replace(cfg.model, sync_bn=True)))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in trainer.model.modules())
    # Two CPU processes: torch's SyncBatchNorm has no CPU kernels, so the option is refused up front.
    args = [
        "recipes/synthia.py",
        "--data-root",
        str(toy_root),
        "--out",
        str(tmp_path / "two"),
        *TINY,
        "train.iterations=1",
        "model.sync_bn=true",
    ]
    result = launch(args, 2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-3000:]  # one per process
    assert set(errors) == {
        "error: model.sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU processes; "
        "set model.sync_bn=false"
    }


RANKS_SCRIPT = '''\
"""Train a few steps with each learnt task weighting on 2 processes; each rank writes its weighting state."""
import json
import sys
from dataclasses import replace
from pathlib import Path

from tests.conftest import tiny_config, train_steps
from uda.engine import Trainer

root, out = Path(sys.argv[1]), Path(sys.argv[2])
for weighting in ("uncertainty", "dwa", "gradnorm"):
    cfg = tiny_config(root, out / weighting, arch="mtl", iterations=3)
    trainer = Trainer(replace(cfg, loss=replace(cfg.loss, weighting=weighting, dwa_period=1)))
    initial = trainer.weighting.checkpoint_state()
    logs = train_steps(trainer, cfg.train.iterations)[-1]
    rank = trainer.accelerator.process_index
    record = {"initial": initial, "final": trainer.weighting.checkpoint_state(), "logs": logs}
    (out / f"{weighting}-rank{rank}.json").write_text(json.dumps(record))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
'''


def launch_per_rank(source: str, toy_root: Path, tmp_path: Path) -> Path:
    """Run a script (arguments: the toy root, an output folder) on 2 processes; the output folder."""
    script = tmp_path / "per_rank.py"
    script.write_text(source)
    out = tmp_path / "out"
    out.mkdir()
    result = launch([str(script), str(toy_root), str(out)], 2)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_two_processes_hold_identical_task_weights(toy_root, tmp_path):
    out = launch_per_rank(RANKS_SCRIPT, toy_root, tmp_path)
    for weighting in ("uncertainty", "dwa", "gradnorm"):
        ranks = [json.loads((out / f"{weighting}-rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["final"] == ranks[1]["final"], weighting  # identical on every process, bit for bit
        assert ranks[0]["final"] != ranks[0]["initial"], weighting  # and they did learn
        # The processes saw different samples, so their own losses differ: the agreement is not trivial.
        assert ranks[0]["logs"]["loss/semseg/s0"] != ranks[1]["logs"]["loss/semseg/s0"]


ADAPT_RANKS_SCRIPT = '''\
"""Adversarial adaptation on 2 processes; each rank writes its discriminators' parameters and its losses."""
import json
import sys
from pathlib import Path

from tests.conftest import tiny_config, train_steps
from uda.engine import Trainer

root, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = Trainer(tiny_config(root, out / "run", arch="mtl", adapt=True, iterations=2))
nets = trainer.accelerator.unwrap_model(trainer.objective("adapt").discriminators)


def weights():
    return [p.detach().flatten().tolist() for p in nets.parameters()]


initial = weights()
logs = train_steps(trainer, 2)[-1]
record = {"initial": initial, "final": weights(), "logs": logs}
(out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(record))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()
'''


def test_two_processes_train_identical_discriminators(toy_root, tmp_path):
    # Adversarial adaptation (the UDA recipes' default method) on 2 processes: every discriminator runs in one
    # DDP forward per update, so their gradients are averaged and the processes keep identical weights.
    out = launch_per_rank(ADAPT_RANKS_SCRIPT, toy_root, tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["final"] == ranks[1]["final"]  # bit for bit
    assert ranks[0]["final"] != ranks[0]["initial"]  # and they did learn
    # The processes saw different target images, so without the averaging their updates would differ.
    assert ranks[0]["logs"]["loss/disc"] != ranks[1]["logs"]["loss/disc"]


def test_a_bad_override_with_toy_fails_before_generating_the_toy_data(tmp_path, capsys, monkeypatch):
    root = tmp_path / "toy"  # no toy data yet: a valid run would first spend a minute generating it
    argv = ["--toy", "--data-root", str(root), "--out", str(tmp_path / "run"), "train.iteratoins=3"]
    code, _, err = recipe_in_process("synthia", argv, capsys, monkeypatch)
    assert code != 0
    line = the_error_line(err)
    assert line.startswith("error: unknown config key train.iteratoins (did you mean train.iterations?)"), (
        line
    )
    assert not root.exists() and not (tmp_path / "run").exists()


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch):
    from uda.config import ExperimentConfig, save_config
    from uda.files import write_text_atomic

    path = tmp_path / "config.json"
    save_config(ExperimentConfig(name="first"), path)
    before = path.read_text()

    def interrupted(src, dst):  # the process dies (or the disk fills) between the write and the rename
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="No space left"):
        save_config(ExperimentConfig(name="second"), path)
    assert path.read_text() == before and json.loads(before)["name"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left behind
    monkeypatch.undo()
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
