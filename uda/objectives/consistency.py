"""Cross-task consistency (XTasC, Nakano, Chen, Demachi 2021): task-transfer networks (TTNets) map each task's
prediction to the other task, and that transferred prediction is compared with the other task's own prediction
(consistency, Eqs. 13/15) or with its labels (alignment, the paper's "Align-Net").

Per task t (s the other task), Eq. 11 reads L_t = (1 - l_t) loss_t + l_t c_t, with c_t the distance between
TTNet_{s->t}(prediction_s) and prediction_t (detached: no gradient reaches the branch of t through its own
target; it reaches the TTNet and the branch of s). We add l_t / (1 - l_t) c_t to task t's terms, which is
Eq. 11 times 1 / (1 - l_t): the task weighting (uncertainty in the paper) absorbs that constant factor of a
task's loss exactly at its optimum, and with fixed weights it raises the task's weight by 1 % at l = 0.01.
Terms belong to their task, so the run's task weighting weighs them with the task (Eq. 16).

What a TTNet consumes and how its output is compared is defined with each task (`TaskDef.transfer_input`,
`consistency_loss`, `alignment_loss` in uda.tasks): segmentation as class probabilities (soft cross-entropy,
as Eq. 13 writes it; the authors' code uses the argmax), depth as inverse depth normalised to [0, 1] by the
fixed adapt-style depth range (L1, Eq. 15). Consistency needs no labels, so it also runs on the unlabelled
target domain of an adaptation run (`consistency.domains=source,target`).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from uda.config import ConsistencyConfig
from uda.models.xtasc import TransferNet
from uda.objectives.base import DOMAINS, Objective, ObjectiveError, RunContext, Step, StreamNeeds, Terms
from uda.tasks import TASK_DEFS


class TransferNetworks(nn.Module):
    """The task-transfer networks of every direction, called once per domain (one DDP forward)."""

    def __init__(self, directions: list[tuple[str, str]], channels: dict[str, int], widths: tuple[int, ...]):
        super().__init__()
        self.nets = nn.ModuleDict(
            {f"{s}_to_{t}": TransferNet(channels[s], channels[t], widths) for s, t in directions}
        )

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"<source>_to_<target>": transfer input} -> {same key: raw prediction of the target task}."""
        return {key: self.nets[key](x) for key, x in inputs.items()}


class Consistency(Objective):
    """Task-transfer networks in both directions between consistency.tasks, trained with the model."""

    section = "consistency"

    def __init__(self, run: RunContext, cfg: ConsistencyConfig) -> None:
        super().__init__(run, cfg)
        a, b = cfg.tasks
        missing = [t for t in cfg.tasks if t not in run.tasks]
        if a == b or missing:
            raise ObjectiveError(
                f"consistency.tasks={cfg.tasks} must name two different tasks of this run {run.tasks}"
            )
        bad = {t: v for t, v in cfg.lambdas.items() if t not in cfg.tasks or not 0 <= v < 1}
        if bad or set(cfg.lambdas) != set(cfg.tasks):
            raise ObjectiveError(
                f"consistency.lambdas={cfg.lambdas}: one value in [0, 1) per task of consistency.tasks {cfg.tasks}"
            )
        if not cfg.domains or len(set(cfg.domains)) != len(cfg.domains):
            raise ObjectiveError(f"consistency.domains={cfg.domains}: name source and/or target once each")
        if "target" in cfg.domains and not run.has_target:
            raise ObjectiveError("consistency.domains=target needs a target dataset (an adaptation recipe)")
        if cfg.mode == "alignment" and "target" in cfg.domains:
            raise ObjectiveError(
                "consistency.mode=alignment compares with labels, which the target has none of; "
                "set consistency.domains=source or consistency.mode=consistency"
            )
        # Each direction feeds the task it predicts: s -> t gives task t's term.
        self.directions = [(a, b), (b, a)]
        self.transfer = TransferNetworks(self.directions, run.channels, cfg.channels)

    def needs(self, domain: int) -> StreamNeeds | None:
        return StreamNeeds() if DOMAINS[domain] in self.cfg.domains else None

    def weighted_tasks(self, unlabelled: Mapping[int, frozenset[str]]) -> frozenset[str]:
        return frozenset(self.cfg.tasks)

    def joint_networks(self) -> dict[str, nn.Module]:
        return {"transfer": self.transfer}

    def param_groups(self) -> list[dict]:
        lr = self.cfg.lr if self.cfg.lr is not None else self.run.cfg.optim.lr_decoder
        return [{"params": list(self.transfer.parameters()), "lr": lr}]

    def loss(self, step: Step) -> Terms:
        space = self.run.space
        terms: dict[str, list[Tensor]] = {}
        logs: dict[str, Tensor] = {}
        for domain in self.cfg.domains:
            outputs = step.outputs[domain]
            inputs = {
                f"{s}_to_{t}": TASK_DEFS[s].transfer_input(outputs[s][0], space) for s, t in self.directions
            }
            transferred = self.transfer(inputs)
            for s, t in self.directions:
                key = f"{s}_to_{t}"
                if self.cfg.mode == "consistency":
                    value = TASK_DEFS[t].consistency_loss(transferred[key], outputs[t][0], space)
                elif t in step.batch[domain]:
                    value = TASK_DEFS[t].alignment_loss(transferred[key], step.batch[domain][t], space)
                else:
                    raise ObjectiveError(
                        f"consistency.mode=alignment needs {t} labels on the {domain} stream, which another "
                        "objective learns without them; use consistency.mode=consistency"
                    )
                lam = self.cfg.lambdas[t]
                terms.setdefault(t, []).append(lam / (1.0 - lam) * value)
                suffix = "" if domain == "source" else f"/{domain}"
                logs[f"loss/{self.cfg.mode}/{key}{suffix}"] = value.detach()
        return Terms(tasks=terms, logs=logs)
