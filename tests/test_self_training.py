"""Self-training (uda/objectives/self_training.py, uda/data/sampling.py): the EMA teacher's update formula, its
lack of gradients, exact resume with the teacher in the checkpoint, the pseudo-labels' confidence weight and
reliability masks, pseudo-labels following the mix mask, rare-class sampling frequencies, and the recipes'
--method self-training[+adversarial] through the engine."""

from __future__ import annotations

import json
import math
import runpy
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TINY_OVERRIDES, tiny_config, train_steps
from uda import checkpoint
from uda.config import ConfigError, SelfTrainingConfig
from uda.data.sampling import RareClassDraw, class_probabilities, class_stats, stats_path
from uda.mixing import IGNORE_INDEX, class_mix_mask
from uda.models import build_model
from uda.models.multitask import intermediate_scales
from uda.objectives import RunContext, Step
from uda.objectives.self_training import SelfTraining, weighted_cross_entropy
from uda.tasks import TASK_DEFS, output_space, quality_weight, task_channels

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 16


def objective(model_cfg: dict | None = None, **st) -> tuple[SelfTraining, torch.nn.Module]:
    """A bound self-training objective on a tiny mTEB model (S-D, 64x128, batch 2)."""
    cfg = tiny_config(Path("/no/data"), Path("/no/run"), adapt=True)
    cfg = replace(cfg, adapt=None, self_training=SelfTrainingConfig(**st))
    cfg = replace(cfg, model=replace(cfg.model, **(model_cfg or {})))
    torch.manual_seed(0)
    channels = task_channels(cfg.tasks, NUM_CLASSES)
    model = build_model(cfg.model, channels)
    run = RunContext(cfg, cfg.tasks, channels, output_space(cfg, NUM_CLASSES), intermediate_scales(cfg.model))
    obj = SelfTraining(run, cfg.self_training)
    obj.bind(model)
    return obj, model


def a_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    source = {
        "image": torch.rand(2, 3, 64, 128, generator=g),
        "semseg": torch.randint(0, NUM_CLASSES, (2, 64, 128), generator=g),
        "depth": torch.rand(2, 1, 64, 128, generator=g) * 50 + 1,
    }
    return {"source": source, "target": {"image": torch.rand(2, 3, 64, 128, generator=g)}}


ONE_PROCESS = SimpleNamespace(num_processes=1)


# ------------------------------------------------------------------------------------------------ EMA teacher


def test_ema_update_is_exactly_the_formula():
    obj, model = objective()
    teacher = obj.teacher
    assert teacher is not model and obj.held_networks() == {"teacher": teacher}
    with torch.no_grad():  # a student that moved away from the teacher (weights and BN statistics)
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        for b in model.buffers():
            b.add_(torch.ones_like(b) if b.is_floating_point() else 3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = model.state_dict()
    for index, alpha in ((0, 0.5), (8, 0.9), (500, 0.99)):
        assert obj.alpha_at(index) == alpha
    obj.update(Step(500, {}, {}, ONE_PROCESS))
    after = teacher.state_dict()
    for key, old in before.items():
        if old.is_floating_point():
            expected = old * 0.99 + student[key] * (1 - 0.99)
            assert torch.equal(after[key], expected), key
            assert not torch.equal(after[key], old), key
        else:  # num_batches_tracked: copied
            assert torch.equal(after[key], student[key]), key
    # Without the warm-up, alpha from the first step.
    assert objective(ema_ramp=False)[0].alpha_at(0) == 0.99


def test_first_update_keeps_half_of_the_initial_teacher():
    # Mean teacher and DAFormer: after the student's first step, alpha = 1 - 1/(1 + 1) = 0.5; the teacher is the
    # mean of the initial weights and the student's, not a copy of the student (alpha 0 discarded the start).
    obj, model = objective()
    initial = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    logs = obj.update(Step(0, {}, {}, ONE_PROCESS))
    assert float(logs["st/alpha"]) == 0.5
    student = model.state_dict()
    name, p = next(iter(model.named_parameters()))
    expected = initial[name] * 0.5 + student[name] * 0.5
    torch.testing.assert_close(obj.teacher.state_dict()[name], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(obj.teacher.state_dict()[name], p)
    # The second update: alpha 2/3, the teacher the mean of the three weights it has seen.
    assert obj.alpha_at(1) == pytest.approx(2 / 3)


def test_teacher_gets_no_gradient_and_trains_the_student():
    obj, model = objective(mix="depthmix")
    step = Step(0, a_batch(), {}, ONE_PROCESS, model)
    terms = obj.loss(step)
    assert set(terms.tasks) == {"semseg", "depth"} and all(len(v) == 1 for v in terms.tasks.values())
    loss = sum(v[0] for v in terms.tasks.values()) + terms.total
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert not obj.teacher.training
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    assert {"loss/st_semseg", "loss/st_depth", "st/quality", "st/depth_reliable", "st/mixed"} <= set(
        terms.logs
    )


def test_pseudo_labels_follow_the_mix_mask():
    obj, model = objective(mix="classmix")
    batch = a_batch(1)
    step = Step(0, batch, {}, ONE_PROCESS, model)
    torch.manual_seed(7)
    image, labels, weight, _ = obj.mixed_batch(step)
    torch.manual_seed(7)
    pseudo, _, _ = obj.pseudo_labels(batch["target"]["image"])
    mask = class_mix_mask(batch["source"]["semseg"])
    m = mask[:, 0]
    assert 0 < m.float().mean() < 1
    assert torch.equal(image, torch.where(mask, batch["source"]["image"], batch["target"]["image"]))
    assert torch.equal(labels["semseg"], torch.where(m, batch["source"]["semseg"], pseudo["semseg"][0]))
    assert torch.equal(labels["depth"], torch.where(mask, batch["source"]["depth"], pseudo["depth"][0]))
    assert torch.equal(weight, torch.where(m, torch.ones_like(weight), pseudo["semseg"][1]))


def test_ignored_rows_get_no_pseudo_label_but_keep_pasted_source_pixels():
    # DAFormer's psweight_ignore (Cityscapes: 15 / 120 of 512 rows) as shares of the height: 64 rows -> 8 / 16.
    plain, _ = objective(mix="classmix", threshold=0.0)  # threshold 0: quality 1, every target pixel weighted
    obj, model = objective(mix="classmix", threshold=0.0, ignore_top=0.125, ignore_bottom=0.25)
    batch = a_batch(2)
    target = batch["target"]["image"]
    reference, _, _ = plain.pseudo_labels(target)
    pseudo, _, _ = obj.pseudo_labels(target)
    rows = torch.zeros(64, dtype=torch.bool)
    rows[:8] = rows[-16:] = True
    assert torch.equal(obj.ignored_rows(64, target.device), rows)
    assert torch.equal(pseudo["semseg"][1][:, rows], torch.zeros(2, 24, 128))
    assert torch.equal(pseudo["semseg"][1][:, ~rows], reference["semseg"][1][:, ~rows])
    assert bool((reference["semseg"][1][:, rows] == 1).all())
    assert torch.equal(pseudo["depth"][0][:, :, rows], torch.zeros(2, 1, 24, 128))
    assert torch.equal(pseudo["depth"][0][:, :, ~rows], reference["depth"][0][:, :, ~rows])
    # After mixing, the pasted source pixels of those rows keep their labels and weight 1.
    torch.manual_seed(3)
    _, labels, weight, _ = obj.mixed_batch(Step(0, batch, {}, ONE_PROCESS, model))
    torch.manual_seed(3)
    m = class_mix_mask(batch["source"]["semseg"])[:, 0]
    assert torch.equal(weight[:, rows], m[:, rows].float())
    source_depth = batch["source"]["depth"][:, 0]
    assert torch.equal(labels["depth"][:, 0][:, rows], torch.where(m, source_depth, 0.0)[:, rows])
    with pytest.raises(ConfigError, match="ignore_top"):
        SelfTrainingConfig(ignore_top=0.5, ignore_bottom=0.5)


# ------------------------------------------------------------------------------------------------ pseudo-labels


def test_confidence_weight_and_weighted_cross_entropy_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 8, 9, generator=g) * 4
    tau = 0.968
    q = quality_weight(logits, tau)
    for b in range(3):
        probs = np.exp(logits[b].double().numpy())
        probs /= probs.sum(axis=0, keepdims=True)
        expected = float((probs.max(axis=0) > tau).sum()) / (8 * 9)
        assert math.isclose(float(q[b]), expected, abs_tol=1e-6)
    assert 0 < float(q.min()) and float(q.max()) < 1  # the test covers a non-trivial share
    label = logits.argmax(1)
    label[:, :2] = IGNORE_INDEX
    weight = q[:, None, None].expand_as(label)
    ce = F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX, reduction="none")
    expected = float((ce * weight).sum() / (label != IGNORE_INDEX).sum())
    assert math.isclose(float(weighted_cross_entropy(logits, label, weight)), expected, rel_tol=1e-6)


def test_depth_pseudo_label_kept_where_the_flip_agrees():
    obj, _ = objective()
    space = obj.run.space
    g = torch.Generator().manual_seed(0)
    direct = torch.rand(2, 1, 8, 8, generator=g) * 30 + 5  # raw inverse normalised depth d_far / d
    flipped = direct * (1 + (torch.rand(2, 1, 8, 8, generator=g) - 0.5) * 0.4)
    label, weight, logs = TASK_DEFS["depth"].pseudo_label(direct, flipped, space, obj.cfg)
    d1, d2 = space.depth_metres(direct), space.depth_metres(flipped)
    ok = (d1 - d2).abs() / (0.5 * (d1 + d2)) < obj.cfg.depth_agreement
    assert 0 < ok.float().mean() < 1 and weight is None
    assert torch.equal(label > 0, ok)
    assert torch.allclose(label[ok], (0.5 * (d1 + d2))[ok])


# ------------------------------------------------------------------------------------------------ rare classes


def test_rare_class_probabilities_and_sampling_frequencies():
    counts = np.array([[900, 50, 0, 10], [800, 0, 30, 0], [700, 40, 0, 0], [950, 0, 0, 25]], dtype=np.int64)
    temperature = 0.05
    p = class_probabilities(counts, temperature)
    f = counts.sum(0) / counts.sum()
    e = np.exp((1 - f) / temperature)
    assert np.allclose(p, e / e.sum(), rtol=1e-12)
    assert p[0] < p[1] < p[3] < p[2]  # rarer classes first
    draw = RareClassDraw(counts, temperature, min_pixels=1, seed=3)
    n = 20000
    freq = np.bincount([draw(pos) for pos in range(n)], minlength=4) / n
    holders = [np.flatnonzero(counts[:, c] > 0) for c in range(4)]
    expected = np.zeros(4)
    for c, images in enumerate(holders):
        expected[images] += p[c] / len(images)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 5 * sigma + 1e-9), (freq, expected)
    # The draw of a position depends on (seed, position) alone: a resumed stream draws the same images.
    assert [draw(pos) for pos in range(100, 110)] == [
        RareClassDraw(counts, temperature, 1, 3)(pos) for pos in range(100, 110)
    ]


def test_class_stats_are_counted_once_and_cached(toy_root, tmp_path, monkeypatch):
    from uda.data import sampling
    from uda.data.readers import build_dataset

    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    dataset = build_dataset("synthia", "train", ("semseg",), "synthia16", toy_root / "synthia")
    counts = class_stats(dataset, NUM_CLASSES)
    path = stats_path(dataset)
    assert path.is_file() and path.parent == tmp_path / "cache" / "class_stats"
    first = dataset[0]["semseg"]
    assert counts.shape == (len(dataset), NUM_CLASSES)
    assert counts[0].tolist() == torch.bincount(first[first != IGNORE_INDEX], minlength=NUM_CLASSES).tolist()

    def no_recount(*args):
        raise AssertionError("counted again instead of reading the cache")

    monkeypatch.setattr(sampling, "class_pixel_counts", no_recount)
    assert np.array_equal(class_stats(dataset, NUM_CLASSES), counts)
    assert json.loads(path.read_text())["ids"] == dataset.ids


# ------------------------------------------------------------------------------------------------ the recipes


def recipe(argv: list[str], capsys, monkeypatch) -> int:
    path = REPO / "recipes" / "synthia2cityscapes.py"
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        capsys.readouterr()
    return 0


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The engine runs one thread per process here: on a shared 2-core machine two spinning threads per run
    made a 32x64 step take 10x longer."""
    monkeypatch.setenv("UDA_THREADS", "1")


def recipe_config(toy_root: Path, out: Path, method: str, *overrides: str):
    """The config recipes/synthia2cityscapes.py builds for `--method method` on the tiny toy setting."""
    from uda.adaptation import adaptation_config, adaptation_parser
    from uda.cli import finalise

    argv = ["--data-root", str(toy_root), "--out", str(out), "--method", method, *TINY_OVERRIDES]
    # 32x64 images: the engine paths are the same, the CPU time a quarter of 64x128's.
    argv += ["data.size=32,64", "target.size=32,64", "target.num_workers=0", "train.val_every=0", *overrides]
    args = adaptation_parser("test").parse_intermixed_args(argv)
    return finalise(
        adaptation_config(args, "synthia", "synthia16", "cityscapes16"), args, "synthia2cityscapes"
    )


def network_states(trainer) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the model's, teacher's and discriminators' tensors and of the optimiser's state."""
    nets = {"model": trainer.model, "teacher": trainer.held["teacher"]}
    if trainer.objective("adapt") is not None:
        nets["discriminators"] = trainer.objective("adapt").discriminators
    states = {k: {n: t.detach().clone() for n, t in net.state_dict().items()} for k, net in nets.items()}
    opt = trainer.optimizer.state_dict()["state"]
    states["optimizer"] = {f"{i}.{k}": v.clone() for i, per in opt.items() for k, v in per.items()}
    return states


def test_self_training_recipe_runs_through_the_engine(toy_root, tmp_path, monkeypatch):
    from uda.engine import Trainer

    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = recipe_config(toy_root, tmp_path / "st", "self-training", "self_training.rare_class_sampling=true")
    assert cfg.adapt is None and cfg.self_training.mix == "classmix" and cfg.name.endswith("st-mteb")
    trainer = Trainer(cfg)
    # The source stream draws by rare classes: its first batch holds the images the draw picks.
    stream = trainer.batches(0)
    first = next(stream)["source"]["meta"]
    dataset = trainer.data.dataset(cfg.data, cfg.data.train_split, ("semseg",), train=True, domain=0)
    draw = trainer.objective("self_training").sampling(dataset, cfg.train.seed)
    assert [m["id"] for m in first] == [dataset.ids[draw(pos)] for pos in range(len(first))]
    assert (tmp_path / "cache" / "class_stats").is_dir()
    logs = train_steps(trainer, 2)
    assert all(math.isfinite(r["loss/st_semseg"]) and math.isfinite(r["loss/st_depth"]) for r in logs)
    assert logs[0]["st/alpha"] == 0.5 and logs[1]["st/alpha"] == pytest.approx(2 / 3)
    assert list(trainer.held) == ["teacher"]


def test_self_training_with_adversarial_resumes_exactly(toy_root, tmp_path):
    """2 steps straight, and the same run resumed from its step-1 checkpoint by a new Trainer: identical model,
    teacher, discriminators and optimiser state at step 2 (the teacher comes back from teacher.safetensors)."""
    from uda.engine import Trainer

    cfg = recipe_config(
        toy_root,
        tmp_path / "run",
        "self-training+adversarial",
        "adapt.disc_channels=8",
        "self_training.mix=depthmix",
    )
    assert cfg.adapt is not None and cfg.self_training is not None
    trainer = Trainer(cfg)
    train_steps(trainer, 1)
    saved = trainer.save_checkpoint()
    at_save = network_states(trainer)["teacher"]
    assert "teacher.safetensors" in json.loads((saved / checkpoint.STATE_FILE).read_text())["files"]
    train_steps(trainer, 1)
    straight = network_states(trainer)
    resumed = Trainer(cfg)
    assert resumed.load_checkpoint() == saved and resumed.step == 1
    loaded = resumed.held["teacher"].state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in at_save.items())  # restored from teacher.safetensors
    train_steps(resumed, 1)
    again = network_states(resumed)
    for name, tensors in straight.items():
        assert tensors.keys() == again[name].keys(), name
        assert all(torch.equal(v, again[name][k]) for k, v in tensors.items()), name
    # The teacher moved during the last step, so the equality is not trivial.
    assert any(not torch.equal(at_save[k], v) for k, v in straight["teacher"].items())


def test_method_conflicts_and_missing_imagenet_weights_are_one_line_errors(tmp_path, capsys, monkeypatch):
    base = ["--out", str(tmp_path / "x"), "--data-root", str(tmp_path)]
    assert recipe([*base, "--no-adapt", "--method", "self-training"], capsys, monkeypatch) == 2
    with pytest.raises(Exception, match="model.pretrained=true"):
        objective(feature_distance=True)


def test_feature_distance_to_the_frozen_imagenet_encoder(tmp_path):
    import torchvision

    weights = tmp_path / "resnet18.pth"  # stands for the ImageNet file: any torchvision state dict
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    obj, model = objective({"weights_path": str(weights)}, feature_distance=True)
    assert not obj.imagenet.training and not any(p.requires_grad for p in obj.imagenet.parameters())
    source = a_batch()["source"]
    car = obj.thing_ids.tolist()[0]
    semseg = torch.zeros(2, 64, 128, dtype=torch.long)  # road ...
    semseg[:, :, :64] = car  # ... with things on the left half
    semseg[:, :8, :] = car  # and on the upper half of the first row of 16x16 patches (share 0.5 there)
    source["semseg"] = semseg
    fd = obj.feature_distance(source)
    with torch.no_grad():
        ref = obj.imagenet(source["image"])[-1]
        feats = model.encoder(source["image"])[-1]
    dist = (feats - ref).norm(dim=1)  # [2, 4, 8] at stride 16
    share = torch.zeros(2, 4, 8)
    for i in range(4):
        for j in range(8):
            share[:, i, j] = (
                (semseg[:, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16] == car).float().mean((1, 2))
            )
    mask = share > 0.75
    assert 0 < mask.float().mean() < 1
    assert math.isclose(float(fd.detach()), float(dist[mask].mean()), rel_tol=1e-5)
    fd.backward()  # the distance trains the student's encoder, never the ImageNet copy
    assert model.encoder.layer4[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in obj.imagenet.parameters())


def test_confidence_gate_keeps_geometry_labels_only_where_the_teacher_is_sure():
    obj, _ = objective(confidence_gate=True)
    image = a_batch()["target"]["image"]
    sure = torch.zeros(2, 1, 64, 128, dtype=torch.bool)
    sure[:, :, :, :40] = True

    class Teacher(torch.nn.Module):  # confident class 3 on the left 40 columns, uniform elsewhere
        def forward(self, x):
            semseg = torch.zeros(x.shape[0], NUM_CLASSES, 64, 128)
            semseg[:, 3] = torch.where(sure.repeat(x.shape[0] // 2, 1, 1, 1)[:, 0], 20.0, 0.0)
            return {"semseg": {0: semseg}, "depth": {0: torch.full((x.shape[0], 1, 64, 128), 30.0)}}

    obj.teacher = Teacher()
    labels, _, logs = obj.pseudo_labels(image)
    depth = labels["depth"][0]
    assert bool((depth[sure] > 0).all()) and bool((depth[~sure] == 0).all())
    assert math.isclose(float(logs["st/confident"]), 40 / 128)
    ungated, _ = objective()
    ungated.teacher = Teacher()
    assert bool((ungated.pseudo_labels(image)[0]["depth"][0] > 0).all())  # flip agreement alone keeps all


def test_class_balanced_selection_keeps_the_most_confident_share_of_every_class():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 16, 20, generator=g) * 1.5
    logits[:, 0] += 1.5  # a dominant class: most pixels, mostly confident (no ties at probability 1)
    obj, _ = objective(class_portion=0.3)
    ids, weight, logs = TASK_DEFS["semseg"].pseudo_label(logits, None, obj.run.space, obj.cfg)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    for c in pred.unique().tolist():
        of_c = pred == c
        values = np.sort(conf[of_c].numpy())
        cut = values[int(math.floor((len(values) - 1) * 0.7))]  # the "lower" (1 - p) quantile
        kept = ids[of_c] == c
        assert torch.equal(kept, conf[of_c] >= torch.tensor(cut))
        # every class keeps its most confident ~30 %, however few pixels it has
        assert abs(float(kept.float().mean()) - 0.3) <= 2.0 / len(values)
    assert bool((ids[~(ids == pred)] == IGNORE_INDEX).all())
    assert torch.equal(weight, (ids != IGNORE_INDEX).float())
    assert math.isclose(float(logs["st/kept"]), float((ids != IGNORE_INDEX).float().mean()))
    assert (pred == 0).float().mean() > 0.5 and len(pred.unique()) == 4  # the test covers an imbalance
    with pytest.raises(Exception, match="class_portion"):
        SelfTrainingConfig(class_portion=1.5)


def test_strong_augmentation_jitters_four_images_in_five_as_daformer():
    # DAFormer's color_jitter_p = 0.2 is the probability of SKIPPING the jitter (it jitters when U(0,1) > 0.2):
    # 80 % of the images are jittered.
    from uda.objectives.self_training import strong_augmentation

    torch.manual_seed(0)
    augment = strong_augmentation(SelfTrainingConfig(blur=False), height=16)
    images = torch.rand(400, 3, 16, 16)
    changed = (augment(images) - images).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert 0.72 < changed.float().mean() < 0.88


def test_depthmix_needs_the_source_depth_labels():
    from uda.config import PhotometricConfig
    from uda.objectives.base import ObjectiveError

    cfg = tiny_config(Path("/no/data"), Path("/no/run"), adapt=True)
    cfg = replace(cfg, adapt=None, self_training=SelfTrainingConfig(mix="depthmix"))
    channels = task_channels(cfg.tasks, NUM_CLASSES)
    space, scales = output_space(cfg, NUM_CLASSES), intermediate_scales(cfg.model)
    SelfTraining(RunContext(cfg, cfg.tasks, channels, space, scales), cfg.self_training)  # labelled: fine
    # Self-supervised source depth (photometric.domain=source): no depth labels to order the pixels by.
    cfg = replace(cfg, photometric=PhotometricConfig(domain="source"))
    with pytest.raises(
        ObjectiveError, match="self_training.mix=depthmix orders pixels by the source's depth"
    ):
        SelfTraining(RunContext(cfg, cfg.tasks, channels, space, scales), cfg.self_training)


def test_rare_class_frequencies_count_the_pixels_of_classes_left_out_of_the_draw():
    # Classes 1 and 3 have no image with min_pixels of them: they are not drawn, but their pixels are part of
    # the split, so f_c of the others is their share of all labelled pixels (DAFormer's softmax((1 - f) / T)).
    counts = np.array([[900, 50, 0, 100], [800, 0, 3000, 200]], dtype=np.int64)
    temperature = 0.05
    draw = RareClassDraw(counts, temperature, min_pixels=400, seed=0)
    f = counts.sum(0) / counts.sum()
    e = np.exp((1 - f) / temperature) * np.array([1, 0, 1, 0])
    assert np.allclose(draw.probabilities.numpy(), e / e.sum(), rtol=1e-12)


def test_class_stats_are_counted_again_when_a_label_file_changes(toy_root, tmp_path, monkeypatch):
    # A rewritten label file (regenerated data at the same folder) must not be read through stale counts.
    import shutil

    import cv2

    from uda.data.readers import build_dataset

    monkeypatch.setenv("UDA_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "synthia"
    shutil.copytree(toy_root / "synthia", root)
    dataset = build_dataset("synthia", "train", ("semseg",), "synthia16", root)
    before = class_stats(dataset, NUM_CLASSES)
    path = root / "GT" / "LABELS" / f"{dataset.ids[0]}.png"
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    raw[..., 2] = 3  # SYNTHIA's class id (R, last in OpenCV's BGR) of road: train id 0 everywhere
    assert cv2.imwrite(str(path), raw)
    after = class_stats(dataset, NUM_CLASSES)
    assert after[0].tolist() == [raw.shape[0] * raw.shape[1]] + [0] * (NUM_CLASSES - 1) != before[0].tolist()
    assert np.array_equal(after[1:], before[1:])
    # The class map is part of what is counted: another label set has its own cache file.
    other = build_dataset("synthia", "train", ("semseg",), "cityscapes13", root)
    assert stats_path(other) != stats_path(dataset)
