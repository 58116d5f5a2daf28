"""Validation during a run: evaluate the model on the validation splits, write metrics.json, report.md (with
the validation history and curves) and prediction images into the run folder."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from uda.data.loader import eval_loader
from uda.evaluate import evaluate, protocol, write_report
from uda.runlog import validation_progress
from uda.tasks import evaluated_tasks
from uda.visualize import save_prediction_images


def validate_run(trainer, final: bool = False) -> dict[str, Any]:
    """Evaluate on the validation split (the target's in UDA) and write metrics, report, curves and images."""
    acc, cfg = trainer.accelerator, trainer.cfg
    results, protocols, images = {}, {}, []
    evaluated = evaluated_tasks(cfg)
    model = acc.unwrap_model(trainer.model)
    if acc.num_processes > 1:
        # After a training step each process holds its own BatchNorm statistics (DDP broadcasts rank 0's
        # only at the start of the next forward); evaluate everywhere with rank 0's, the saved ones.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    runs = []
    for name, data, domain in trainer.data.validation_sets():
        eval_cfg = replace(cfg.eval, median_scaling=False) if name == "source" else cfg.eval
        runs.append((name, data, domain, eval_cfg))
        if final and name != "source" and not cfg.eval.label_resolution:
            # The final evaluation also compares at the label files' resolution (e.g. 2048x1024 Cityscapes).
            runs.append((f"{name}@labels", data, domain, replace(cfg.eval, label_resolution=True)))
    for name, data, domain, eval_cfg in runs:
        dataset = trainer.data.dataset(
            data,
            data.val_split,
            evaluated,
            train=False,
            domain=domain,
            labels_native=eval_cfg.label_resolution,
        )
        loader = eval_loader(dataset, data.batch_size, acc.process_index, acc.num_processes, data.num_workers)
        prefix = f"step{trainer.step:07d}_{name}"

        def write_images(batch, preds, prefix=prefix):
            if acc.is_main_process:
                paths = save_prediction_images(
                    trainer.out / "images", prefix, batch, preds, evaluated, trainer.label_set
                )
                images.extend(str(p.relative_to(trainer.out)) for p in paths)

        max_batches = cfg.train.val_batches if (not final or name == "source") else None
        if name == "source" and max_batches is None:
            max_batches = 4
        total = min(len(loader), max_batches) if max_batches is not None else len(loader)
        results[name] = evaluate(
            model,
            validation_progress(loader, f"validate {name}", total, acc.is_main_process),
            evaluated,
            eval_cfg,
            trainer.space,
            reduce=lambda s: acc.reduce(s, "sum"),
            device=acc.device,
            max_batches=max_batches,
            on_first_batch=write_images,
            domain=domain,
        )
        protocols[name] = protocol(
            eval_cfg, data.dataset, data.val_split, data.label_set, f"step {trainer.step} (last)"
        )
        if max_batches is not None:
            protocols[name]["batches"] = f"first {max_batches} per process"
    record = {"step": trainer.step, **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}}
    # A step evaluated again (a finished run resumed as it is) replaces its earlier row.
    trainer.history = [r for r in trainer.history if r.get("step") != trainer.step] + [record]
    trainer.log.info(f"step {trainer.step}: validation " + trainer.log.summary(results))
    if acc.is_main_process:
        acc.log({f"val/{k}": v for k, v in record.items() if k != "step"}, step=trainer.step)
        write_report(
            trainer.out,
            f"{cfg.name}: evaluation at step {trainer.step}",
            results,
            protocols,
            class_names=trainer.label_set.class_names,
            extra={"step": trainer.step, "iterations": cfg.train.iterations}
            if final
            else {"step": trainer.step},
            images=images,
            history=trainer.history,
            figures=trainer.log.curves(trainer.history),
        )
    return results


@torch.no_grad()
def write_training_images(trainer, batch) -> list[str]:
    """Prediction panels of the model (in eval mode) on the first samples of a training batch, each domain's
    (train.image_every); the paths relative to the run folder. Main process only."""
    from uda.models.domain_bn import bn_domain
    from uda.tasks import to_predictions

    acc = trainer.accelerator
    if not acc.is_main_process:
        return []
    model, written = acc.unwrap_model(trainer.model), []
    was_training = model.training
    model.eval()
    for domain, name in enumerate(("source", "target")):
        if name not in batch:
            continue
        with bn_domain(model, domain):
            outputs = model(batch[name]["image"][:2])
        tasks = [t for t in trainer.tasks if 0 in outputs.get(t, {})]
        preds = to_predictions(outputs, 0, trainer.space, tasks)
        prefix = f"train_step{trainer.step:07d}_{name}"
        paths = save_prediction_images(
            trainer.out / "images", prefix, batch[name], preds, tasks, trainer.label_set
        )
        written += [str(p.relative_to(trainer.out)) for p in paths]
    model.train(was_training)
    return written
