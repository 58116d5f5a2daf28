"""The training engine on the toy data: losses go down, validation beats chance, runs resume exactly."""

import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import tiny_config
from uda.engine import Trainer
from uda.metrics import SegmentationMetric


def mean_loss(log, key, steps):
    return float(np.mean([row[key] for row in steps(log) if key in row]))


def test_short_run_lowers_every_task_loss_and_beats_chance(toy_root, tmp_path):
    cfg = tiny_config(
        toy_root, tmp_path / "run", tasks=("semseg", "depth", "normals"), iterations=80, val_batches=None
    )
    trainer = Trainer(cfg)
    summary = trainer.fit()
    log = trainer.loss_log
    for task in cfg.tasks:
        first = mean_loss(log, f"loss/{task}/s0", lambda rows: rows[:10])
        last = mean_loss(log, f"loss/{task}/s0", lambda rows: rows[-10:])
        assert last < 0.8 * first, (task, first, last)
    # Chance: the best constant prediction (the majority class of the validation ground truth).
    dataset = trainer.data.dataset(cfg.data, "val", cfg.tasks, train=False, domain=0)
    labels = torch.stack([dataset[i]["semseg"] for i in range(len(dataset))])
    majority = torch.bincount(labels[labels != 255].flatten()).argmax()
    chance = SegmentationMetric(trainer.label_set.num_classes)
    chance.update(torch.full_like(labels, int(majority)), labels)
    miou = summary["results"]["val"]["semseg/miou"]
    assert miou > 1.5 * chance.compute()["miou"], (miou, chance.compute()["miou"])
    # The run folder holds what a person needs.
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["tasks"] == list(cfg.tasks)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["val"]["median_scaling"] is False
    assert "semseg/miou" in (out / "report.md").read_text()
    assert list((out / "images").glob("*.png"))
    assert list((out / "logs").rglob("events.out.tfevents*"))


def test_resume_matches_uninterrupted_run(toy_root, tmp_path):
    cfg = tiny_config(toy_root, tmp_path / "run", iterations=6, ckpt_every=3)
    full = Trainer(cfg)
    full.fit()
    # Drop the checkpoint after step 3, as if the run had been stopped there, then resume.
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-0000003", "step-0000006"]
    shutil.rmtree(checkpoints / "step-0000006")
    resumed = Trainer(cfg)
    resumed.fit(resume=True)
    assert [row["step"] for row in resumed.loss_log] == [4, 5, 6]
    for a, b in zip(full.loss_log[3:], resumed.loss_log):
        assert a["loss/total"] == b["loss/total"], (a, b)
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    # TensorBoard shows each step once: steps 4-6 of the first process are hidden behind the resumed run's.
    events = EventAccumulator(str(tmp_path / "run" / "logs"))
    events.Reload()
    steps = [(e.step, e.value) for e in events.Scalars("train/loss/total")]
    assert steps == [(row["step"], pytest.approx(row["loss/total"])) for row in full.loss_log]


def test_each_single_task_network_is_clipped_on_its_own(toy_root, tmp_path):
    """Scaling one task's loss by 1000 must not change the (clipped) gradient of another task's network."""
    from dataclasses import replace

    from uda.data.loader import move_to
    from uda.objectives import Step

    grads, norms = [], []
    for weight in (1.0, 1000.0):
        cfg = tiny_config(toy_root, tmp_path / f"w{weight}", arch="stl")
        cfg = replace(
            cfg,
            loss=replace(cfg.loss, weights={"semseg": weight, "depth": 1.0}),
            optim=replace(cfg.optim, clip_grad_norm=1.0),
        )
        trainer = Trainer(cfg)
        batch = move_to(next(trainer.batches(0)), trainer.accelerator.device)
        loss, _ = trainer.compose(Step(0, batch, trainer.forward_domains(batch), trainer.accelerator))
        trainer.accelerator.backward(loss)
        trainer.clip_gradients()
        nets = trainer.accelerator.unwrap_model(trainer.model).nets
        grads.append({k: p.grad.clone() for k, p in nets["depth"].named_parameters() if p.grad is not None})
        norms.append(
            {
                t: torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]).norm()
                for t, net in nets.items()
            }
        )
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    # The scaled segmentation network was clipped to the limit; one global clip would have shrunk depth's too.
    assert abs(float(norms[1]["semseg"]) - 1.0) < 1e-4 and float(norms[1]["depth"]) > 0


def test_image_every_writes_training_predictions_without_changing_the_run(toy_root, tmp_path):
    trained = {}
    for every in (0, 2):
        trainer = Trainer(
            tiny_config(
                toy_root, tmp_path / f"every{every}", arch="mtl", adapt=True, iterations=4, image_every=every
            )
        )
        trainer.fit()
        trained[every] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out = tmp_path / "every2" / "images"
    names = sorted(p.name for p in out.glob("train_step*.png"))
    assert names == [
        f"train_step{s:07d}_{d}_{i}.png" for s in (2, 4) for d in ("source", "target") for i in (0, 1)
    ]
    panel = cv2.imread(str(out / names[0]))
    assert panel is not None and panel.shape[1] >= 2 * 128 and panel.std() > 0  # image | prediction panels
    assert not list((tmp_path / "every0" / "images").glob("train_step*.png"))
    # An eval-mode forward on the side: the weights and BatchNorm statistics are those of the run without it.
    assert all(torch.equal(trained[0][k], trained[2][k]) for k in trained[0])
