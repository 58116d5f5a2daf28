"""The one training loop (accelerate). It builds the model and the configured objectives (`uda.objectives`),
sums their loss terms (per-task terms through the task weighting), steps the model's optimiser, then lets
each objective run its own update; it knows no objective by name. Checkpoints are atomic and resumable; the
run folder holds config, logs, checkpoints, metrics.json, report.md and prediction images."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from uda import checkpoint
from uda.config import ExperimentConfig, save_config, to_dict
from uda.data.labels import get_label_set
from uda.data.loader import MixedBatches, move_to
from uda.data.streams import RunData
from uda.hardware import make_accelerator
from uda.models import build_model
from uda.models.domain_bn import bn_domain, keep_target_statistics, measure_target_statistics
from uda.models.multitask import intermediate_scales
from uda.objectives import (
    ObjectiveError,
    RunContext,
    Step,
    attach_prepared,
    attach_prepared_joint,
    build_objectives,
)
from uda.objectives.weighting import WeightingContext, weighting_from_config
from uda.optim import build_optimizer, settings_kept
from uda.runlog import RunLog, flat_config, images_per_iteration, peak_memory_mib
from uda.tasks import output_space, task_channels
from uda.validation import validate_run, write_training_images

ETA_STEPS = 4  # warm steps timed before the run says how long it will take


class TrainingError(RuntimeError):
    """The run cannot go on (the message says why and where its last checkpoint is)."""


def unwrap_outputs(outputs: Mapping[str, Mapping[int, torch.Tensor]], start: int, stop: int) -> dict:
    """Slice every output tensor along the batch (to split a joint forward into domains)."""
    return {t: {s: o[start:stop] for s, o in per.items()} for t, per in outputs.items()}


class Trainer:
    """Builds data, model, objectives, task weighting and optimiser from an ExperimentConfig and trains."""

    def __init__(self, cfg: ExperimentConfig, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.bar: tqdm | None = None  # the training progress bar while fit() runs
        try:
            checkpoint.check_output_dir(self.out)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        # The run's log first: it records the accelerator's precision choice.
        main = accelerator.is_main_process if accelerator else os.environ.get("RANK", "0") == "0"
        self.log = RunLog(self.out, main)
        self.accelerator = accelerator or make_accelerator(cfg.train, str(self.out))
        acc = self.accelerator
        if acc.device.type == "cpu":
            # `accelerate launch` sets one thread per process; use the machine's cores instead.
            # UDA_THREADS overrides it (e.g. several runs side by side on one machine).
            threads = os.environ.get("UDA_THREADS")
            torch.set_num_threads(
                int(threads) if threads else max(1, (os.cpu_count() or 1) // acc.num_processes)
            )
        set_seed(cfg.train.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.tasks = tuple(cfg.tasks)
        self.label_set = get_label_set(cfg.data.label_set)

        channels = task_channels(self.tasks, self.label_set.num_classes)
        model = build_model(cfg.model, channels)
        if cfg.model.sync_bn and acc.num_processes > 1:
            if acc.device.type == "cpu":
                raise TrainingError(
                    "model.sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU processes; "
                    "set model.sync_bn=false"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.space = output_space(cfg, self.label_set.num_classes)
        run = RunContext(cfg, self.tasks, channels, self.space, intermediate_scales(cfg.model))
        try:
            self.objectives = build_objectives(run)
            weighting = weighting_from_config(cfg.loss, self.tasks, self.objectives)
        except ObjectiveError as exc:
            raise TrainingError(str(exc)) from None
        needs = [[n for o in self.objectives if (n := o.needs(d)) is not None] for d in (0, 1)]
        if weighting.tasks != self.tasks:  # a learnt weighting over the tasks with per-task terms only
            self.log.info(f"loss.weighting={cfg.loss.weighting} balances {', '.join(weighting.tasks)}")
        self.data = RunData(cfg, needs)
        if self.data.uses_domain(1) and cfg.train.bn_mode == "joint" and cfg.target.size != cfg.data.size:
            raise TrainingError(
                f"train.bn_mode=joint needs equal image sizes, got data.size={cfg.data.size} and "
                f"target.size={cfg.target.size}; set train.bn_mode=separate or equal sizes"
            )
        keep_target_statistics(model, self.data, self.log)  # train.bn_mode=domain (uda.models.domain_bn)
        # With checkpoints the run is resumed (or refused): init_from's source is not read again.
        if cfg.train.init_from and not checkpoint.complete_checkpoints(self.out):
            try:
                checkpoint.initialise_from(cfg.train.init_from, model, [n for n, _ in self.joint_networks()])
            except checkpoint.CheckpointError as exc:
                raise TrainingError(str(exc)) from None
        self.weighting = weighting.to(acc.device)
        optimizer = build_optimizer(cfg, model, self.objectives, self.weighting)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        measure_target_statistics(model, cfg, self.data, acc, self.log)  # if init_from had none; before bind
        try:
            for objective in self.objectives:
                objective.bind(acc.unwrap_model(self.model))
        except ObjectiveError as exc:
            raise TrainingError(str(exc)) from None
        # Networks changed by objectives alone (EMA teacher): never prepared, saved as <name>.safetensors.
        self.held: dict[str, nn.Module] = {}
        owned = (n for o in self.objectives for n in (*o.own_networks(), *o.joint_networks()))
        taken = {"model", "optimizer", *owned}
        for objective in self.objectives:
            for name, net in objective.held_networks().items():
                if name in self.held or name in taken:
                    raise TrainingError(f"two networks would be saved as {name}.safetensors; rename one")
                self.held[name] = net.to(acc.device)
        # Networks with their own optimiser first, then those trained with the model: accelerate's files keep
        # their names (model_1.safetensors = the discriminators of an adaptation run), and the checkpoint also
        # holds them under the networks' own (discriminators.safetensors, posenet.safetensors, ...).
        for objective in self.objectives:
            attach_prepared(objective, acc.prepare)
        for objective in self.objectives:
            attach_prepared_joint(objective, acc.prepare)
        nets = [n for o in self.objectives for n in o.own_networks()]
        nets += [n for o in self.objectives for n in o.joint_networks()]
        self.file_names = {f"model_{i}.safetensors": f"{n}.safetensors" for i, n in enumerate(nets, 1)}
        self.step = 0
        self.bad_steps = 0
        self._saved_buffers: list[torch.Tensor] | None = None  # storage of buffer_snapshot
        self.history: list[dict[str, Any]] = []  # validation results
        # This process's newest per-step losses (the whole run's are in train_losses.jsonl).
        self.loss_log = self.log.recent

    # ------------------------------------------------------------------ construction helpers

    def objective(self, section: str):
        """The objective built from config section `section` (e.g. "adapt"), or None."""
        return next((o for o in self.objectives if o.section == section), None)

    def joint_networks(self) -> list[tuple[nn.Module, Any]]:
        """(network, objective) of every objective network trained with the model."""
        return [(net, o) for o in self.objectives for net in o.joint_networks().values()]

    def networks(self) -> list[nn.Module]:
        """Every trained network: the model, the objectives' own networks and their joint networks."""
        own = [net for o in self.objectives for net, _ in o.own_networks().values()]
        return [self.model, *own, *(net for net, _ in self.joint_networks())]

    def batches(self, start_step: int) -> MixedBatches:
        """The endless mixed training stream of this process, positioned at start_step."""
        acc = self.accelerator
        return self.data.batches(start_step * self.cfg.train.grad_accum, acc.process_index, acc.num_processes)

    # ------------------------------------------------------------------ one step

    def set_learning_rates(self, step: int) -> None:
        """Model optimiser: lr x gamma from lr_step_fraction of the run (or every lr_step_every steps); objectives
        set their own schedules."""
        o = self.cfg.optim
        if o.lr_step_every > 0:
            factor = o.lr_gamma ** (step // o.lr_step_every)
        else:
            factor = o.lr_gamma if step >= o.lr_step_fraction * self.cfg.train.iterations else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        for objective in self.objectives:
            objective.set_step(step)

    def forward_domains(self, batch: Mapping[str, Any]) -> dict[str, dict]:
        """Model outputs per domain of the batch ("source", "target"), by train.bn_mode."""
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        if "target" not in batch:
            return {"source": self.model(batch["source"]["image"].to(memory_format=fmt))}
        source, target = (batch[d]["image"].to(memory_format=fmt) for d in ("source", "target"))
        if self.cfg.train.bn_mode == "joint":
            outputs = self.model(torch.cat([source, target]))
            n = source.shape[0]
            return {
                "source": unwrap_outputs(outputs, 0, n),
                "target": unwrap_outputs(outputs, n, n + target.shape[0]),
            }
        outputs = self.model(source)  # first: the source's statistics move before the target's, as always
        with bn_domain(self.model, 1):  # target statistics with train.bn_mode=domain; else a no-op
            return {"source": outputs, "target": self.model(target)}

    def weighting_context(self) -> WeightingContext:
        """What the task weighting may use: the step, the model's last shared layer, the process reduction."""
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        scaler = acc.scaler
        return WeightingContext(
            step=self.step,
            shared=model.shared_layer,
            reduce_mean=(lambda t: acc.reduce(t, "mean")) if acc.num_processes > 1 else (lambda t: t),
            loss_scale=float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0,
        )

    def compose(self, step: Step) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The model loss of a step: per-task terms of every objective through the task weighting, then every
        objective's own weighted total, summed in objective order."""
        per_task: dict[str, list[torch.Tensor]] = {}
        totals, logs = [], {}
        for objective in self.objectives:
            terms = objective.loss(step)
            if terms is None:
                continue
            for task, values in terms.tasks.items():
                per_task.setdefault(task, []).extend(values)
            if terms.total is not None:
                totals.append(terms.total)
            logs.update(terms.logs)
        parts = []
        if any(per_task.values()):
            weighted, weight_logs = self.weighting(per_task, self.weighting_context())
            parts.append(weighted)
            logs.update(weight_logs)
        parts += totals
        if not parts:
            raise TrainingError("no objective contributes to the model loss; check the config's objectives")
        loss = parts[0]
        for part in parts[1:]:
            loss = loss + part
        return loss, logs

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameters of the model update, in groups whose gradient norm is clipped on its own: the model (or each
        of its independent networks, e.g. STL's), then the objectives' joint networks and learnt task weights."""
        model = self.accelerator.unwrap_model(self.model)
        parts = (
            model.independent_parts() if hasattr(model, "independent_parts") else [list(model.parameters())]
        )
        rest = [p for net, _ in self.joint_networks() for p in net.parameters()]
        rest += [p for group in self.weighting.param_groups(0.0) for p in group["params"]]
        if len(parts) == 1:
            return [parts[0] + rest]
        return [*parts, rest] if rest else parts

    def clip_gradients(self) -> torch.Tensor:
        """Clip each group's gradient norm at optim.clip_grad_norm (<= 0: no clipping); the total norm."""
        acc, groups = self.accelerator, self.clip_groups()
        limit = self.cfg.optim.clip_grad_norm if self.cfg.optim.clip_grad_norm > 0 else float("inf")
        if len(groups) == 1:
            return torch.as_tensor(acc.clip_grad_norm_(groups[0], limit))
        acc.unscale_gradients()  # once (fp16): a GradScaler refuses to unscale an optimiser twice per step
        norms = [torch.nn.utils.clip_grad_norm_(g, limit) for g in groups]
        return torch.stack([n.float() for n in norms]).norm()

    def model_update(
        self, batches: Mapping[str, Any] | list[Mapping[str, Any]]
    ) -> tuple[Step, dict[str, torch.Tensor], bool]:
        """Update the model (and joint networks) on the composed loss, its gradient summed over the micro-batches
        (each loss / their number; processes synchronise at the last); returns the step (outputs per domain of
        every micro-batch), the detached logs (means) and whether the step was finite (applied)."""
        batches = [batches] if isinstance(batches, Mapping) else list(batches)
        acc, n = self.accelerator, len(batches)
        buffers = self.buffer_snapshot()
        steps, sums = [], {}
        for i, batch in enumerate(batches):
            with contextlib.ExitStack() as no_sync:
                if i < n - 1:
                    for net in (self.model, *(net for net, _ in self.joint_networks())):
                        no_sync.enter_context(acc.no_sync(net))
                with acc.autocast():
                    steps.append(Step(self.step, batch, self.forward_domains(batch), acc, self.model))
                    loss, micro_logs = self.compose(steps[-1])
                acc.backward(loss / n if n > 1 else loss)
            for k, v in {"loss/total": loss, **micro_logs}.items():
                sums[k] = sums.get(k, 0) + v.detach() / n
        step, loss, logs = Step.merge(steps), sums.pop("loss/total"), sums
        grad_norm = self.clip_gradients()
        loss_ok = bool(torch.isfinite(loss.detach()).item())
        grads_ok = bool(torch.isfinite(grad_norm).item())
        # With fp16 the GradScaler skips an overflowing step itself and lowers its scale, so it must see it.
        finite = checkpoint.all_processes(acc, loss_ok and (grads_ok or acc.scaler is not None))
        if finite:
            self.optimizer.step()
            if acc.scaler is not None:  # fp16: the scaler skipped the step if the gradients overflowed
                finite = checkpoint.all_processes(acc, not self.optimizer.step_was_skipped)
        elif acc.scaler is not None:
            # clip_gradients unscaled the gradients: the scaler closes the step (and lowers its scale) or it
            # would refuse to unscale again at the next one.
            acc.scaler.update()
        if not finite:
            # A skipped step leaves the model as it was: the forward already moved the BatchNorm statistics.
            torch._foreach_copy_(*buffers)
        self.optimizer.zero_grad(set_to_none=True)
        logs["loss/total"] = loss
        logs["grad_norm"] = grad_norm.detach()
        return step, logs, finite

    @torch.no_grad()
    def buffer_snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(buffers, copies) of the trained networks' buffers (BatchNorm statistics, spectral-norm vectors): one
        copy kernel into storage allocated once."""
        live = [b for m in self.networks() for b in m.buffers()]
        if self._saved_buffers is None:  # the networks are fixed once built
            self._saved_buffers = [torch.empty_like(b) for b in live]
        torch._foreach_copy_(self._saved_buffers, live)
        return live, self._saved_buffers

    def train_step(self, batch: Mapping[str, Any] | list[Mapping[str, Any]]) -> dict[str, float]:
        """One optimisation step on a batch or the iteration's micro-batches: model update, then (if it was
        applied) the weighting's and objectives' own."""
        self.set_learning_rates(self.step)
        step, logs, finite = self.model_update(batch)
        if finite:
            logs.update(self.weighting.update(self.weighting_context()))
            for objective in self.objectives:
                logs.update(objective.update(step))
        values = {k: float(v) for k, v in logs.items()}
        values["finite"] = float(finite)
        return values

    # ------------------------------------------------------------------ checkpoints (uda/checkpoint.py)

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, newest first (a temporary folder from an interrupted save is ignored)."""
        return checkpoint.complete_checkpoints(self.out)

    def save_checkpoint(self) -> Path:
        """Save everything needed to resume, atomically (temporary folder, then rename), with file hashes."""
        state = {
            "bad_steps": self.bad_steps,
            "processes": self.accelerator.num_processes,
            "config": to_dict(self.cfg),
            "history": self.history,
            "components": {
                "weighting": self.weighting.checkpoint_state(),
                **{o.section: o.checkpoint_state() for o in self.objectives},
            },
        }
        self.log.flush()
        keep = self.cfg.train.keep_checkpoints
        try:  # a failed save (e.g. a full disk) is one line
            ckpt = checkpoint.save(
                self.accelerator, self.out, self.step, state, keep, self.file_names, self.held
            )
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from exc
        self.log.info(f"step {self.step}: checkpoint {ckpt.relative_to(self.out)}")
        return ckpt

    def load_checkpoint(self, path: Path | None = None) -> Path | None:
        """Resume from `path` or the newest usable checkpoint; a damaged one is reported and skipped, one of
        another model config is refused (TrainingError naming the keys). The optimisers' states come from the
        checkpoint, their settings (rates, betas, weight decay, ...) from this run's config."""
        optimizers = [self.optimizer, *(opt for o in self.objectives for _, opt in o.own_networks().values())]
        try:
            with settings_kept(optimizers):
                found = checkpoint.load(self.accelerator, self.out, to_dict(self.cfg), path, self.held)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        if found is None:
            return None
        ckpt, state = found
        if changed := checkpoint.changed_settings(state, to_dict(self.cfg), self.accelerator.num_processes):
            self.log.info(changed)  # a warning when the data stream changes
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.history = list(state.get("history", []))
        components = state.get("components", {})
        for name, part in (("weighting", self.weighting), *((o.section, o) for o in self.objectives)):
            try:
                if name in components:
                    part.load_checkpoint_state(components[name])
            except (KeyError, ValueError) as exc:  # e.g. another loss.dwa_period: one line, not a traceback
                raise TrainingError(
                    f"{ckpt}: its {name} state does not fit this run ({exc}); resume with the settings it was "
                    "saved with"
                ) from None
        return ckpt

    # ------------------------------------------------------------------ validation

    def validate(self, final: bool = False) -> dict[str, Any]:
        """Evaluate on the validation split (the target's in UDA) and write metrics, report, curves and images."""
        return validate_run(self, final)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to cfg.train.iterations (resuming if asked), validating and checkpointing on schedule."""
        try:
            return self._fit(resume)
        finally:
            if self.bar is not None:  # an error mid-run: no stale bar shifts later bars' positions
                self.bar.close()
            self.log.close()

    def _fit(self, resume: bool) -> dict[str, Any]:
        acc, cfg, log = self.accelerator, self.cfg, self.log
        if acc.is_main_process:
            log.info("config:\n" + json.dumps(to_dict(cfg), indent=2))
        if not resume and self.checkpoint_dirs():
            # A fresh run here would interleave its checkpoints with the old run's (and rotate its own away).
            raise TrainingError(
                f"{self.out}: holds checkpoints of an earlier run (newest {self.checkpoint_dirs()[0].name}); "
                "pass --resume to continue it, or choose another --out"
            )
        if resume:
            ckpt = self.load_checkpoint()
            if ckpt is not None:
                log.info(f"resumed from {ckpt} at step {self.step}")
        # TensorBoard hides what an earlier process of this run logged after this step (it is logged again);
        # everything of the step itself was logged before its checkpoint was saved.
        tensorboard = {"tensorboard": {"purge_step": self.step + 1}}
        acc.init_trackers("logs", config=flat_config(to_dict(cfg)), init_kwargs=tensorboard)
        if acc.is_main_process:  # only now: a refused resume leaves the run's config.json as it was
            save_config(cfg, self.out / "config.json")
        log.start(self.step)
        batches = self.batches(self.step)
        for _, data, domain in self.data.validation_sets():
            # Fail now, not after days of training, if a validation split is missing or empty.
            self.data.dataset(data, data.val_split, self.tasks, train=False, domain=domain)
        self.model.train()
        bar = self.bar = tqdm(
            total=cfg.train.iterations, initial=self.step, disable=not acc.is_main_process, desc=cfg.name
        )
        last: dict[str, float] = {}
        started = time.perf_counter()
        start_step = self.step
        images = images_per_iteration(cfg, self.data.uses_domain, acc.num_processes)
        while self.step < cfg.train.iterations:
            micro = [move_to(next(batches), acc.device) for _ in range(cfg.train.grad_accum)]
            last = self.train_step(micro)
            self.step += 1
            if cfg.train.image_every and self.step % cfg.train.image_every == 0:
                write_training_images(self, micro[-1])
            log.record({"step": self.step, **last})
            self.bad_steps = 0 if last["finite"] else self.bad_steps + 1
            if not last["finite"]:
                bad = ", ".join(k for k, v in last.items() if not torch.isfinite(torch.tensor(v))) or "loss"
                log.warning(
                    f"step {self.step}: non-finite {bad}; update skipped, weights unchanged "
                    f"({self.bad_steps} in a row, the run stops at train.max_bad_steps={cfg.train.max_bad_steps})"
                )
                acc.log({"train/skipped_step": 1.0, "train/bad_steps": float(self.bad_steps)}, step=self.step)
                if self.bad_steps >= cfg.train.max_bad_steps:
                    bar.close()
                    ckpt = self.save_checkpoint()
                    raise TrainingError(
                        f"{self.bad_steps} consecutive non-finite steps at step {self.step}; stopped, checkpoint "
                        f"{ckpt}; lower the learning rates or check the data"
                    )
            bar.update(1)
            if self.step == start_step + 1:  # the first step warms up (allocations, kernels): time from here
                warm = time.perf_counter()
            elif self.step == start_step + ETA_STEPS + 1:
                log.expected(ETA_STEPS, cfg.train.iterations - self.step, time.perf_counter() - warm)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.iterations:
                rate = (self.step - start_step) / max(1e-9, time.perf_counter() - started)
                speed = {
                    "it_per_s": rate,
                    "images_per_s": rate * images,
                    "peak_mem_mib": peak_memory_mib(acc.device),
                }
                bar.set_postfix(
                    {k.replace("loss/", ""): f"{v:.3g}" for k, v in last.items() if k.startswith("loss/")}
                )
                acc.log({f"train/{k}": v for k, v in {**last, **speed}.items()}, step=self.step)
                log.progress(self.step, cfg.train.iterations, last, speed)
            # Validation first, so that the checkpoint of this step holds its result in the history.
            mid_run = self.step < cfg.train.iterations
            if mid_run and cfg.train.val_every and self.step % cfg.train.val_every == 0:
                self.validate()
            if mid_run and cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                self.save_checkpoint()
        bar.close()
        ckpt = self.save_checkpoint()  # first: a failure in the final validation loses no training
        results = self.validate(final=True)
        checkpoint.update_state(acc, ckpt, history=self.history)  # kept when the run is extended
        seconds = time.perf_counter() - started
        log.info(f"done: {self.step - start_step} steps in {seconds:.0f} s; report {self.out / 'report.md'}")
        # Every process finishes its work before the process group goes (end_training destroys it).
        acc.wait_for_everyone()
        acc.end_training()
        return {"results": results, "last_losses": last, "step": self.step, "seconds": seconds}
