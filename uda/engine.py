"""The one training loop (accelerate): supervised multi-task learning, and output-level adversarial UDA when a
target domain is configured. Checkpoints are atomic and resumable; the run folder holds config, logs,
checkpoints, metrics.json, report.md and prediction images."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from uda import checkpoint
from uda.config import DataConfig, ExperimentConfig, save_config, to_dict
from uda.data.labels import get_label_set
from uda.data.loader import MixedBatches, eval_loader, move_to, train_loader
from uda.data.readers import build_dataset
from uda.data.transforms import EvalTransform, TrainTransform
from uda.evaluate import evaluate, protocol, write_report
from uda.geometry import disparity_to_depth
from uda.losses import MultiTaskLoss, default_task_weights
from uda.losses.adversarial import bce_with_domain, entropy_map, normalise_depth_for_discriminator
from uda.losses.photometric import PhotometricLoss
from uda.models import build_model
from uda.models.discriminator import PatchDiscriminator
from uda.models.posenet import PoseNet, relative_pose
from uda.visualize import save_prediction_images


class TrainingError(RuntimeError):
    """The run cannot go on (the message says why and where its last checkpoint is)."""


def task_channels(tasks: tuple[str, ...], label_set: str) -> dict[str, int]:
    """Output channels per task: class count, 1 (depth), 3 (normals), 1 (edges)."""
    sizes = {"depth": 1, "normals": 3, "edges": 1}
    return {t: get_label_set(label_set).num_classes if t == "semseg" else sizes[t] for t in tasks}


def unwrap_outputs(outputs: Mapping[str, Mapping[int, torch.Tensor]], start: int, stop: int) -> dict:
    """Slice every output tensor along the batch (to split a joint forward into domains)."""
    return {t: {s: o[start:stop] for s, o in per.items()} for t, per in outputs.items()}


def check_output_dir(out: Path) -> None:
    """Fail before training when the run folder cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(
            f"{out}: run folder is not writable ({exc.strerror}); pass --out to a writable folder"
        ) from None


def check_photometric(cfg: ExperimentConfig) -> None:
    """Self-supervised depth needs a depth task with a sigmoid-disparity head and a video stream."""
    ph = cfg.photometric
    if ph is None:
        return
    if "depth" not in cfg.tasks:
        raise TrainingError("photometric depth needs the depth task; add it to tasks (e.g. --tasks SD)")
    if cfg.model.depth_output != "disparity":
        raise TrainingError("photometric depth needs model.depth_output=disparity (a sigmoid disparity head)")
    if ph.domain == "target" and cfg.target is None:
        raise TrainingError("photometric.domain=target needs a target dataset (an adaptation recipe)")
    if not set(ph.scales) <= set(cfg.model.output_scales or ()) | {0}:
        raise TrainingError(
            f"photometric.scales={ph.scales} needs those depth outputs: set model.output_scales={ph.scales}"
        )
    if ph.pose_init_forward < 0:
        raise TrainingError(
            f"photometric.pose_init_forward={ph.pose_init_forward}: must be >= 0 (0 = near-identity start)"
        )


def initialise_from(path: str | Path, model: nn.Module, posenet: nn.Module | None = None) -> None:
    """Initialise from another run's weights (e.g. a depth-only self-supervised run, paper §4.4).

    Tensors with the same name and shape are copied; task decoders the source run did not have start from
    its depth decoder (both decoders of the paper's 3-ways model start from the depth model); the pose
    network is taken from the checkpoint file whose tensors match it. Output heads are never copied across
    tasks (different channels).
    """
    from safetensors.torch import load_file

    from uda.evaluate import find_checkpoint

    ckpt = find_checkpoint(path)
    files = sorted(ckpt.glob("model*.safetensors"))
    if not files:
        raise TrainingError(
            f"{ckpt}: no model*.safetensors to initialise from; pass a run or checkpoint folder"
        )
    tensors = [load_file(str(f)) for f in files]
    own = model.state_dict()
    source = tensors[0]
    copied = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    for key in own:
        if key in copied or not key.startswith("decoders.") or ".heads." in key:
            continue
        depth_key = "decoders.depth." + key.split(".", 2)[2]
        if depth_key in source and source[depth_key].shape == own[key].shape:
            copied[key] = source[depth_key]
    model.load_state_dict(copied, strict=False)
    message = f"initialised {len(copied)}/{len(own)} model tensors from {ckpt}"
    if posenet is not None:
        pose_keys = set(posenet.state_dict())
        match = [t for t in tensors[1:] if set(t) == pose_keys]
        if match:
            posenet.load_state_dict(match[0])
            message += " (and the pose network)"
    print(message, flush=True)


class Trainer:
    """Builds data, model, objective, discriminators and optimisers from an ExperimentConfig and trains."""

    def __init__(self, cfg: ExperimentConfig, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        check_output_dir(self.out)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=cfg.train.mixed_precision,
            log_with="tensorboard",
            project_dir=str(self.out),
        )
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
        self.val_data = cfg.target if cfg.target is not None else cfg.data
        # The target stream is trained on only when adapting; otherwise the target is for validation alone.
        self.adapt = cfg.adapt if cfg.target is not None else None
        self.photometric = cfg.photometric
        check_photometric(cfg)
        if self.adapt is not None and self.adapt.bn_mode == "joint" and cfg.target.size != cfg.data.size:
            raise TrainingError(
                f"adapt.bn_mode=joint needs equal image sizes, got data.size={cfg.data.size} and "
                f"target.size={cfg.target.size}; set adapt.bn_mode=separate or equal sizes"
            )

        model = build_model(cfg.model, task_channels(self.tasks, cfg.data.label_set))
        if cfg.model.sync_bn and acc.num_processes > 1:
            if acc.device.type == "cpu":
                raise TrainingError(
                    "model.sync_bn=true needs GPUs: torch's SyncBatchNorm does not run on CPU processes; "
                    "set model.sync_bn=false"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        posenet = None
        if self.photometric is not None:
            ph = self.photometric
            posenet = PoseNet(
                ph.pose_backbone, cfg.model.pretrained, cfg.model.weights_path, ph.pose_init_forward
            )
            self.photometric_loss = PhotometricLoss(
                ph.scales, ph.smoothness_weight, ph.min_depth, ph.max_depth, ph.automask
            )
        if cfg.train.init_from:
            initialise_from(cfg.train.init_from, model, posenet)
        groups = model.param_groups()
        self.base_lrs = [cfg.optim.lr_backbone, cfg.optim.lr_decoder]
        param_groups = [
            {"params": groups["backbone"], "lr": cfg.optim.lr_backbone},
            {"params": groups["decoder"], "lr": cfg.optim.lr_decoder},
        ]
        if posenet is not None:
            self.base_lrs.append(self.photometric.lr_pose)
            param_groups.append({"params": list(posenet.parameters()), "lr": self.photometric.lr_pose})
        if cfg.optim.optimizer == "adam":
            optimizer = torch.optim.Adam(
                param_groups, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                param_groups, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
            )
        weights = cfg.loss.weights or default_task_weights(self.tasks)
        self.criterion = MultiTaskLoss(
            self.tasks, weights, d_far=cfg.loss.d_far, intermediate_scales=self.intermediate_scales
        )
        self.model, self.optimizer = acc.prepare(model, optimizer)

        self.discriminators: nn.ModuleDict | None = None
        self.disc_optimizer = None
        if self.adapt is not None:
            scales = self.adapt.scales if self.adapt.scales is not None else (*self.intermediate_scales, 0)
            in_ch = task_channels(self.tasks, cfg.data.label_set)
            discs = nn.ModuleDict(
                {
                    f"{t}_s{s}": PatchDiscriminator(
                        in_ch[t], self.adapt.disc_channels, self.adapt.spectral_norm
                    )
                    for t in self.adapt.tasks
                    if t in self.tasks
                    for s in scales
                }
            )
            disc_opt = torch.optim.Adam(
                discs.parameters(), lr=self.adapt.disc_lr, betas=self.adapt.disc_betas
            )
            self.discriminators, self.disc_optimizer = acc.prepare(discs, disc_opt)
            self.aligned = [(t, s) for t in self.adapt.tasks if t in self.tasks for s in scales]
        # Prepared last, so the checkpoint files of the model (and discriminators) keep their names.
        self.posenet = acc.prepare(posenet) if posenet is not None else None
        self.step = 0
        self.bad_steps = 0
        self.history: list[dict[str, Any]] = []  # validation results
        self.loss_log: list[dict[str, float]] = []  # training losses of this process, per step

    # ------------------------------------------------------------------ construction helpers

    @property
    def intermediate_scales(self) -> tuple[int, ...]:
        if self.cfg.model.arch == "padnet":
            return (4,)
        return tuple(self.cfg.model.exchange_scales)

    def video_domain(self, domain: int) -> bool:
        """Whether this domain's training stream feeds the photometric objective (and so loads frames)."""
        return self.photometric is not None and self.photometric.domain == ("source", "target")[domain]

    def label_tasks(self, domain: int) -> tuple[str, ...]:
        """The labels a training stream loads: none on the target; no depth where depth is self-supervised."""
        if domain == 1:
            return ()
        return tuple(t for t in self.tasks if not (t == "depth" and self.video_domain(domain)))

    def dataset(
        self,
        data: DataConfig,
        split: str,
        tasks: tuple[str, ...],
        train: bool,
        domain: int,
        labels_native: bool | None = None,
    ):
        """A reader for one split with the train or evaluation transform of `data` (evaluation: labels at the
        working size, or at their native resolution when labels_native / eval.label_resolution)."""
        if train:
            transform = TrainTransform(data.size, data.scale_range, data.hflip, data.color_jitter)
        else:
            native = self.cfg.eval.label_resolution if labels_native is None else labels_native
            transform = EvalTransform(data.size, keep_label_resolution=native)
        return build_dataset(
            data.dataset,
            split,
            tasks,
            label_set=data.label_set,
            root=data.root,
            transform=transform,
            frames=self.photometric.frames if train and self.video_domain(domain) else (),
            domain=domain,
            variation=data.variation,
        )

    def batches(self, start_step: int) -> MixedBatches:
        """The endless mixed stream, positioned at start_step."""
        acc, cfg = self.accelerator, self.cfg
        source = train_loader(
            self.dataset(cfg.data, cfg.data.train_split, self.label_tasks(0), train=True, domain=0),
            cfg.data.batch_size,
            cfg.train.seed,
            acc.process_index,
            acc.num_processes,
            start_step,
            cfg.data.num_workers,
        )
        target = None
        if self.adapt is not None or self.video_domain(1):
            target = train_loader(
                self.dataset(cfg.target, cfg.target.train_split, self.label_tasks(1), train=True, domain=1),
                cfg.target.batch_size,
                cfg.train.seed + 1,
                acc.process_index,
                acc.num_processes,
                start_step,
                cfg.target.num_workers,
            )
        return MixedBatches(source, target)

    # ------------------------------------------------------------------ one step

    def set_learning_rates(self, step: int) -> None:
        """Step schedule: lr x gamma from lr_step_fraction of the run; discriminators: poly decay."""
        o = self.cfg.optim
        factor = o.lr_gamma if step >= o.lr_step_fraction * self.cfg.train.iterations else 1.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        if self.disc_optimizer is not None:
            poly = max(0.0, 1 - step / max(1, self.cfg.train.iterations)) ** self.adapt.disc_poly_power
            for group in self.disc_optimizer.param_groups:
                group["lr"] = self.adapt.disc_lr * poly

    def forward_domains(self, batch: Mapping[str, Any]) -> tuple[dict, dict | None]:
        """Model outputs for the source and (if any) target sub-batches, by the configured BatchNorm mode."""
        source = batch["source"]["image"]
        if "target" not in batch:
            return self.model(source), None
        target = batch["target"]["image"]
        if self.adapt is not None and self.adapt.bn_mode == "joint":
            outputs = self.model(torch.cat([source, target]))
            n = source.shape[0]
            return unwrap_outputs(outputs, 0, n), unwrap_outputs(outputs, n, n + target.shape[0])
        return self.model(source), self.model(target)

    def supervised_view(self, outputs: Mapping[str, Mapping[int, torch.Tensor]]) -> Mapping:
        """Outputs as the supervised losses expect them: a sigmoid-disparity depth head becomes d_far/depth."""
        if self.cfg.model.depth_output != "disparity" or "depth" not in outputs:
            return outputs
        ph = self.photometric
        near, far = (ph.min_depth, ph.max_depth) if ph is not None else (0.1, 100.0)
        depth = {
            s: self.cfg.loss.d_far / disparity_to_depth(o, near, far) for s, o in outputs["depth"].items()
        }
        return {**outputs, "depth": depth}

    def photometric_objective(self, video: Mapping[str, Any], outputs: Mapping) -> tuple[torch.Tensor, dict]:
        """Self-supervised depth: warp the neighbouring frames with predicted depth and pose (Monodepth2)."""
        target = video["image"]
        poses = {
            o: relative_pose(self.posenet, target, video["frames"][o], o) for o in self.photometric.frames
        }
        disparities = {s: outputs["depth"][s] for s in self.photometric.scales}
        loss, logs = self.photometric_loss(disparities, target, video["frames"], poses, video["K"])
        return loss, {k: torch.as_tensor(v) for k, v in logs.items()}

    def discriminator_input(self, task: str, output: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """What a discriminator sees: the entropy map (semseg) or fixed-range normalised depth, at image size."""
        output = F.interpolate(output.float(), size=size, mode="bilinear", align_corners=False)
        if task == "semseg":
            return entropy_map(output)
        if task == "depth":
            if self.cfg.model.depth_output == "disparity":
                return output.clamp(0, 1)
            near, far = self.adapt.depth_range
            d_far = self.cfg.loss.d_far
            return normalise_depth_for_discriminator(output, d_far / far, d_far / near)
        if task == "normals":
            return F.normalize(output, dim=1)
        raise ValueError(f"no discriminator input defined for task {task!r}")

    def adversarial_loss(
        self, outputs: Mapping, size: tuple[int, int], is_source: bool, detach: bool
    ) -> torch.Tensor:
        """Mean BCE of the (task, scale) discriminators on outputs, against the source (1) or target (0) label."""
        losses = []
        for task, scale in self.aligned:
            x = self.discriminator_input(task, outputs[task][scale], size)
            losses.append(
                bce_with_domain(
                    self.discriminators[f"{task}_s{scale}"](x.detach() if detach else x), is_source
                )
            )
        return torch.stack(losses).mean()

    def trained_parameters(self) -> list[nn.Parameter]:
        """Parameters of the model update (multi-task model and, for self-supervised depth, the pose net)."""
        params = list(self.model.parameters())
        return params + list(self.posenet.parameters()) if self.posenet is not None else params

    def adapting(self) -> bool:
        """Whether the adversarial terms are on at the current step."""
        return self.adapt is not None and self.step >= self.adapt.start_step and self.adapt.lambda_adv > 0

    def model_update(
        self, batch: Mapping[str, Any]
    ) -> tuple[dict, dict | None, dict[str, torch.Tensor], bool]:
        """Update the multi-task model on the task loss (+ adversarial loss on target outputs, discriminators frozen).

        Returns the outputs of both domains, the detached logs and whether the step was finite (applied).
        """
        acc = self.accelerator
        if self.discriminators is not None:
            self.discriminators.requires_grad_(False)
        buffers = self.buffer_snapshot()
        with acc.autocast():
            out_src, out_tgt = self.forward_domains(batch)
            loss, logs = self.criterion(self.supervised_view(out_src), batch["source"])
            if self.photometric is not None:
                domain = self.photometric.domain
                video = batch[domain]
                photometric, photo_logs = self.photometric_objective(
                    video, out_src if domain == "source" else out_tgt
                )
                loss = loss + self.photometric.weight * photometric
                logs.update(photo_logs)
            if self.adapting():
                size = tuple(batch["target"]["image"].shape[-2:])
                adv = self.adversarial_loss(out_tgt, size, is_source=True, detach=False)
                loss = loss + self.adapt.lambda_adv * adv
                logs["loss/adv"] = adv.detach()
        acc.backward(loss)
        grad_norm = torch.as_tensor(
            acc.clip_grad_norm_(self.trained_parameters(), self.cfg.optim.clip_grad_norm)
        )
        loss_ok = bool(torch.isfinite(loss.detach()).item())
        grads_ok = bool(torch.isfinite(grad_norm).item())
        # With fp16 the GradScaler skips an overflowing step itself and lowers its scale, so it must see it.
        finite = checkpoint.all_processes(acc, loss_ok and (grads_ok or acc.scaler is not None))
        if finite:
            self.optimizer.step()
        else:
            # A skipped step leaves the model as it was: the forward already moved the BatchNorm statistics.
            self.restore_buffers(buffers)
        self.optimizer.zero_grad(set_to_none=True)
        logs["loss/total"] = loss.detach()
        logs["grad_norm"] = grad_norm.detach()
        return out_src, out_tgt, logs, finite

    def discriminator_update(
        self, batch: Mapping[str, Any], out_src: Mapping, out_tgt: Mapping
    ) -> torch.Tensor:
        """Update the discriminators on detached outputs: source -> 1, target -> 0 (paper Eq. 7)."""
        acc = self.accelerator
        self.discriminators.requires_grad_(True)
        with acc.autocast():
            size_s = tuple(batch["source"]["image"].shape[-2:])
            size_t = tuple(batch["target"]["image"].shape[-2:])
            d_loss = 0.5 * (
                self.adversarial_loss(out_src, size_s, is_source=True, detach=True)
                + self.adversarial_loss(out_tgt, size_t, is_source=False, detach=True)
            )
        acc.backward(d_loss)
        grads = [p.grad for p in self.discriminators.parameters() if p.grad is not None]
        finite = bool(torch.isfinite(d_loss.detach()).item()) and all(bool(g.isfinite().all()) for g in grads)
        if checkpoint.all_processes(acc, finite):
            self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return d_loss.detach()

    def buffer_snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, copy) for every buffer of the trained networks (BatchNorm statistics, spectral-norm vectors)."""
        modules = [self.model, self.discriminators, getattr(self, "posenet", None)]
        return [(b, b.detach().clone()) for m in modules if m is not None for b in m.buffers()]

    @staticmethod
    @torch.no_grad()
    def restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put back the buffers saved by buffer_snapshot."""
        for live, saved in snapshot:
            live.copy_(saved)

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, float]:
        """One optimisation step: model update, then (when adapting) discriminator update."""
        self.set_learning_rates(self.step)
        out_src, out_tgt, logs, finite = self.model_update(batch)
        if self.adapting() and finite:
            logs["loss/disc"] = self.discriminator_update(batch, out_src, out_tgt)
        values = {k: float(v) for k, v in logs.items()}
        values["finite"] = float(finite)
        return values

    # ------------------------------------------------------------------ checkpoints (uda/checkpoint.py)

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, newest first (a temporary folder from an interrupted save is ignored)."""
        return checkpoint.complete_checkpoints(self.out)

    def save_checkpoint(self, keep: int = 2) -> Path:
        """Save everything needed to resume, atomically (temporary folder, then rename), with file hashes."""
        state = {
            "bad_steps": self.bad_steps,
            "config": to_dict(self.cfg),
            "history": self.history,
        }
        return checkpoint.save(self.accelerator, self.out, self.step, state, keep)

    def load_checkpoint(self, path: Path | None = None) -> Path | None:
        """Resume from `path` or the newest usable checkpoint; a damaged one is reported and skipped, one of
        another model config is refused (TrainingError naming the keys)."""
        try:
            found = checkpoint.load(self.accelerator, self.out, to_dict(self.cfg), path)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        if found is None:
            return None
        ckpt, state = found
        self.step = int(state["step"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self.history = list(state.get("history", []))
        return ckpt

    # ------------------------------------------------------------------ validation

    def validation_sets(self) -> list[tuple[str, DataConfig, int]]:
        """(name, data, domain) of each evaluated split: the target's (or the data's) and, in UDA, the source's."""
        cfg = self.cfg
        sets = [
            ("target" if cfg.target is not None else "val", self.val_data, 1 if cfg.target is not None else 0)
        ]
        if cfg.target is not None and cfg.target.dataset != cfg.data.dataset:
            sets.append(("source", cfg.data, 0))
        return sets

    def validate(self, final: bool = False) -> dict[str, Any]:
        """Evaluate on the validation split (the target's in UDA) and write metrics, report and images."""
        acc, cfg = self.accelerator, self.cfg
        results, protocols, images = {}, {}, []
        model = acc.unwrap_model(self.model)
        if acc.num_processes > 1:
            # After a training step each process holds its own BatchNorm statistics (DDP broadcasts rank 0's
            # only at the start of the next forward); evaluate everywhere with rank 0's, the saved ones.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        runs = []
        for name, data, domain in self.validation_sets():
            runs.append(
                (
                    name,
                    data,
                    domain,
                    replace(cfg.eval, median_scaling=False) if name == "source" else cfg.eval,
                )
            )
            if final and name != "source" and not cfg.eval.label_resolution:
                # The final evaluation also compares at the label files' resolution (e.g. 2048x1024 Cityscapes).
                runs.append((f"{name}@labels", data, domain, replace(cfg.eval, label_resolution=True)))
        for name, data, domain, eval_cfg in runs:
            dataset = self.dataset(
                data,
                data.val_split,
                self.tasks,
                train=False,
                domain=domain,
                labels_native=eval_cfg.label_resolution,
            )
            loader = eval_loader(
                dataset, data.batch_size, acc.process_index, acc.num_processes, data.num_workers
            )
            prefix = f"step{self.step:07d}_{name}"

            def write_images(batch, preds, prefix=prefix):
                if acc.is_main_process:
                    paths = save_prediction_images(
                        self.out / "images", prefix, batch, preds, self.tasks, self.label_set
                    )
                    images.extend(str(p.relative_to(self.out)) for p in paths)

            max_batches = cfg.train.val_batches if (not final or name == "source") else None
            if name == "source" and max_batches is None:
                max_batches = 4
            results[name] = evaluate(
                model,
                loader,
                self.tasks,
                self.label_set.num_classes,
                eval_cfg,
                cfg.model,
                cfg.loss.d_far,
                reduce=lambda s: acc.reduce(s, "sum"),
                device=acc.device,
                max_batches=max_batches,
                on_first_batch=write_images,
            )
            protocols[name] = protocol(
                eval_cfg, data.dataset, data.val_split, data.label_set, f"step {self.step} (last)"
            )
            if max_batches is not None:
                protocols[name]["batches"] = f"first {max_batches} per process"
        record = {"step": self.step, **{f"{n}/{k}": v for n, r in results.items() for k, v in r.items()}}
        self.history.append(record)
        if acc.is_main_process:
            acc.log({f"val/{k}": v for k, v in record.items() if k != "step"}, step=self.step)
            write_report(
                self.out,
                f"{cfg.name}: evaluation at step {self.step}",
                results,
                protocols,
                class_names=self.label_set.class_names,
                extra={"step": self.step, "iterations": cfg.train.iterations, "history": self.history}
                if final
                else {"step": self.step, "history": self.history},
                images=images,
            )
        return results

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to cfg.train.iterations (resuming if asked), validating and checkpointing on schedule."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            save_config(cfg, self.out / "config.json")
            print(json.dumps(to_dict(cfg), indent=2))
        if not resume and self.checkpoint_dirs():
            # A fresh run here would interleave its checkpoints with the old run's (and rotate its own away).
            raise TrainingError(
                f"{self.out}: holds checkpoints of an earlier run (newest {self.checkpoint_dirs()[0].name}); "
                "pass --resume to continue it, or choose another --out"
            )
        acc.init_trackers("logs", config={k: str(v) for k, v in to_dict(cfg).items()})
        if resume:
            ckpt = self.load_checkpoint()
            if ckpt is not None and acc.is_main_process:
                tqdm.write(f"resumed from {ckpt} at step {self.step}")
        batches = self.batches(self.step)
        for _, data, domain in self.validation_sets():
            # Fail now, not after days of training, if a validation split is missing or empty.
            self.dataset(data, data.val_split, self.tasks, train=False, domain=domain)
        self.model.train()
        bar = tqdm(
            total=cfg.train.iterations, initial=self.step, disable=not acc.is_main_process, desc=cfg.name
        )
        last: dict[str, float] = {}
        started = time.perf_counter()
        start_step = self.step
        while self.step < cfg.train.iterations:
            batch = move_to(next(batches), acc.device)
            last = self.train_step(batch)
            self.step += 1
            self.loss_log.append({"step": self.step, **last})
            if last["finite"]:
                self.bad_steps = 0
            else:
                self.bad_steps += 1
                bad = ", ".join(k for k, v in last.items() if not torch.isfinite(torch.tensor(v))) or "loss"
                if acc.is_main_process:
                    tqdm.write(
                        f"warning: step {self.step}: non-finite {bad}; update skipped, weights unchanged "
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
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.iterations:
                rate = (self.step - start_step) / max(1e-9, time.perf_counter() - started)
                bar.set_postfix(
                    {k.replace("loss/", ""): f"{v:.3g}" for k, v in last.items() if k.startswith("loss/")}
                )
                acc.log(
                    {**{f"train/{k}": v for k, v in last.items()}, "train/it_per_s": rate}, step=self.step
                )
            # Validation first, so that the checkpoint of this step holds its result in the history.
            if (
                cfg.train.val_every
                and self.step % cfg.train.val_every == 0
                and self.step < cfg.train.iterations
            ):
                self.validate()
            if (
                cfg.train.ckpt_every
                and self.step % cfg.train.ckpt_every == 0
                and self.step < cfg.train.iterations
            ):
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        results = self.validate(final=True)
        # Every process finishes its work before the process group goes (end_training destroys it).
        acc.wait_for_everyone()
        acc.end_training()
        return {
            "results": results,
            "last_losses": last,
            "step": self.step,
            "seconds": time.perf_counter() - started,
        }
