"""Shared command line of the recipes: `--toy`, `--data-root`, `--out`, `--model`, `--seed`, `--resume` and
`section.key=value` overrides, then train with the one engine."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from uda.config import ConfigError, ConsistencyConfig, DataConfig, ExperimentConfig, apply_overrides

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_ROOT = REPO_ROOT / "datasets" / "toy"
MODELS = ("stl", "mtl", "padnet", "3ways-padnet", "mteb", "xtasc-unet", "xtasc-stl")

# The toy schedule: small backbone, small images, a few hundred steps on 2 CPU cores.
TOY_OVERRIDES = [
    "model.backbone=resnet18",
    "model.pretrained=false",
    "model.decoder_channels=32,64,64,128,128",
    "train.iterations=300",
    "train.val_every=0",
    "train.ckpt_every=100",
    "train.log_every=10",
    "train.mixed_precision=no",  # fp32 on every machine: the toy tables of README reproduce anywhere
]
TOY_SIZE = (96, 192)


TASK_SETS = {
    "S": ("semseg",),
    "D": ("depth",),
    "SD": ("semseg", "depth"),
    "SDN": ("semseg", "depth", "normals"),
    "SDNE": ("semseg", "depth", "normals", "edges"),
}


def ensure_toy_data(root: Path = TOY_ROOT, frames: int = 240, seed: int = 0, timeout_s: float = 900) -> Path:
    """Generate the built-in toy datasets under root when missing (one process generates, others wait)."""
    from uda.data.toy import TOY_DATASETS

    marker = root / "toy_info.json"
    if marker.is_file() and all((root / d).is_dir() for d in TOY_DATASETS):
        return root
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from uda.data.toy import make_toy_data

        print(f"generating toy data in {root} (first run only)", flush=True)
        make_toy_data(root, frames=frames, seed=seed)
    else:
        deadline = time.monotonic() + timeout_s
        while not marker.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{marker}: toy data did not appear; run `python tools/make_toy_data.py --out {root}`"
                )
            time.sleep(1)
    return root


class RecipeParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit 2), like configuration errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def base_parser(description: str, default_model: str = "mteb") -> argparse.ArgumentParser:
    """Arguments every recipe shares."""
    parser = RecipeParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides: any config key as section.key=value, e.g. train.iterations=1000 model.backbone=resnet50 "
        "data.batch_size=4 (the full config is printed at the start of a run and saved as <out>/config.json).",
    )
    parser.add_argument(
        "--toy",
        action="store_true",
        help="run on the built-in toy data (generated if missing) "
        "with a short schedule and a ResNet-18 that finishes in minutes on a CPU",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder holding the dataset folders (default: datasets/, or datasets/toy with --toy)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default: runs/<recipe>/<model>-s<seed>)"
    )
    parser.add_argument(
        "--model", choices=MODELS, default=default_model, help=f"architecture (default: {default_model})"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default 42)")
    parser.add_argument(
        "--tasks",
        choices=sorted(TASK_SETS),
        default=None,
        help="task set: S-D (SD), S-D-N (SDN), S-D-N-E (SDNE); default: the recipe's",
    )
    parser.add_argument(
        "--resume", action="store_true", help="resume from the newest usable checkpoint in --out"
    )
    parser.add_argument(
        "--consistency",
        choices=["none", "consistency", "alignment"],
        default="none",
        help="add cross-task consistency (XTasC, Nakano et al.): task-transfer networks between the first two "
        "tasks, trained against the other task's own prediction (consistency; on the target too when adapting) "
        "or against its labels (alignment, Align-Net); tune with consistency.* keys (default: none)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    return parser


def check_label_sets(cfg: ExperimentConfig) -> None:
    """Unknown label set names are configuration errors (caught before anything is built)."""
    from uda.data.labels import get_label_set

    for section, data in (("data", cfg.data), ("target", cfg.target)):
        if data is not None:
            try:
                get_label_set(data.label_set)
            except ValueError as exc:
                raise ConfigError(f"{section}.label_set: {exc}") from None


def with_root(data: DataConfig | None, root: Path | None) -> DataConfig | None:
    """Point a data config at <root>/<dataset> when a data root is given."""
    if data is None or root is None:
        return data
    return replace(data, root=str(root / data.dataset))


def finalise(cfg: ExperimentConfig, args: argparse.Namespace, recipe: str) -> ExperimentConfig:
    """Apply the shared options (toy, data root, model, seed, out) and the user's overrides."""
    root = args.data_root
    if args.toy:
        root = root or TOY_ROOT  # generated below, once the config is known to be valid
        cfg = apply_overrides(
            cfg, TOY_OVERRIDES + (["adapt.disc_channels=16"] if cfg.adapt is not None else [])
        )
        cfg = replace(cfg, data=replace(cfg.data, size=TOY_SIZE, num_workers=1))
        if cfg.target is not None:
            cfg = replace(cfg, target=replace(cfg.target, size=TOY_SIZE, num_workers=1))
    cfg = replace(cfg, data=with_root(cfg.data, root), target=with_root(cfg.target, root))
    cfg = replace(cfg, model=replace(cfg.model, arch=args.model))
    if args.tasks is not None:
        cfg = replace(cfg, tasks=TASK_SETS[args.tasks], loss=replace(cfg.loss, weights={}))
    if args.seed is not None:
        cfg = replace(cfg, train=replace(cfg.train, seed=args.seed))
    cfg = model_defaults(cfg)
    if getattr(args, "paper_tables", False):
        cfg = paper_baselines(cfg)
    if getattr(args, "optim_preset", "paper") == "released":
        cfg = released_adaptation_optimiser(cfg)
    if getattr(args, "consistency", "none") != "none":
        cfg = with_consistency(cfg, args.consistency)
    cfg = apply_overrides(cfg, list(args.overrides))
    check_label_sets(cfg)
    if args.toy:
        ensure_toy_data(Path(root))
    variant = "" if cfg.name == "experiment" else f"{cfg.name}-"
    name = f"{recipe}-{variant}{cfg.model.arch}"
    out = args.out or REPO_ROOT / "runs" / recipe / f"{variant}{cfg.model.arch}-s{cfg.train.seed}"
    return replace(cfg, name=name, out=str(out))


def model_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """Per-architecture defaults (before the user's overrides): 3-ways PAD-Net distils at decoder scale 2, where
    the authors' PadnetPlus places its block (mTEB sits at scale 1)."""
    if cfg.model.arch == "3ways-padnet":
        return replace(cfg, model=replace(cfg.model, exchange_scales=(2,)))
    return cfg


def paper_baselines(cfg: ExperimentConfig) -> ExperimentConfig:
    """The baselines of the paper's Tables 1, 2 and 6 (§4.1, App. B.2): STL and MTL with the DeepLab head of the
    MTL survey; STL trained by SGD (1e-3 encoder / 1e-2 decoder, momentum 0.9, weight decay 5e-4) with uniform
    task weights (each network has one task). mTEB and the PAD-Nets keep their own settings."""
    arch = cfg.model.arch
    if arch not in ("stl", "mtl"):
        return cfg
    cfg = replace(cfg, model=replace(cfg.model, decoder="deeplab"))
    if arch == "stl":
        optim = replace(
            cfg.optim, optimizer="sgd", lr_backbone=1e-3, lr_decoder=1e-2, momentum=0.9, weight_decay=5e-4
        )
        cfg = replace(cfg, optim=optim, loss=replace(cfg.loss, weights={t: 1.0 for t in cfg.tasks}))
    return cfg


def released_adaptation_optimiser(cfg: ExperimentConfig) -> ExperimentConfig:
    """The optimiser of the authors' DA configs (configs/da/*): Adam (0.9, 0.98) at 1.5e-5 encoder / 2.5e-4
    decoders, constant (no step decay), no gradient clipping, for every model (their runs: 90k iterations,
    train.iterations=90000)."""
    optim = replace(
        cfg.optim,
        optimizer="adam",
        betas=(0.9, 0.98),
        lr_backbone=1.5e-5,
        lr_decoder=2.5e-4,
        weight_decay=0.0,
        lr_gamma=1.0,
        lr_step_every=0,
        clip_grad_norm=0.0,
    )
    return replace(cfg, optim=optim)


def with_consistency(cfg: ExperimentConfig, mode: str) -> ExperimentConfig:
    """Add the cross-task consistency objective between the first two tasks: on the source, and on the target
    too when the run adapts to one (consistency needs no labels)."""
    tasks = tuple(cfg.tasks[:2])
    if len(tasks) < 2:
        raise ConfigError(f"--consistency needs two tasks, this run has {cfg.tasks}; pass --tasks SD")
    adapting = cfg.target is not None and cfg.adapt is not None
    domains = ("source", "target") if mode == "consistency" and adapting else ("source",)
    return replace(
        cfg,
        consistency=ConsistencyConfig(
            mode=mode, tasks=tasks, lambdas={t: 0.01 for t in tasks}, domains=domains
        ),
    )


def run(cfg: ExperimentConfig, resume: bool) -> dict:
    """Train and print the final results table."""
    from uda.engine import Trainer

    trainer = Trainer(cfg)
    summary = trainer.fit(resume=resume)
    if trainer.accelerator.is_main_process:
        print(results_table(summary["results"]))
        print(f"run folder: {cfg.out}")
    return summary


def results_table(results: dict[str, dict[str, float]]) -> str:
    """A compact text table of the main metrics per evaluated split."""
    keys = [
        "semseg/miou",
        "semseg/miou_subset",
        "semseg/pixel_acc",
        "depth/rmse",
        "depth/abs_rel",
        "depth/a1",
        "normals/mean",
        "normals/median",
        "edges/f1",
    ]
    lines = []
    for split, metrics in results.items():
        shown = [(k, metrics[k]) for k in keys if k in metrics]
        lines.append(f"{split:>8}: " + "  ".join(f"{k}={v:.4f}" for k, v in shown))
    return "\n".join(lines)


def main(
    build: Callable[[argparse.Namespace], ExperimentConfig],
    parser: argparse.ArgumentParser,
    recipe: str,
    argv: Sequence[str] | None = None,
) -> dict | None:
    """Parse, build the config, train. Configuration errors exit 2, data and training errors (a bad dataset
    file, an unwritable --out, an unusable checkpoint, a diverged run) exit 1, each with one line on stderr."""
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    try:
        cfg = finalise(build(args), args, recipe)
    except ConfigError as exc:
        fail(exc, 2)
    try:
        return run(cfg, args.resume)
    except Exception as exc:
        from uda.data.decode import DataError
        from uda.engine import TrainingError

        if isinstance(exc, DataError | TrainingError):
            fail(exc, 1)
        raise


def error_line(exc: BaseException) -> str:
    """The one-line message of an error. An error re-raised from a DataLoader worker carries the worker's
    traceback; its last line is the original message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1].strip())


def fail(exc: BaseException, code: int) -> NoReturn:
    """Print `error: <one line>` on stderr, release the process group (if any) and exit with `code`."""
    from tqdm import tqdm

    # tqdm.write puts the message on a line of its own, also under a progress bar.
    tqdm.write(f"error: {error_line(exc)}", file=sys.stderr)
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    raise SystemExit(code) from None


def supervised_config(
    dataset: str, label_set: str, size: tuple[int, int], tasks: str, variation: str = "clone", **optim
) -> Callable[[argparse.Namespace], ExperimentConfig]:
    """A fully supervised multi-task recipe on one dataset (paper §4.2): returns the config builder."""
    from uda.config import OptimConfig, TrainConfig

    def build(args: argparse.Namespace) -> ExperimentConfig:
        data = DataConfig(
            dataset=dataset, label_set=label_set, size=size, variation="clone" if args.toy else variation
        )
        return ExperimentConfig(
            tasks=TASK_SETS[tasks],
            data=data,
            optim=OptimConfig(**optim),
            train=TrainConfig(iterations=40000, val_every=2000, ckpt_every=2000),
        )

    return build


def supervised_recipe(
    recipe: str, doc: str, dataset: str, label_set: str, size: tuple[int, int], tasks: str, **kwargs
) -> None:
    """Entry point of a supervised recipe file."""
    parser = base_parser(doc)
    parser.set_defaults(paper_tables=True)  # the recipes of Tables 1 and 2: the paper's baselines
    main(supervised_config(dataset, label_set, size, tasks, **kwargs), parser, recipe)
