"""Self-supervised depth in the engine: the SDE recipe learns, initialises from a depth-only run, and adaptation
can learn target depth photometrically."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_OVERRIDES, train_steps
from uda.cli import finalise
from uda.data.loader import move_to
from uda.engine import Trainer, TrainingError
from uda.selfsupervised import sde_config, sde_parser

TINY = [*TINY_OVERRIDES, "train.val_every=0", "train.val_batches=2"]


def sde(argv, depth_only, toy_root, out):
    parser = sde_parser("test", "mtl" if depth_only else "mteb")
    args = parser.parse_args(["--data-root", str(toy_root), "--out", str(out), *argv, *TINY])
    return finalise(sde_config(args, depth_only), args, "sde")


def test_depth_only_run_lowers_the_photometric_loss(toy_root, tmp_path):
    cfg = sde(
        [
            "train.iterations=60",
            "optim.lr_backbone=1e-4",
            "optim.lr_decoder=1e-3",
            "photometric.lr_pose=1e-3",
        ],
        True,
        toy_root,
        tmp_path / "depth",
    )
    trainer = Trainer(cfg)
    batches = trainer.batches(0)
    fixed = [move_to(next(batches), trainer.accelerator.device)["source"] for _ in range(3)]

    @torch.no_grad()
    def photometric_loss():  # on three fixed batches (one pair of images is a noisy measure)
        objective = trainer.objective("photometric")
        return sum(float(objective.photometric_objective(b, trainer.model(b["image"]))[0]) for b in fixed) / 3

    before = photometric_loss()
    summary = trainer.fit()
    after = photometric_loss()
    assert after < 0.95 * before, (before, after)
    assert 0 <= trainer.loss_log[-1]["automask_fraction"] <= 1
    assert summary["results"]["val"]["depth/median_scale"] > 0  # evaluated with per-image median scaling
    assert trainer.cfg.eval.median_scaling and trainer.cfg.eval.max_depth == 80.0


def test_sde_initialises_both_decoders_and_pose_from_the_depth_run(toy_root, tmp_path):
    depth_cfg = sde(["train.iterations=2", "train.ckpt_every=2"], True, toy_root, tmp_path / "depth")
    Trainer(depth_cfg).fit()
    cfg = sde(
        ["--init-from", str(tmp_path / "depth"), "train.iterations=1"], False, toy_root, tmp_path / "sde"
    )
    trainer = Trainer(cfg)
    source = load_file(str(next((tmp_path / "depth" / "checkpoints").glob("step-*")) / "model.safetensors"))
    own = trainer.model.state_dict()
    key = "decoders.depth.second.0.1.weight"
    assert torch.equal(own[key], source[key])
    assert torch.equal(own[key.replace("depth", "semseg")], source[key])  # semseg decoder starts from depth's
    assert torch.equal(own["encoder.conv1.weight"], source["encoder.conv1.weight"])
    trainer.fit()
    assert trainer.loss_log[-1]["loss/semseg/s0"] > 0 and trainer.loss_log[-1]["loss/photometric"] > 0


def test_photometric_setting_is_checked(toy_root, tmp_path):
    cfg = sde(["train.iterations=1", "model.depth_output=inverse"], True, toy_root, tmp_path / "bad")
    with pytest.raises(TrainingError, match="model.depth_output=disparity"):
        Trainer(cfg)


def test_negative_forward_start_is_refused(toy_root, tmp_path):
    cfg = sde(["train.iterations=1", "photometric.pose_init_forward=-0.01"], True, toy_root, tmp_path / "bad")
    with pytest.raises(TrainingError, match="photometric.pose_init_forward=-0.01"):
        Trainer(cfg)


def test_photometric_run_resumes_exactly(toy_root, tmp_path):
    """2 steps straight, and the same SDE run resumed from its step-1 checkpoint by a new Trainer: identical model,
    pose net (trained with the model, posenet.safetensors) and optimiser state at step 2."""
    cfg = sde(["--model", "mtl", "train.iterations=2"], False, toy_root, tmp_path / "run")

    def states(trainer):
        nets = {"model": trainer.model, "posenet": trainer.objective("photometric").posenet}
        copies = {k: {n: t.detach().clone() for n, t in net.state_dict().items()} for k, net in nets.items()}
        opt = trainer.optimizer.state_dict()["state"]
        copies["optimizer"] = {f"{i}.{k}": v.clone() for i, per in opt.items() for k, v in per.items()}
        return copies

    trainer = Trainer(cfg)
    train_steps(trainer, 1)
    saved = trainer.save_checkpoint()
    assert (saved / "posenet.safetensors").is_file()
    at_save = states(trainer)["posenet"]
    train_steps(trainer, 1)
    straight = states(trainer)
    resumed = Trainer(cfg)
    assert resumed.load_checkpoint() == saved and resumed.step == 1
    train_steps(resumed, 1)
    again = states(resumed)
    for name, tensors in straight.items():
        assert tensors.keys() == again[name].keys(), name
        assert all(torch.equal(v, again[name][k]) for k, v in tensors.items()), name
    # The pose net moved during the last step, so the equality is not trivial.
    assert any(not torch.equal(at_save[k], v) for k, v in straight["posenet"].items())


def test_with_colour_jitter_the_photometric_loss_compares_the_original_frames(toy_root, tmp_path):
    from uda.models.posenet import relative_pose

    cfg = sde(["train.iterations=1", "data.color_jitter=0.4"], True, toy_root, tmp_path / "run")
    trainer = Trainer(cfg)
    batch = move_to(next(trainer.batches(0)), trainer.accelerator.device)["source"]
    clean = batch["unjittered"]  # collated and moved with the batch
    assert clean["image"].shape == batch["image"].shape and set(clean["frames"]) == set(batch["frames"])
    assert not torch.allclose(clean["image"], batch["image"], atol=1e-2)
    objective = trainer.objective("photometric")
    trainer.model.eval()
    objective.posenet.eval()
    with torch.no_grad():
        outputs = trainer.model(batch["image"])  # the networks see the jittered frames
        torch.manual_seed(0)  # the auto-mask's tie-breaking noise
        got, _ = objective.photometric_objective(batch, outputs)
        poses = {
            o: relative_pose(objective.posenet, batch["image"], batch["frames"][o], o)
            for o in batch["frames"]
        }
        disparities = {s: outputs["depth"][s] for s in cfg.photometric.scales}
        loss = objective.photometric_loss
        torch.manual_seed(0)  # the auto-mask's tie-breaking noise
        on_clean, _ = loss(disparities, clean["image"], clean["frames"], poses, batch["K"])
        on_jittered, _ = loss(disparities, batch["image"], batch["frames"], poses, batch["K"])
    assert abs(on_clean.item() - on_jittered.item()) > 1e-4  # the choice matters
    assert got.item() == pytest.approx(on_clean.item(), abs=1e-6)
    trainer.model.train()
    assert train_steps(trainer, 1)[0]["finite"] == 1.0
