"""uda: dense multi-task learning and multi-task unsupervised domain adaptation.

The public API, importable from here (each loaded on first use, so `import uda` stays light):

- models: `build_model(model_cfg, {task: channels})`, `XTAM`, `MTEB` (exchange blocks on your own features),
  `load_pretrained(folder)` (a model written by uda-export)
- training: `Trainer(experiment_cfg).fit()`, `TrainingError`, and the typed configs (`ExperimentConfig`,
  `ModelConfig`, `DataConfig`, `TrainConfig`, ...; `apply_overrides(cfg, ["train.iterations=100"])`)
- data: `build_dataset(name, split, tasks, label_set, root)` and the readers (`SynthiaDataset`,
  `CityscapesDataset`, `VKitti2Dataset`, `NYUDv2Dataset`, `PASCALContextDataset`), `get_label_set(name)`
- metrics: `SegmentationMetric`, `DepthMetric`, `NormalsMetric`, `EdgesMetric`, `BoundaryOdsF`,
  `SaliencyMetric`, `MultiTaskMetrics`, `multitask_delta`; `evaluate_boundaries` (odsF, oisF, AP of maps)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

TASKS = ("semseg", "depth", "normals", "edges", "parts", "saliency")

_EXPORTS = {
    "uda.models.multitask": ("build_model",),
    "uda.models.exchange": ("XTAM", "MTEB"),
    "uda.models.pretrained": ("load_pretrained",),
    "uda.engine": ("Trainer", "TrainingError"),
    "uda.config": (
        "ExperimentConfig",
        "ModelConfig",
        "DataConfig",
        "LossConfig",
        "OptimConfig",
        "TrainConfig",
        "EvalConfig",
        "AdaptConfig",
        "PhotometricConfig",
        "ConsistencyConfig",
        "ConfigError",
        "apply_overrides",
        "load_config",
    ),
    "uda.data.readers": (
        "build_dataset",
        "SynthiaDataset",
        "CityscapesDataset",
        "VKitti2Dataset",
        "NYUDv2Dataset",
        "PASCALContextDataset",
    ),
    "uda.data.labels": ("get_label_set",),
    "uda.metrics": (
        "SegmentationMetric",
        "DepthMetric",
        "NormalsMetric",
        "EdgesMetric",
        "BoundaryOdsF",
        "SaliencyMetric",
        "MultiTaskMetrics",
        "multitask_delta",
    ),
    "uda.boundary": ("evaluate_boundaries",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["TASKS", "__version__", *_WHERE]


def __getattr__(name: str):
    """Import a public name's module on first use."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'uda' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
