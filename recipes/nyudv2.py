"""Supervised multi-task learning on NYUDv2 (795 train / 654 val images), under the protocol of a paper family.

    accelerate launch recipes/nyudv2.py [--toy] [--protocol P] [--tasks SD|SDN|SDNE] [--model M]
                                       [--data-root D] [--out O] [key=value ...]

Protocols P (--protocol):
  densemtl  40 classes, 448x576 (resize), the DenseMTL task-weight preset of the task set, paper baselines
            (DeepLab head for stl/mtl). Default task set SDNE. (The recipe's behaviour before protocols.)
  mtinet    40 classes at 480x640 (MTI-Net): random scale in {1, 1.2, 1.5} about the image centre (a zoom that
            keeps 480x640) and horizontal flip (normals' x flips, the principal point follows); task weights of
            MTI-Net / ATRC: semseg 1, depth 1, normals 10, edges 50; Adam 1e-4, weight decay 1e-4. SDNE.
  atrc      40 classes, ATRC / InvPT pipeline (data.fit=pad): random scale in [0.5, 2.0] of the image's own size,
            a 448x576 crop where larger and a centred pad where smaller, flip; evaluation pads to 448x576 (the
            425x560 images of their release; 480x640 images stay whole). Weights as mtinet. SDNE.
  nyu13     13 classes (nyudv2_13: Couprie / Eigen & Fergus' class13Mapping of the 40) at 288x384 (CTAL, XTasC),
            uniform task weights (the papers give none for S-D-N), Adam 1e-4. Default task set SDN.

Every protocol: depth in metres, 0 (no measurement) masked out of the depth loss and metrics; normals 0 where
depth has a hole (the reader). Edges are validated with F1 at 0.5; the tables of MTI-Net / ATRC use odsF at
maxDist 0.011 (set here): eval.edge_metric=odsf.

Models M: stl, mtl, padnet, 3ways-padnet, mteb, cross-stitch, pap-net, ctal on the dilated ResNets
(model.backbone=resnet18..101); stl, mtl, padnet, mteb, cross-stitch, pap-net, ctal, mti-net, ctal-ms, atrc,
atrc-fpm on the multi-scale backbones (model.backbone=hrnetv2-w18-small|hrnetv2-w18|hrnetv2-w48|fpn-resnet18|
fpn-resnet50).

Shared options (see --help): --seed S, --batch-size N, --mixed-precision auto|no|fp16|bf16, --resume,
--config FILE (rebuild a run from its config.json), --print-config, --debug.
"""

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uda import cli  # noqa: E402
from uda.config import DataConfig, EvalConfig, LossConfig  # noqa: E402

RECIPE = "nyudv2"
# NYUDv2 boundaries are matched within 0.011 of the image diagonal (ATRC's README for SEISM).
EDGE_MAX_DIST = 0.011
# MTI-Net / ATRC NYUDv2 loss weights.
LITERATURE_WEIGHTS = {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edges": 50.0}
PROTOCOLS = ("densemtl", "mtinet", "atrc", "nyu13")
ADAM = {"optimizer": "adam", "lr_backbone": 1e-4, "lr_decoder": 1e-4, "weight_decay": 1e-4}


def build(args):
    """The config of --protocol. --tasks is applied here (finalise would reset the weights to DenseMTL's)."""
    protocol = args.protocol
    tasks = cli.TASK_SETS[args.tasks or ("SDN" if protocol == "nyu13" else "SDNE")]
    args.tasks = None
    args.paper_tables = protocol == "densemtl"  # DenseMTL's STL/MTL baselines belong to its tables only
    if protocol == "densemtl":
        cfg = cli.supervised_config("nyudv2", "nyudv2_40", (448, 576), "SDNE")(args)
        return replace(cfg, tasks=tasks, eval=replace(cfg.eval, edge_max_dist=EDGE_MAX_DIST))
    cfg = cli.supervised_config("nyudv2", "nyudv2_40", (480, 640), "SDNE", **ADAM)(args)
    if protocol == "mtinet":
        data = DataConfig(
            dataset="nyudv2",
            label_set="nyudv2_40",
            size=(480, 640),
            scale_choices=(1.0, 1.2, 1.5),
            crop="center",
            hflip=True,
            batch_size=8,
        )
    elif protocol == "atrc":
        data = DataConfig(
            dataset="nyudv2",
            label_set="nyudv2_40",
            size=(448, 576),
            fit="pad",
            scale_range=(0.5, 2.0),
            hflip=True,
            batch_size=8,
        )
    else:
        data = DataConfig(dataset="nyudv2", label_set="nyudv2_13", size=(288, 384), hflip=True, batch_size=8)
    weights = {t: 1.0 if protocol == "nyu13" else LITERATURE_WEIGHTS.get(t, 1.0) for t in tasks}
    return replace(
        cfg,
        name=protocol,
        tasks=tasks,
        data=data,
        loss=LossConfig(weights=weights),
        eval=EvalConfig(edge_max_dist=EDGE_MAX_DIST, max_depth=10.0),
    )


def main(argv=None):
    """Parse and run."""
    parser = cli.base_parser(__doc__)
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="densemtl",
        help="the paper family's data, class set, resolution, augmentation and task weights (default: densemtl)",
    )
    return cli.main(build, parser, RECIPE, argv)


if __name__ == "__main__":
    main()
