"""Shared command line of the recipes: `--toy`, `--data-root`, `--out`, `--model`, `--seed`, `--resume`,
`--config`, `--print-config` and `section.key=value` overrides; checks the run folder, the data and the ImageNet
weights (one-line errors), then trains with the one engine."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from uda.config import (
    Arch,
    ConfigError,
    ConsistencyConfig,
    DataConfig,
    ExperimentConfig,
    LabelContextConfig,
    apply_overrides,
    keys_help,
    load_config,
    to_dict,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TOY_ROOT = REPO_ROOT / "datasets" / "toy"
MODELS = typing.get_args(Arch)  # --model choices: every architecture

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
    # PASCAL-Context (MTI-Net / ATRC): P human parts, A sAliency (S is semseg).
    "SPA": ("semseg", "parts", "saliency"),
    "SPANE": ("semseg", "parts", "saliency", "normals", "edges"),
}


def toy_parts(root: Path) -> set[str]:
    """The complete parts of the toy dataset under root: its datasets, and "cityscapes_sequence" when it has
    Cityscapes' video frames (none when root has no toy_info.json)."""
    from uda.data.toy.write import SEQUENCE

    try:
        info = json.loads((root / "toy_info.json").read_text())
    except (OSError, ValueError):
        return set()
    parts = set(info.get("domains", ()))
    return parts | ({SEQUENCE} if "cityscapes" in parts and info.get(SEQUENCE, True) else set())


def ensure_toy_data(
    root: Path = TOY_ROOT,
    domains: Sequence[str] | None = None,
    sequences: bool = True,
    frames: int = 240,
    seed: int = 0,
    timeout_s: float = 900,
) -> Path:
    """Generate the built-in toy datasets a run reads (default: all; Cityscapes' video frames only with
    `sequences`) under root when missing. The other parts are rendered when a recipe first needs them; one
    process generates, the others wait."""
    from uda.data.toy import TOY_DATASETS
    from uda.data.toy.write import SEQUENCE

    needed = set(TOY_DATASETS if domains is None else domains)
    needed |= {SEQUENCE} if sequences and "cityscapes" in needed else set()
    missing = needed - toy_parts(root)
    if not missing and all((root / d).is_dir() for d in needed - {SEQUENCE}):
        return root
    if os.environ.get("LOCAL_RANK", "0") == "0":
        from uda.data.toy import make_toy_data

        names = ", ".join(d for d in (*TOY_DATASETS, SEQUENCE) if d in missing)
        print(f"generating toy data ({names}) in {root} (first run only)", flush=True)
        datasets = sorted(needed - {SEQUENCE})
        make_toy_data(root, frames=frames, seed=seed, domains=datasets, extend=True, sequences=sequences)
    else:
        deadline = time.monotonic() + timeout_s
        while not needed <= toy_parts(root):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{root / 'toy_info.json'}: toy data did not appear; run `uda-make-toy-data --out {root}`"
                )
            time.sleep(1)
    return root


class PreflightError(RuntimeError):
    """A user error found before anything is built (run folder, ImageNet weights); one line with the fix."""


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
        "data.batch_size=4; they apply after the options and after --config. The full config is printed at the "
        "start of a run and saved as <out>/config.json. Set UDA_DEBUG=1 (or --debug) for tracebacks of user "
        "errors.\n\nConfig sections and keys (dataclass defaults; the recipe sets its own, see --print-config):\n"
        + keys_help(),
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
        help="folder holding the dataset folders, e.g. D with D/cityscapes/ inside (default: $UDA_DATA_ROOT if "
        "set, else datasets/; datasets/toy with --toy)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: runs/<recipe>/[<variant>-]<model>-s<seed>)",
    )
    parser.add_argument(
        "--model", choices=MODELS, default=None, help=f"architecture (default: {default_model})"
    )
    parser.set_defaults(default_model=default_model)
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: 42, train.seed)")
    parser.add_argument(
        "--tasks",
        choices=sorted(TASK_SETS),
        default=None,
        help="task set: S-D (SD), S-D-N (SDN), S-D-N-E (SDNE); PASCAL-Context: semseg, parts, saliency (SPA), and "
        "normals, edges (SPANE); default: the recipe's",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="samples per domain per step: data.batch_size (and target.batch_size when the run has a target domain) "
        "(default: the recipe's, 2 for most)",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["auto", "no", "fp16", "bf16"],
        default=None,
        help="train.mixed_precision: auto = bf16 where the device supports it, fp16 on older GPUs, else fp32 "
        "(default: auto; no with --toy)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="resume from the newest usable checkpoint in --out; a new run when --out does not exist yet "
        "(default: off)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="rebuild a run from its config.json (or a YAML file with the same keys) instead of the recipe's "
        "config; --out, --data-root, --seed, --batch-size, --mixed-precision and key=value apply on top",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of user errors instead of one line (also: UDA_DEBUG=1)",
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


def check_model(cfg: ExperimentConfig) -> None:
    """The architecture fits the backbone and its options (model.arch, model.backbone, model.aux_tasks, ...)."""
    from uda.models.multitask import check_model_config

    try:
        check_model_config(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    unknown = [t for t in cfg.model.aux_tasks if t not in cfg.tasks]
    if unknown:
        raise ConfigError(
            f"model.aux_tasks {unknown} are not tasks of this run {tuple(cfg.tasks)}; remove them"
        )
    if cfg.model.arch in ("atrc", "atrc-fpm"):
        from uda.models.atrc import SEARCH, resolve_contexts

        main = [t for t in cfg.tasks if t not in cfg.model.aux_tasks]
        if cfg.model.atrc_contexts == SEARCH:
            if cfg.context_search is None:
                raise ConfigError(
                    f"model.atrc_contexts={SEARCH} needs the context_search section (entropy regulariser and "
                    "freezing): run recipes/atrc_search.py"
                )
        else:
            try:
                resolve_contexts(cfg.model.atrc_contexts, main)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None


def check_label_sets(cfg: ExperimentConfig) -> None:
    """Unknown label set names, and a target whose classes differ from the source's (names and order), are
    configuration errors (caught before anything is built)."""
    from uda.data.labels import get_label_set

    for section, data in (("data", cfg.data), ("target", cfg.target)):
        if data is not None:
            try:
                get_label_set(data.label_set)
            except ValueError as exc:
                raise ConfigError(f"{section}.label_set: {exc}") from None
    if cfg.target is None:
        return
    source, target = get_label_set(cfg.data.label_set), get_label_set(cfg.target.label_set)
    # One model serves both domains: its output channel c must mean the same class in each.
    if not source.same_classes(target):
        raise ConfigError(
            f"data.label_set={source.name} ({source.num_classes} classes) and target.label_set={target.name} "
            f"({target.num_classes} classes) do not list the same classes in the same order; choose label sets "
            "with the same class list (e.g. synthia16 with cityscapes16, vkitti2_8 with cityscapes8)"
        )


def with_root(data: DataConfig | None, root: Path | str | None) -> DataConfig | None:
    """Point a data config at <root>/<dataset> when a data root is given (path arithmetic only: building a
    config touches no file; resolve_roots checks the folders)."""
    if data is None or root is None:
        return data
    return replace(data, root=str(Path(root) / data.dataset))


def resolve_roots(cfg: ExperimentConfig, data_root: Path | None) -> ExperimentConfig:
    """Resolve each dataset folder through uda.data.roots.dataset_folder: the one under --data-root (or under
    $UDA_DATA_ROOT / datasets/ when no root is set), or --data-root itself when it is the dataset's folder.
    A root set by data.root=... (or a --config file) is kept as it is. DataError when there is no folder."""
    from uda.data.roots import dataset_folder

    def resolve(data: DataConfig | None) -> DataConfig | None:
        if data is None:
            return None
        if data.root is None:
            return replace(data, root=str(dataset_folder(None, data.dataset)))
        if data_root is not None and data.root == str(Path(data_root) / data.dataset):
            return replace(data, root=str(dataset_folder(data_root, data.dataset)))
        return data

    return replace(cfg, data=resolve(cfg.data), target=resolve(cfg.target))


def option_overrides(args: argparse.Namespace, adapting: bool) -> list[str]:
    """The shortcut options as section.key=value overrides (the user's own overrides come after them)."""
    out = []
    if getattr(args, "seed", None) is not None:
        out.append(f"train.seed={args.seed}")
    if getattr(args, "batch_size", None) is not None:
        out.append(f"data.batch_size={args.batch_size}")
        if adapting:
            out.append(f"target.batch_size={args.batch_size}")
    if getattr(args, "mixed_precision", None) is not None:
        out.append(f"train.mixed_precision={args.mixed_precision}")
    return out


def finalise(cfg: ExperimentConfig, args: argparse.Namespace, recipe: str) -> ExperimentConfig:
    """Apply the shared options (toy, data root, model, seed, out) and the user's overrides."""
    root = args.data_root
    if args.toy:
        from uda.models.multiscale import is_multiscale

        root = root or TOY_ROOT  # generated below, once the config is known to be valid
        # A recipe built on a multi-scale backbone (e.g. atrc_search) keeps it, without ImageNet weights.
        keep = [f"model.backbone={cfg.model.backbone}"] if is_multiscale(cfg.model.backbone) else []
        cfg = apply_overrides(
            cfg, TOY_OVERRIDES + keep + (["adapt.disc_channels=16"] if cfg.adapt is not None else [])
        )
        cfg = replace(cfg, data=replace(cfg.data, size=TOY_SIZE, num_workers=1))
        if cfg.target is not None:
            cfg = replace(cfg, target=replace(cfg.target, size=TOY_SIZE, num_workers=1))
    cfg = replace(cfg, data=with_root(cfg.data, root), target=with_root(cfg.target, root))
    arch = args.model or getattr(args, "default_model", "mteb")
    cfg = replace(cfg, model=replace(cfg.model, arch=arch))
    if args.tasks is not None:
        cfg = replace(cfg, tasks=TASK_SETS[args.tasks], loss=replace(cfg.loss, weights={}))
    cfg = model_defaults(cfg)
    if getattr(args, "paper_tables", False):
        cfg = paper_baselines(cfg)
    if getattr(args, "optim_preset", "paper") == "released":
        cfg = released_adaptation_optimiser(cfg)
    if getattr(args, "consistency", "none") != "none":
        cfg = with_consistency(cfg, args.consistency)
    cfg = apply_overrides(cfg, option_overrides(args, cfg.target is not None) + list(args.overrides))
    check_label_sets(cfg)
    check_model(cfg)
    if args.toy:
        datasets = [d.dataset for d in (cfg.data, cfg.target) if d is not None]
        ensure_toy_data(Path(root), datasets, sequences=cfg.photometric is not None)
    variant = "" if cfg.name == "experiment" else f"{cfg.name}-"
    name = f"{recipe}-{variant}{cfg.model.arch}"
    out = args.out or REPO_ROOT / "runs" / recipe / f"{variant}{cfg.model.arch}-s{cfg.train.seed}"
    return replace(cfg, name=name, out=str(out))


# Options that apply on top of a --config file; every other recipe option shapes the config the file holds.
CONFIG_FILE_OPTIONS = {
    "config",
    "out",
    "data_root",
    "seed",
    "batch_size",
    "mixed_precision",
    "resume",
    "print_config",
    "debug",
    "overrides",
}


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The option strings given on the command line (an option given with its default value counts)."""
    unset = object()
    dests = [a for a in parser._actions if a.dest != argparse.SUPPRESS and a.option_strings]
    namespace = argparse.Namespace(**{a.dest: unset for a in dests})
    parser.parse_intermixed_args(argv, namespace=namespace)
    return [
        a.option_strings[-1] for a in dests if getattr(namespace, a.dest) is not unset and a.dest != "help"
    ]


def from_config_file(args: argparse.Namespace, given: Sequence[str]) -> ExperimentConfig:
    """The config of a --config file with --out, --data-root, the shortcut options and the overrides on top."""
    shaping = [o for o in given if o.lstrip("-").replace("-", "_") not in CONFIG_FILE_OPTIONS]
    if shaping:
        raise ConfigError(
            f"{' '.join(shaping)} cannot be combined with --config (the file holds the whole config); "
            "change its keys with section.key=value instead (e.g. model.arch=mtl)"
        )
    cfg = load_config(ExperimentConfig, args.config)
    if args.data_root is not None:
        cfg = replace(
            cfg, data=with_root(cfg.data, args.data_root), target=with_root(cfg.target, args.data_root)
        )
    cfg = apply_overrides(cfg, option_overrides(args, cfg.target is not None) + list(args.overrides))
    if args.out is not None:
        cfg = replace(cfg, out=str(args.out))
    check_label_sets(cfg)
    return cfg


def model_defaults(cfg: ExperimentConfig) -> ExperimentConfig:
    """Per-architecture defaults (before the user's overrides): 3-ways PAD-Net distils at decoder scale 2, where
    the authors' PadnetPlus places its block (mTEB sits at scale 1); PAP-Net and CTAL, whose affinities are N x N
    in the tokens, propagate at decoder scale 3 (1/8 of the input) on the 3-ways decoder; MTI-Net and CTAL-MS
    supervise every scale's initial prediction with the final loss weight (sum, MTI-Net §3), as ATRC + FPM does;
    the ATRC archs supervise their auxiliary label-context predictions (label_context section)."""
    arch = cfg.model.arch
    if arch == "3ways-padnet":
        return replace(cfg, model=replace(cfg.model, exchange_scales=(2,)))
    if arch in ("pap-net", "ctal"):
        return replace(cfg, model=replace(cfg.model, exchange_scales=(3,)))
    if arch in ("mti-net", "ctal-ms"):
        return replace(cfg, loss=replace(cfg.loss, intermediate="sum"))
    if arch == "atrc-fpm":
        return replace(cfg, loss=replace(cfg.loss, intermediate="sum"), label_context=LabelContextConfig())
    if arch == "atrc":
        return replace(cfg, label_context=LabelContextConfig())
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
        "edges/odsf",
        "parts/miou",
        "saliency/maxf",
        "saliency/miou",
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
    """Parse, build the config, check the run folder, data and weights, train. Configuration errors exit 2; user
    errors found before the run (missing data or split files, unavailable ImageNet weights, nothing to resume,
    a mistyped --out) and data and training errors exit 1, each with one line on stderr (--debug or UDA_DEBUG=1:
    the traceback). Nothing is built and no run folder is created before the checks pass."""
    from uda.data.decode import DataError

    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    debug = bool(getattr(args, "debug", False))
    try:
        if getattr(args, "config", None) is not None:
            cfg = from_config_file(args, given_options(parser, argv))
        else:
            cfg = finalise(build(args), args, recipe)
    except ConfigError as exc:
        fail(exc, 2, debug)
    try:
        cfg = resolve_roots(cfg, args.data_root)
        if getattr(args, "print_config", False):
            print(json.dumps(to_dict(cfg), indent=2))
            return None
        preflight(cfg, args)
    except (DataError, PreflightError) as exc:
        fail(exc, 1, debug)
    try:
        return run(cfg, args.resume)
    except Exception as exc:
        from uda.engine import TrainingError

        if isinstance(exc, DataError | TrainingError):
            fail(exc, 1, debug)
        raise


def preflight(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    """Every user error that can be found before building anything: the run folder, the datasets and their
    split files, the ImageNet weights."""
    check_run_folder(Path(cfg.out), args.resume, getattr(args, "out", None) is not None, to_dict(cfg))
    check_data(cfg)
    check_imagenet_weights(cfg)


def check_run_folder(
    out: Path, resume: bool, explicit_out: bool = True, config: dict[str, Any] | None = None
) -> None:
    """Refuse, before anything is written: a fresh run into a folder with checkpoints (its config.json would be
    overwritten), --resume of a folder that holds files but no checkpoint, and --resume with an --out that
    does not exist and looks mistyped (a close sibling exists, or its parent is missing outside runs/). A
    --resume whose run folder does not exist yet starts a new run (as `make demo` relies on), and so does one
    of the same run (its config.json equals `config`) stopped before its first checkpoint."""
    from uda.checkpoint import complete_checkpoints

    if out.exists() and not out.is_dir():
        raise PreflightError(f"{out}: is a file, not a run folder; pass --out a folder")
    found = complete_checkpoints(out)
    if found and not resume:
        raise PreflightError(
            f"{out}: holds checkpoints of an earlier run (newest {found[0].name}); pass --resume to continue it, "
            "or choose another --out"
        )
    if not resume or found:
        return
    if out.is_dir():
        held = sorted(p.name for p in out.iterdir())
        if held and config is not None and same_run(out / "config.json", config):
            print(
                f"note: {out} has no checkpoint yet (stopped before the first); starting it over",
                file=sys.stderr,
            )
            return
        if held:
            shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            raise PreflightError(
                f"{out}: no checkpoint to resume from (it holds {shown} but no checkpoints/step-*/); check --out, "
                "or drop --resume to start a new run there"
            )
        return
    if not explicit_out:
        return
    absolute = out.absolute()
    ancestor = absolute
    while not ancestor.exists():
        ancestor = ancestor.parent
    missing = absolute.relative_to(ancestor).parts[0]
    siblings = [p.name for p in ancestor.iterdir() if p.is_dir()]
    close = difflib.get_close_matches(missing, siblings, n=1, cutoff=0.75)
    if close:
        raise PreflightError(
            f"{out}: no such run folder (did you mean {ancestor / close[0]}?); fix --out, or drop --resume to "
            "start a new run there"
        )
    runs = [REPO_ROOT / "runs", Path.cwd() / "runs"]
    if not absolute.parent.is_dir() and not any(absolute.is_relative_to(r) for r in runs):
        raise PreflightError(
            f"{out}: no such run folder, and its parent {out.parent} does not exist; fix --out, or drop --resume "
            "to start a new run there"
        )
    print(f"note: {out} does not exist yet; --resume starts a new run there", file=sys.stderr)


def same_run(saved: Path, config: dict[str, Any]) -> bool:
    """Whether `saved` (a run's config.json) holds exactly `config`."""
    try:
        return json.loads(saved.read_text()) == config
    except (OSError, ValueError):
        return False


def objective_uses_target(cfg: ExperimentConfig) -> bool:
    """Whether an objective trains on the target's training split (else only its validation split is read)."""
    if cfg.target is None:
        return False
    photometric = cfg.photometric is not None and cfg.photometric.domain == "target"
    consistency = cfg.consistency is not None and "target" in cfg.consistency.domains
    return cfg.adapt is not None or cfg.self_training is not None or photometric or consistency


def check_data(cfg: ExperimentConfig) -> None:
    """Open every split the run reads (training splits: images; validation splits: images and the run's
    labels) with the dataset readers, which check the layout, the split files and that every image exists.
    Raises the readers' one-line DataError."""
    from uda.data.readers import build_dataset

    splits: list[tuple[DataConfig, str, tuple[str, ...]]] = [(cfg.data, cfg.data.train_split, ())]
    if objective_uses_target(cfg):
        splits.append((cfg.target, cfg.target.train_split, ()))
    if cfg.target is not None:
        splits.append((cfg.target, cfg.target.val_split, tuple(cfg.tasks)))
    if cfg.target is None or cfg.target.dataset != cfg.data.dataset:
        splits.append((cfg.data, cfg.data.val_split, tuple(cfg.tasks)))
    for data, split, tasks in splits:
        build_dataset(
            data.dataset,
            split,
            tasks,
            label_set=data.label_set,
            root=data.root,
            variation=data.variation,
            sky_depth=data.sky_depth,
        )


def imagenet_weights(backbone: str) -> tuple[str, Path]:
    """(url, local file) of the torchvision ImageNet weights of `backbone` (file: $TORCH_HOME/hub/checkpoints)."""
    import torch
    import torchvision

    weights = torchvision.models.get_weight(f"ResNet{backbone.removeprefix('resnet')}_Weights.IMAGENET1K_V1")
    return weights.url, Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def check_imagenet_weights(cfg: ExperimentConfig) -> None:
    """Make sure the ImageNet weights the model (and pose net) load are there before anything is built: a
    model.weights_path must exist; torchvision's cached file is downloaded now if missing, and where that
    fails (offline) the run stops with the expected path and the fix."""
    import torch

    model = cfg.model
    if model.weights_path is not None:
        if not Path(model.weights_path).is_file():
            raise PreflightError(
                f"{model.weights_path}: no such file (model.weights_path); pass the backbone's ImageNet state dict "
                "(torchvision .pth; timm .pth or .safetensors for HRNet), or set model.pretrained=false model.weights_path=none"
            )
        return
    if not model.pretrained:
        return
    from uda.models.multiscale import FPNS, HRNETS

    if model.backbone in HRNETS and os.environ.get("LOCAL_RANK", "0") == "0":
        check_timm_weights(model.backbone)
    backbones = [] if model.backbone in HRNETS else [FPNS.get(model.backbone, model.backbone)]
    if cfg.photometric is not None and cfg.photometric.pose_backbone not in backbones:
        backbones.append(cfg.photometric.pose_backbone)
    for backbone in backbones:
        url, path = imagenet_weights(backbone)
        if path.is_file() or os.environ.get("LOCAL_RANK", "0") != "0":
            continue  # other processes of a launch: the first one downloads
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except Exception as exc:  # noqa: BLE001 - offline, proxy, disk: the same fix
            reason = " ".join(str(exc).split())[:120] or type(exc).__name__
            raise PreflightError(
                f"{path}: {backbone} ImageNet weights missing and not downloadable ({reason}); place the file "
                f"there (from {url}; or set TORCH_HOME), pass model.weights_path=/path/{path.name}, or train "
                "without them with model.pretrained=false"
            ) from None


def check_timm_weights(backbone: str) -> None:
    """Fetch the timm ImageNet weights of an HRNet backbone into the Hugging Face cache now (the model built
    later reads them from there), or stop with the fix."""
    from uda.models.backbone import PretrainedWeightsError
    from uda.models.multiscale import HRNetBackbone

    try:
        HRNetBackbone(backbone, pretrained=True)
    except PretrainedWeightsError as exc:
        raise PreflightError(str(exc)) from None


def debug_enabled(debug: bool = False) -> bool:
    """Whether user errors show their traceback (--debug or UDA_DEBUG=1)."""
    return debug or os.environ.get("UDA_DEBUG", "") not in ("", "0")


def error_line(exc: BaseException) -> str:
    """The one-line message of an error. An error re-raised from a DataLoader worker carries the worker's
    traceback; its last line is the original message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1].strip())


def fail(exc: BaseException, code: int, debug: bool = False) -> NoReturn:
    """Print `error: <one line>` on stderr, release the process group (if any) and exit with `code`. With
    --debug (debug=True) or UDA_DEBUG=1, re-raise `exc` with its traceback instead (call it in the except)."""
    from tqdm import tqdm

    if debug_enabled(debug):
        raise exc

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
