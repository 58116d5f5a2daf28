"""Shared fixtures: one small toy dataset (real on-disk formats) generated once per test session."""

from pathlib import Path

import pytest

from uda.config import (
    AdaptConfig,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

# The recipe command-line equivalent of tiny_config (ResNet-18, 64x128, narrow decoders).
TINY_OVERRIDES = [
    "model.backbone=resnet18",
    "model.pretrained=false",
    "model.decoder_channels=16,32,32,64,64",
    "data.size=64,128",
    "data.num_workers=0",
    "train.deterministic=true",
    "train.log_every=1",
    "train.mixed_precision=no",
]
TOY_FRAMES = 24
TOY_HW = (64, 128)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    from uda.data.toy import make_toy_data

    root = tmp_path_factory.mktemp("toy")
    make_toy_data(
        root, frames=TOY_FRAMES, height=TOY_HW[0], width=TOY_HW[1], seed=0, workers=2, progress=False
    )
    return root


def tiny_config(
    root: Path,
    out: Path,
    arch: str = "mteb",
    tasks: tuple[str, ...] = ("semseg", "depth"),
    adapt: bool = False,
    iterations: int = 6,
    **train,
) -> ExperimentConfig:
    """A CPU-sized experiment on the toy data: ResNet-18, 64x128, batch 2, narrow decoders."""
    source = DataConfig(
        dataset="synthia",
        root=str(root / "synthia"),
        label_set="synthia16",
        size=TOY_HW,
        batch_size=2,
        num_workers=0,
    )
    target = DataConfig(
        dataset="cityscapes",
        root=str(root / "cityscapes"),
        label_set="cityscapes16",
        size=TOY_HW,
        batch_size=2,
        num_workers=0,
    )
    return ExperimentConfig(
        name="tiny",
        tasks=tasks,
        model=ModelConfig(
            arch=arch, backbone="resnet18", pretrained=False, decoder_channels=(16, 32, 32, 64, 64)
        ),
        data=source,
        target=target if adapt else None,
        adapt=AdaptConfig(disc_channels=8) if adapt else None,
        optim=OptimConfig(lr_step_fraction=1.0),
        train=TrainConfig(
            **{
                "iterations": iterations,
                "mixed_precision": "no",  # fp32 on every CPU (auto would pick bf16 on AVX-512 BF16 machines)
                "val_every": 0,
                "ckpt_every": 0,
                "log_every": 1,
                "val_batches": 2,
                "deterministic": True,
                **train,
            }
        ),
        eval=EvalConfig(median_scaling=adapt),
        out=str(out),
    )


@pytest.fixture
def fresh_accelerator():
    """accelerate keeps one process-wide state (mixed precision included): start and leave it clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def train_steps(trainer, steps: int) -> list[dict[str, float]]:
    """Run `steps` training steps of a Trainer from its current step (no validation, no checkpoints); the logs
    of each step."""
    from uda.data.loader import move_to

    batches = trainer.batches(trainer.step)
    logs = []
    for _ in range(steps):
        logs.append(trainer.train_step(move_to(next(batches), trainer.accelerator.device)))
        trainer.step += 1
    return logs
