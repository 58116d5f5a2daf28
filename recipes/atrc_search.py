"""ATRC's context-type search (Bruggemann et al. 2021, §3.3), supervised on NYUDv2 (40 classes, 576x448).

    accelerate launch recipes/atrc_search.py [--toy] [--dataset nyudv2|synthia] [--tasks SD|SDN|SDNE]
                                            [--model atrc|atrc-fpm] [--data-root D] [--out O] [key=value ...]

The supernet (model.atrc_contexts=search on HRNetV2-W18-small): every CP block mixes its five candidate contexts
(global, local, tlabel, slabel, none) with Gumbel-softmax weights of its architecture logits alpha (temperature
model.atrc_search_temperature, default 1.0), trained with the weights in one backward pass (single-level, at
optim.lr_decoder). The context_search objective adds w(step) * mean H(p_alpha), w linear from
context_search.weight_start (-0.1) to context_search.weight_end (+0.1), and after every step fixes each block
whose entropy fell below context_search.threshold (0.3 nats) at its argmax. alpha has its own learning rate,
optim.lr_architecture (default: lr_decoder; --toy sets 5e-2: on toy S-D-N the 300 steps at lr_decoder left the
mean block entropy at ln 5 = 1.609 nats, at 1e-2 at 1.569, no block below the threshold). At every checkpoint and at the end
the chosen architecture is written to <run>/atrc_contexts.json; retrain it from scratch with

    accelerate launch recipes/nyudv2.py --model atrc model.backbone=hrnetv2-w18-small \\
        model.atrc_contexts=<run>/atrc_contexts.json

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug. --toy keeps HRNetV2-W18-small
(without ImageNet weights). Default task set: SDNE; default model: atrc (also atrc-fpm). --dataset synthia
searches on SYNTHIA (16 classes, 512x1024; recipes/synthia.py retrains the result). NYUDv2 depths are
below 10 m: label_context.depth_range=0.5,10 fits its depth label context better than the default 0.5-80 m.
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda import cli  # noqa: E402
from uda.config import ConfigError, ContextSearchConfig  # noqa: E402
from uda.models.atrc import SEARCH  # noqa: E402

RECIPE = "atrc_search"
ARCHS = ("atrc", "atrc-fpm")
TOY_LR_ARCHITECTURE = 5e-2
# --dataset: (label set, working size) of the supervised recipe the search runs on.
DATASETS = {"nyudv2": ("nyudv2_40", (448, 576)), "synthia": ("synthia16", (512, 1024))}


def build(args):
    """The search config: the NYUDv2 supervised recipe with the ATRC supernet and the context_search section."""
    if args.model is not None and args.model not in ARCHS:
        raise ConfigError(f"--model {args.model}: the context-type search is ATRC's; choose atrc or atrc-fpm")
    label_set, size = DATASETS[args.dataset]
    cfg = cli.supervised_config(args.dataset, label_set, size, "SDNE")(args)
    model = replace(cfg.model, backbone="hrnetv2-w18-small", atrc_contexts=SEARCH)
    optim = cfg.optim
    if args.toy:  # 300 toy steps: alpha at lr_decoder (or 1e-2) stays near uniform, no block chooses
        optim = replace(optim, lr_architecture=TOY_LR_ARCHITECTURE)
    return replace(cfg, model=model, optim=optim, context_search=ContextSearchConfig())


def main(argv=None):
    """Run the search (the chosen architecture: <run folder>/atrc_contexts.json)."""
    parser = cli.base_parser(__doc__, default_model="atrc")
    parser.add_argument(
        "--dataset",
        choices=sorted(DATASETS),
        default="nyudv2",
        help="the supervised data the search runs on (default: nyudv2)",
    )
    return cli.main(build, parser, RECIPE, argv)


if __name__ == "__main__":
    main()
