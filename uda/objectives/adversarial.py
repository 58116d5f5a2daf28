"""Output-level adversarial alignment (DenseMTL §4.5, Eqs. 7-9; ADVENT-style): one patch discriminator per
(task, scale) tells source from target outputs, and the model learns to make target outputs look like source.

What a discriminator sees of a task's output is that task's `domain_map` (segmentation: the entropy map;
depth: inverse depth normalised by a fixed source range), at the image size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uda import checkpoint
from uda.config import AdaptConfig
from uda.losses.adversarial import bce_with_domain
from uda.models.discriminator import PatchDiscriminator
from uda.objectives.base import Objective, ObjectiveError, RunContext, Step, StreamNeeds, Terms
from uda.tasks import TASK_DEFS


class Discriminators(nn.ModuleDict):
    """The patch discriminators by "<task>_s<scale>", all called in one forward: under DistributedDataParallel
    (several processes) one DDP forward per update runs every discriminator and their gradients are averaged
    over the processes (a DDP-wrapped ModuleDict cannot be indexed)."""

    def forward(self, inputs: list[tuple[str, Tensor]]) -> list[Tensor]:
        """[(key, input map [B,C,H,W]), ...] -> the patch logits of discriminator `key` for each, in order."""
        return [self[key](x) for key, x in inputs]


class Adversarial(Objective):
    """Discriminators on the outputs of (adapt.tasks x adapt.scales); their own Adam, updated after the model.

    Model update (Eq. 8/9): lambda_adv x BCE of the frozen discriminators on target outputs against the source
    label, reduced over tasks and scales as Eq. 9 (`generator_loss`). Discriminator update (Eq. 7): BCE on
    detached outputs, source -> 1, target -> 0.
    """

    section = "adapt"

    def __init__(self, run: RunContext, cfg: AdaptConfig) -> None:
        super().__init__(run, cfg)
        scales = cfg.scales if cfg.scales is not None else (*run.intermediate_scales, 0)
        if missing := [s for s in scales if s not in (*run.intermediate_scales, 0)]:
            # Refused here, not by a KeyError on the missing output at the first step.
            raise ObjectiveError(
                f"adapt.scales={list(scales)}: model.arch={run.cfg.model.arch} has no output at scale "
                f"{', '.join(map(str, missing))}; choose among {sorted({0, *run.intermediate_scales})}"
            )
        # Auxiliary tasks (model.aux_tasks, MTI-Net's front-end-only tasks) have no final output to align.
        aligned_tasks = [t for t in run.tasks if t not in run.cfg.model.aux_tasks]
        self.aligned = [(t, s) for t in cfg.tasks if t in aligned_tasks for s in scales]
        if not self.aligned:
            raise ObjectiveError(
                f"adapt.tasks={list(cfg.tasks)} names no task of this run with a final output "
                f"{aligned_tasks}: nothing to align; name at least one of them"
            )
        if not 0 < cfg.depth_range[0] < cfg.depth_range[1]:
            raise ObjectiveError(
                f"adapt.depth_range={list(cfg.depth_range)}: must be 0 < near < far (metres)"
            )
        self.space = replace(run.space, depth_range=cfg.depth_range)
        self.discriminators = Discriminators(
            {
                f"{t}_s{s}": PatchDiscriminator(run.channels[t], cfg.disc_channels, cfg.spectral_norm)
                for t, s in self.aligned
            }
        )
        self.discriminators_optimizer = torch.optim.Adam(
            self.discriminators.parameters(), lr=cfg.disc_lr, betas=cfg.disc_betas
        )

    def needs(self, domain: int) -> StreamNeeds | None:
        return StreamNeeds() if domain == 1 else None

    def own_networks(self) -> dict:
        return {"discriminators": (self.discriminators, self.discriminators_optimizer)}

    def active(self, step: int) -> bool:
        """Whether the adversarial terms are on at `step`."""
        return step >= self.cfg.start_step and self.cfg.lambda_adv > 0

    def set_step(self, step: int) -> None:
        """Discriminators: poly decay of their learning rate over the run."""
        iterations = self.run.cfg.train.iterations
        poly = max(0.0, 1 - step / max(1, iterations)) ** self.cfg.disc_poly_power
        for group in self.discriminators_optimizer.param_groups:
            group["lr"] = self.cfg.disc_lr * poly

    def discriminator_input(self, task: str, output: Tensor, size: tuple[int, int]) -> Tensor:
        """What a discriminator sees: the task's domain map of the output, at image size."""
        output = F.interpolate(output.float(), size=size, mode="bilinear", align_corners=False)
        return TASK_DEFS[task].domain_map(output, self.space)

    def flipped(self, x: Tensor) -> Tensor:
        """A discriminator's input; with adapt.flip_inputs its batch is mirrored with probability 1/2 (one draw
        per discriminator and pass, as the authors' RandomHorizontalFlip on the batch tensor)."""
        if self.cfg.flip_inputs and bool(torch.rand(()) < 0.5):
            return x.flip(-1)
        return x

    def inputs(self, outputs: Mapping, size: tuple[int, int], detach: bool) -> list[tuple[str, Tensor]]:
        """(key, input) of every aligned (task, scale) discriminator for one domain's outputs."""
        pairs = []
        for task, scale in self.aligned:
            x = self.discriminator_input(task, outputs[task][scale], size)
            pairs.append((f"{task}_s{scale}", self.flipped(x.detach() if detach else x)))
        return pairs

    @staticmethod
    def domain_loss(logits: list[Tensor], is_source: bool) -> Tensor:
        """Mean BCE of the discriminators' logits against the source (1) or target (0) label."""
        return torch.stack([bce_with_domain(x, is_source) for x in logits]).mean()

    def generator_loss(
        self, outputs: Mapping, size: tuple[int, int], nets: nn.Module | None = None
    ) -> Tensor:
        """The adversarial part of Eq. 9 without lambda_adv, on one domain's (target) outputs: per task, the BCE of
        its final discriminator against the source label plus the mean of its intermediate ones; summed over the
        tasks, as Eq. 6 (uda.losses.tasks.MultiTaskLoss) sums the supervised terms it is added to. (The released
        code took the mean over every (task, scale) discriminator together with the mean of the final and
        intermediate supervised terms; a mean here against Eq. 6's sums would weigh the adversarial terms 1/4
        of Eq. 9 for S-D with S = {1}, half of what the released code trained with.)"""
        logits = (nets or self.discriminators)(self.inputs(outputs, size, detach=False))
        per_task: dict[str, dict[int, Tensor]] = {}
        for (task, scale), x in zip(self.aligned, logits, strict=True):
            per_task.setdefault(task, {})[scale] = bce_with_domain(x, is_source=True)
        terms = []
        for per_scale in per_task.values():
            if 0 in per_scale:
                terms.append(per_scale[0])
            intermediate = [v for s, v in per_scale.items() if s != 0]
            if intermediate:
                terms.append(torch.stack(intermediate).mean())
        return torch.stack(terms).sum()

    def loss(self, step: Step) -> Terms | None:
        # Frozen for the model update: the adversarial gradient reaches the model only, and in eval mode the
        # spectral norms use their current estimate instead of advancing their power iteration.
        self.discriminators.requires_grad_(False)
        self.discriminators.eval()
        if not self.active(step.index):
            return None
        size = tuple(step.batch["target"]["image"].shape[-2:])
        # The unwrapped discriminators: frozen, they need no gradient synchronisation across processes.
        frozen = step.accelerator.unwrap_model(self.discriminators)
        adv = self.generator_loss(step.outputs["target"], size, nets=frozen)
        return Terms(total=self.cfg.lambda_adv * adv, logs={"loss/adv": adv.detach()})

    def update(self, step: Step) -> dict[str, Tensor]:
        """Update the discriminators on detached outputs: source -> 1, target -> 0 (paper Eq. 7)."""
        if not self.active(step.index):
            return {}
        acc = step.accelerator
        self.discriminators.requires_grad_(True)
        self.discriminators.train()
        with acc.autocast():
            size_s = tuple(step.batch["source"]["image"].shape[-2:])
            size_t = tuple(step.batch["target"]["image"].shape[-2:])
            source = self.inputs(step.outputs["source"], size_s, detach=True)
            target = self.inputs(step.outputs["target"], size_t, detach=True)
            logits = self.discriminators(source + target)  # one (DDP) forward of every discriminator
            n = len(source)
            d_loss = 0.5 * (
                self.domain_loss(logits[:n], is_source=True) + self.domain_loss(logits[n:], is_source=False)
            )
        acc.backward(d_loss)
        grads = [p.grad for p in self.discriminators.parameters() if p.grad is not None]
        loss_ok = bool(torch.isfinite(d_loss.detach()).item())
        grads_ok = all(bool(g.isfinite().all()) for g in grads)
        # fp16: the GradScaler (shared with the model) must see an overflow of the discriminators' scaled
        # gradients, to skip the step itself and lower its scale; skipped here, the scale would keep growing with
        # the model's finite steps and the discriminators would stop learning for good.
        if checkpoint.all_processes(acc, loss_ok and (grads_ok or acc.scaler is not None)):
            self.discriminators_optimizer.step()
        self.discriminators_optimizer.zero_grad(set_to_none=True)
        return {"loss/disc": d_loss.detach()}
