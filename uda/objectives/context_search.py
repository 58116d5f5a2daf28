"""ATRC's context-type search (Bruggemann et al. 2021, §3.3): the entropy regulariser on the architecture
distributions p_alpha of the CP blocks, and the freezing of the blocks that have chosen.

The model (arch atrc / atrc-fpm with model.atrc_contexts=search) holds alpha and the frozen choices
(uda.models.atrc, ATRCModule in search mode); the loop hands this objective the model (`bind`), so it knows
nothing of the search.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState

from uda.config import ContextSearchConfig
from uda.models.atrc import SEARCH, ATRCModule, search_modules, write_contexts
from uda.objectives.base import Objective, ObjectiveError, RunContext, Step, Terms

CONTEXTS_FILE = "atrc_contexts.json"  # <run>/atrc_contexts.json: the chosen architecture


def entropy_weight(step: int, iterations: int, start: float, end: float) -> float:
    """The regulariser's weight at 0-based `step`: linear from `start` (step 0) to `end` (the last step)."""
    if iterations <= 1:
        return end
    return start + (end - start) * min(1.0, max(0.0, step / (iterations - 1)))


class ContextSearch(Objective):
    """w(step) * mean over the searching blocks of H(p_alpha) added to the model loss (its own weight: the
    term is `total`, outside the task weighting), w = entropy_weight(step, train.iterations, weight_start,
    weight_end); after every applied step, each searching block with H(p_alpha) < threshold is frozen at its
    argmax (a buffer of the model, saved with it in every checkpoint). At every checkpoint the main process
    writes <run>/atrc_contexts.json, {target: {source: context}} (the argmax for blocks still searching), the
    file model.atrc_contexts=<file> of the training recipes reads to retrain the found architecture from
    scratch. Logged: context_search/weight, context_search/entropy (mean over the searching blocks),
    context_search/frozen (blocks fixed so far)."""

    section = "context_search"

    def __init__(self, run: RunContext, cfg: ContextSearchConfig) -> None:
        super().__init__(run, cfg)
        model = run.cfg.model
        if model.arch not in ("atrc", "atrc-fpm") or model.atrc_contexts != SEARCH:
            raise ObjectiveError(
                f"context_search needs model.arch atrc or atrc-fpm with model.atrc_contexts={SEARCH}, not "
                f"{model.arch} with {model.atrc_contexts}; set them or remove the context_search section"
            )
        self.iterations = run.cfg.train.iterations
        self.path = Path(run.cfg.out) / CONTEXTS_FILE
        self.module: ATRCModule | None = None

    def bind(self, model: torch.nn.Module) -> None:
        found = search_modules(model)
        if len(found) != 1:
            raise ObjectiveError(
                f"context_search found {len(found)} ATRC search modules in the model, expected 1; "
                f"set model.atrc_contexts={SEARCH}"
            )
        self.module = found[0]

    def _module(self) -> ATRCModule:
        if self.module is None:
            raise ObjectiveError("context_search used before the loop bound it to the model (Objective.bind)")
        return self.module

    def weight(self, step: int) -> float:
        """w(step) of the entropy term."""
        return entropy_weight(step, self.iterations, self.cfg.weight_start, self.cfg.weight_end)

    def loss(self, step: Step) -> Terms | None:
        module = self._module()
        searching = module.frozen < 0
        frozen = (~searching).sum().float()
        if not bool(searching.any()):
            return Terms(logs={"context_search/frozen": frozen})
        entropy = module.block_entropy()[searching].mean()
        w = self.weight(step.index)
        logs = {
            "context_search/weight": torch.tensor(w),
            "context_search/entropy": entropy.detach(),
            "context_search/frozen": frozen,
        }
        return Terms(total=w * entropy, logs=logs)

    def update(self, step: Step) -> dict[str, torch.Tensor]:
        module = self._module()
        module.freeze(self.cfg.threshold)
        return {"context_search/frozen": (module.frozen >= 0).sum().float()}

    def checkpoint_state(self) -> dict:
        """The chosen contexts (also written to <run>/atrc_contexts.json by the main process); the frozen
        choices themselves are a buffer of the model."""
        if self.module is None:
            return {}
        contexts = self.module.chosen_contexts()
        if PartialState().is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_contexts(contexts, self.path)
        return {"contexts": contexts}


__all__ = ["CONTEXTS_FILE", "ContextSearch", "entropy_weight"]
