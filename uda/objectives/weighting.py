"""Task weighting: how the per-task loss terms of one step combine into the model loss (`loss.weighting`).

The loop hands a weighting the loss terms of each task; the task loss is L_t = sum(terms[t]) (unitless).
Every method weights the *base-weighted* task losses base[t] * L_t, where `base` holds fixed per-task scales
(the paper's presets, e.g. semseg 50, depth 1); the logged "weight/<t>" is the multiplier applied on top of
base[t] * L_t:

- fixed: multiplier 1, the plain preset-weighted sum (bit-identical to the former objective's accumulation).
- uncertainty (Kendall, Gal & Cipolla 2018): 0.5 exp(-s_t) with learnt log-variances s_t; at equilibrium
  exp(-s_t) = 1 / (base_t L_t), so the base scale is absorbed by the learnt weight.
- dwa (Liu, Johns & Davison 2019, "dynamic weight average"): K softmax(r / T) of the loss descent rates r_t;
  the rates are scale-free, so base is what keeps tasks of very different loss scales comparable.
- gradnorm (Chen et al. 2018): learnt w_t balancing the gradient norms at the last shared layer; like
  uncertainty, the base scale is absorbed by w_t at equilibrium.

Calling protocol, once per optimisation step (all processes alike):

    ctx = WeightingContext(step, shared, reduce_mean, loss_scale)
    total, logs = weighting(terms, ctx)          # inside autocast is fine; total is float32
    backward(total); model optimiser step         # GradNorm already measured its gradient norms in forward
    if the step was finite: logs |= weighting.update(ctx)

forward() and update() of one step take the same ctx.step; update() uses what that step's forward recorded
(the last forward of that step). In training, uncertainty, dwa and gradnorm call ctx.reduce_mean (a
collective) once per forward or update, so every process must call them together; in return all processes
hold identical weights without any other synchronisation. Half-precision (autocast) terms are combined in
float32; float32 and float64 terms are used as they are.

Weightings with state (uncertainty, dwa, gradnorm) must be moved to the model's device (`.to(device)`, never
to a half dtype) and saved with `checkpoint_state()` (JSON-serialisable; exact round trip through
`load_checkpoint_state`). Uncertainty's log-variances are trained by the model optimiser (`param_groups`);
GradNorm's weights by its own optimiser in update(), so they must stay out of the model optimiser.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import torch
from torch import Tensor, nn

from uda.config import LossConfig, Task
from uda.hardware import autocast_off
from uda.losses import default_task_weights
from uda.objectives.base import ObjectiveError


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class WeightingContext:
    """What a weighting may use besides the losses."""

    step: int  # 0-based index of the current optimisation step
    # task -> parameters of the last shared layer (GradNorm measures each task's gradient norm there; for a
    # model with one network per task it is that task's own layer)
    shared: Callable[[str], list[nn.Parameter]] | None = None
    reduce_mean: Callable[[Tensor], Tensor] = _identity  # mean of a tensor over processes (identity with one)
    loss_scale: float = 1.0  # the fp16 GradScaler's current scale (1.0 otherwise)


def _wide(t: Tensor) -> Tensor:
    """`t` in float32 if it is a half-precision float (autocast output), else unchanged (float32/64 kept)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _floats(t: Tensor) -> list[float]:
    """Tensor values as plain Python floats (float32 -> float64 is exact, so JSON round trips are too)."""
    return [float(v) for v in t.detach().cpu().reshape(-1).tolist()]


class TaskWeighting(nn.Module):
    """Base class: combines per-task loss terms into the model loss."""

    kind: ClassVar[str] = ""

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float]) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("a task weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate tasks in {tasks}")
        missing = [t for t in tasks if t not in base]
        if missing:
            raise KeyError(f"no base weight for tasks {missing}")
        bad = {t: base[t] for t in tasks if not (math.isfinite(float(base[t])) and float(base[t]) >= 0)}
        if bad:
            raise ValueError(f"base weights must be finite and >= 0: {bad}")
        self.tasks = tasks
        self.base = {t: float(base[t]) for t in tasks}
        self.index = {t: i for i, t in enumerate(tasks)}

    def present(self, terms: Mapping[str, Sequence[Tensor]]) -> list[str]:
        """Tasks of `terms` with at least one loss term, in the order of `self.tasks`."""
        unknown = [t for t in terms if t not in self.index]
        if unknown:
            raise ValueError(f"loss terms for unknown tasks {unknown}; this weighting has {self.tasks}")
        present = [t for t in self.tasks if t in terms and len(terms[t]) > 0]
        if not present:
            raise ValueError(f"no loss term for any of the tasks {self.tasks}")
        return present

    def task_losses(self, terms: Mapping[str, Sequence[Tensor]]) -> dict[str, Tensor]:
        """L_t = sum(terms[t]) (with graph; half-precision terms in float32) for the tasks present, in task
        order."""
        losses = {}
        for t in self.present(terms):
            total = _wide(terms[t][0])
            for term in terms[t][1:]:
                total = total + _wide(term)
            losses[t] = total
        return losses

    def forward(
        self, terms: Mapping[str, Sequence[Tensor]], ctx: WeightingContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total model loss (float32, with graph) and detached logs with at least "weight/<task>", the
        multiplier applied to base[task] * L_task, where L_task = sum(terms[task])."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """Parameter groups the MODEL optimiser should train ([] unless the weighting learns through it)."""
        return []

    def update(self, ctx: WeightingContext) -> dict[str, Tensor]:
        """Bookkeeping after a finite model optimiser step (never after a skipped one); detached logs."""
        return {}

    def checkpoint_state(self) -> dict:
        """Full state as plain JSON-serialisable lists, floats and ints."""
        return {"kind": self.kind, "tasks": list(self.tasks)}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore `checkpoint_state()` exactly (also after a json.dumps/json.loads round trip)."""
        if state.get("kind") != self.kind or list(state.get("tasks", [])) != list(self.tasks):
            raise ValueError(
                f"checkpoint holds a {state.get('kind')!r} weighting of tasks {state.get('tasks')}, "
                f"this run a {self.kind!r} weighting of tasks {list(self.tasks)}"
            )


class FixedWeighting(TaskWeighting):
    """sum_t sum_i base_t * terms[t][i]: the fixed preset weights (multiplier 1)."""

    kind = "fixed"

    def forward(
        self, terms: Mapping[str, Sequence[Tensor]], ctx: WeightingContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Preset-weighted sum, accumulated left to right from the first product (no leading zero)."""
        total: Tensor | None = None
        for t in self.present(terms):
            for term in terms[t]:
                # This order and the per-term product are what the previous objective computed; keeping
                # them exact keeps fixed-weight runs bit-identical (_wide leaves float32/64 terms as they are).
                product = self.base[t] * _wide(term)
                total = product if total is None else total + product
        logs = {f"weight/{t}": torch.ones(()) for t in self.tasks}
        return total, logs


class UncertaintyWeighting(TaskWeighting):
    """Homoscedastic uncertainty weighting: sum_t 0.5 (exp(-s_t) base_t L_t + s_t), s_t = log sigma_t^2."""

    kind = "uncertainty"

    def __init__(self, tasks: Sequence[str], base: Mapping[str, float]) -> None:
        super().__init__(tasks, base)
        # float32 whatever the autocast dtype: the combination below runs on float32 losses.
        self.log_vars = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros((), dtype=torch.float32)) for t in self.tasks}
        )

    def forward(
        self, terms: Mapping[str, Sequence[Tensor]], ctx: WeightingContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_t 0.5 (exp(-s_t) base_t L_t + s_t) over the tasks present (float32).

        In training the gradient w.r.t. s_t uses the process mean of base_t L_t (one collective per step), so
        every process applies the same update to the log-variances whether or not they are wrapped in DDP;
        a task absent here but present on another process contributes 0.5 s_t (its s_t gradient only)."""
        scaled = {t: self.base[t] * loss for t, loss in self.task_losses(terms).items()}
        total: Tensor | None = None
        if not (self.training and torch.is_grad_enabled()):
            for t, value in scaled.items():
                s = self.log_vars[t]
                term = 0.5 * (torch.exp(-s) * value + s)
                total = term if total is None else total + term
        else:
            k = len(self.tasks)
            record = torch.zeros(2 * k, dtype=torch.float32, device=next(iter(scaled.values())).device)
            for t, value in scaled.items():
                record[self.index[t]] = value.detach()
                record[k + self.index[t]] = 1.0
            reduced = ctx.reduce_mean(record)
            share = reduced[k:].tolist()
            means = reduced[:k] / reduced[k:]
            for t in self.tasks:
                i = self.index[t]
                if share[i] == 0:
                    continue
                s = self.log_vars[t]
                precision = torch.exp(-s)
                # (precision - precision.detach()) is exactly 0: the value stays 0.5 (exp(-s) base L + s)
                # while ds gets the process-mean loss and the model still the local one.
                term = (precision - precision.detach()) * means[i]
                if t in scaled:
                    term = precision.detach() * scaled[t] + term
                term = 0.5 * (term + s)
                total = term if total is None else total + term
        logs: dict[str, Tensor] = {}
        for t in self.tasks:
            s = self.log_vars[t].detach()
            logs[f"weight/{t}"] = 0.5 * torch.exp(-s)
            logs[f"uncertainty/log_var/{t}"] = s.clone()
        return total, logs

    def param_groups(self, lr: float) -> list[dict]:
        """The log-variances, for the model optimiser, without weight decay (it would pull sigma to 1)."""
        return [
            {"params": list(self.log_vars.values()), "lr": lr, "weight_decay": 0.0, "name": "uncertainty"}
        ]

    def checkpoint_state(self) -> dict:
        """Tasks and log-variances s_t (plain floats)."""
        return {**super().checkpoint_state(), "log_var": [float(self.log_vars[t].item()) for t in self.tasks]}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore the log-variances exactly."""
        super().load_checkpoint_state(state)
        with torch.no_grad():
            for t, value in zip(self.tasks, state["log_var"], strict=True):
                self.log_vars[t].copy_(torch.tensor(value, dtype=torch.float32))


def dwa_weights(previous: Sequence[float], before: Sequence[float], temperature: float) -> list[float]:
    """DWA weights w_t = K exp(r_t / T) / sum_i exp(r_i / T), r_t = previous_t / before_t (mean task losses of
    periods p-1 and p-2). A task whose `before` is not positive and finite gets r_t = 1. Sum = K."""
    if len(previous) != len(before) or not previous:
        raise ValueError(f"need one loss per task for both periods, got {len(previous)} and {len(before)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ratios = [
        p / b if math.isfinite(b) and b > 0 and math.isfinite(p) else 1.0 for p, b in zip(previous, before)
    ]
    # Subtracting the largest exponent leaves the softmax unchanged and cannot overflow.
    top = max(r / temperature for r in ratios)
    exps = [math.exp(r / temperature - top) for r in ratios]
    norm = sum(exps)
    return [len(ratios) * e / norm for e in exps]


class DWAWeighting(TaskWeighting):
    """Dynamic weight average over periods of `period` steps: weights from the last two periods' mean losses.

    Step s belongs to period s // period. The weights of period p >= 2 come from the mean base-weighted task
    losses of the two most recent completed periods that recorded a finite step (p-1 and p-2 in any normal
    run); the first two periods have weights 1. A period's mean covers the steps whose update() ran (finite
    steps), each step's value averaged over processes; a task with no value in one of the two periods gets
    rate 1. MTAN averages over epochs; we use fixed periods of iterations.
    """

    kind = "dwa"
    dwa_weights = staticmethod(dwa_weights)

    def __init__(
        self, tasks: Sequence[str], base: Mapping[str, float], period: int = 100, temperature: float = 2.0
    ) -> None:
        super().__init__(tasks, base)
        if int(period) != period or period < 1:
            raise ValueError(f"dwa period must be a positive number of steps, got {period}")
        if not temperature > 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.period = int(period)
        self.temperature = float(temperature)
        k = len(self.tasks)
        self._current = 0  # period the running sums belong to
        self._sums = [0.0] * k  # sum over the recorded steps of base_t L_t (Python floats: float64)
        self._counts = [0] * k
        self._history: list[tuple[int, list[float | None]]] = []  # last two completed (period, means)
        self._pending: tuple[int, Tensor] | None = None  # (step, [values, presence]) of the last forward

    def _closed_current(self) -> tuple[int, list[float | None]] | None:
        if not any(self._counts):
            return None
        means = [s / c if c else None for s, c in zip(self._sums, self._counts)]
        return self._current, means

    def weights_for(self, period: int) -> list[float]:
        """The DWA weights (multipliers of base_t L_t, one per task, sum K) of period index `period`."""
        history = list(self._history)
        if self._current < period:
            # The running sums belong to a period that is over; update() has not rolled it over yet.
            closed = self._closed_current()
            if closed is not None:
                history.append(closed)
        history = [h for h in history if h[0] < period][-2:]
        if len(history) < 2:
            return [1.0] * len(self.tasks)
        (_, before), (_, previous) = history
        prev_v, before_v = [], []
        for p, b in zip(previous, before):
            known = p is not None and b is not None
            prev_v.append(p if known else 1.0)
            before_v.append(b if known else 1.0)
        return dwa_weights(prev_v, before_v, self.temperature)

    def forward(
        self, terms: Mapping[str, Sequence[Tensor]], ctx: WeightingContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_t w_t base_t L_t with the weights of the period of ctx.step (float32)."""
        losses = self.task_losses(terms)
        weights = self.weights_for(ctx.step // self.period)
        total: Tensor | None = None
        for t, loss in losses.items():
            term = (weights[self.index[t]] * self.base[t]) * loss
            total = term if total is None else total + term
        k = len(self.tasks)
        record = torch.zeros(2 * k, dtype=torch.float32, device=total.device)
        for t, loss in losses.items():
            record[self.index[t]] = self.base[t] * loss.detach()
            record[k + self.index[t]] = 1.0
        self._pending = (ctx.step, record)
        logs = {f"weight/{t}": torch.tensor(weights[i]) for i, t in enumerate(self.tasks)}
        return total, logs

    def update(self, ctx: WeightingContext) -> dict[str, Tensor]:
        """Add this (finite) step's process-averaged losses to its period's running means."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != ctx.step:
            return {}
        period = ctx.step // self.period
        if period < self._current:
            raise ValueError(
                f"step {ctx.step} (period {period}) precedes the recorded period {self._current}"
            )
        if period > self._current:
            closed = self._closed_current()
            if closed is not None:
                self._history = [*self._history, closed][-2:]
            self._current = period
            self._sums = [0.0] * len(self.tasks)
            self._counts = [0] * len(self.tasks)
        k = len(self.tasks)
        # Every process calls the collective with the same shape; the presence half averages each task over
        # the processes that had it, so all processes record identical means.
        reduced = _floats(ctx.reduce_mean(pending[1]))
        for i in range(k):
            value, share = reduced[i], reduced[k + i]
            if share > 0 and math.isfinite(value):
                self._sums[i] += value / share
                self._counts[i] += 1
        return {}

    def checkpoint_state(self) -> dict:
        """Period length, running sums/counts of the current period and the last two completed means."""
        return {
            **super().checkpoint_state(),
            "period": self.period,
            "current": self._current,
            "sums": list(self._sums),
            "counts": list(self._counts),
            "history": [{"period": p, "mean": list(m)} for p, m in self._history],
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore the period bookkeeping exactly; refuses a checkpoint with another period length."""
        super().load_checkpoint_state(state)
        if int(state["period"]) != self.period:
            raise ValueError(
                f"checkpoint has dwa period {state['period']}, this run {self.period} (loss.dwa_period)"
            )
        self._current = int(state["current"])
        self._sums = [float(v) for v in state["sums"]]
        self._counts = [int(v) for v in state["counts"]]
        self._history = [
            (int(h["period"]), [None if v is None else float(v) for v in h["mean"]]) for h in state["history"]
        ]
        self._pending = None


class GradNormWeighting(TaskWeighting):
    """GradNorm: learnt w_t (sum K) pulling G_t = ||d(w_t base_t L_t)/dW|| towards mean(G) r_t^alpha.

    The model loss sum_t w_t base_t L_t uses detached weights; forward also measures g_t = ||d(base_t L_t)/dW||
    at the last shared layer W = ctx.shared(t), and update() takes one step of the weights' own Adam on
    L_grad = sum_t |G_t - target_t|, then clamps the weights to >= min_weight and rescales them to sum K.
    """

    kind = "gradnorm"

    def __init__(
        self,
        tasks: Sequence[str],
        base: Mapping[str, float],
        alpha: float = 1.5,
        lr: float = 0.025,
        min_weight: float = 1e-3,
    ) -> None:
        super().__init__(tasks, base)
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"gradnorm alpha must be finite and >= 0, got {alpha}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"gradnorm lr must be finite and > 0, got {lr}")
        if not 0 < min_weight < 1:
            raise ValueError(f"gradnorm min_weight must be in (0, 1), got {min_weight}")
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.min_weight = float(min_weight)
        self.weights = nn.Parameter(torch.ones(len(self.tasks), dtype=torch.float32))
        self._optimizer = torch.optim.Adam([self.weights], lr=self.lr, betas=(0.9, 0.999))
        self._initial: Tensor | None = None  # L_t(0): process-averaged base_t L_t of the first update (CPU)
        self._pending: tuple[int, Tensor | None, Tensor | None] | None = None  # (step, losses, grad)

    def forward(
        self, terms: Mapping[str, Sequence[Tensor]], ctx: WeightingContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """sum_t w_t base_t L_t with w detached; in training with grad enabled also measures the per-task
        gradient norms at ctx.shared(t) and prepares the weights' update (applied by update())."""
        losses = self.task_losses(terms)
        scaled = {t: self.base[t] * loss for t, loss in losses.items()}
        w = self.weights.detach()
        total: Tensor | None = None
        for t, value in scaled.items():
            term = w[self.index[t]] * value
            total = term if total is None else total + term
        logs = {f"weight/{t}": w[i].clone() for i, t in enumerate(self.tasks)}
        self._pending = None
        if self.training and torch.is_grad_enabled():
            logs.update(self._measure(scaled, ctx, total.device))
        return total, logs

    def _measure(
        self, scaled: Mapping[str, Tensor], ctx: WeightingContext, device: torch.device
    ) -> dict[str, Tensor]:
        """Measure g_t, prepare the weights' gradient for update(); logs G_t and L_grad ({} when unusable)."""
        if ctx.shared is None:
            raise ValueError("GradNorm needs ctx.shared: the parameters of the last shared layer per task")
        k = len(self.tasks)
        scale = float(ctx.loss_scale)
        # Per task its gradient at the shared layer (flattened, float32; zeros when absent), then the losses and
        # presence flags: reduced across processes as one vector, so that g_t is the norm of the process-averaged
        # gradient (what the model's step uses), not an average of per-process norms, which noise inflates.
        params = {t: [p for p in ctx.shared(t) if p.requires_grad] for t in self.tasks}
        for t, ps in params.items():
            if not ps:
                raise ValueError(f"ctx.shared({t!r}) holds no trainable parameter")
        sizes = [sum(p.numel() for p in params[t]) for t in self.tasks]
        grads: list[Tensor] = [torch.zeros(n, dtype=torch.float32, device=device) for n in sizes]
        record = torch.zeros(2 * k, dtype=torch.float32, device=device)  # [base_t L_t, presence]
        # Backward is best run outside autocast; the gradient dtypes follow the forward's anyway.
        with autocast_off(device):
            for t, value in scaled.items():
                i = self.index[t]
                if value.requires_grad:
                    # No create_graph: G_t = w_t g_t with g_t independent of w_t, so dG_t/dw_t = g_t exactly
                    # and the weights' gradient needs only the value of g_t, not a double backward. With
                    # fp16 the scaled loss keeps the half-precision gradients from underflowing.
                    got = torch.autograd.grad(value * scale, params[t], retain_graph=True, allow_unused=True)
                    flat = [
                        (g if g is not None else torch.zeros_like(p)).float().reshape(-1)
                        for g, p in zip(got, params[t], strict=True)
                    ]
                    grads[i] = torch.cat(flat) / scale
                record[i] = value.detach()
                record[k + i] = 1.0
        # One collective per step on every process, whatever it holds: a non-finite value anywhere turns the
        # mean non-finite, so all processes skip together.
        reduced = ctx.reduce_mean(torch.cat([*grads, record]))
        n = sum(sizes)
        mean_grads = reduced[:n].split(sizes)
        values, share = reduced[n : n + k], reduced[n + k :]
        if not bool((share > 0).all()):
            self._pending = (ctx.step, None, None)  # some task has no loss on any process this step
            return {}
        # The mean over the processes where the task has a loss (the reduced mean counts absent ones as 0).
        norms = torch.stack([g.norm() for g in mean_grads]) / share
        values = values / share
        if not bool(torch.isfinite(values).all()):
            self._pending = (ctx.step, None, None)
            return {}
        initial = values if self._initial is None else self._initial.to(values.device)
        w = self.weights.detach().to(values.device)
        rel = values / initial  # Ltilde_t: loss relative to its first recorded value
        rate = rel / rel.mean()  # r_t: relative inverse training rate
        G = w * norms
        # The target is a constant of the weights' objective (paper): no gradient through mean(G) or r_t.
        target = G.mean() * rate.pow(self.alpha)
        diff = G - target
        grad = torch.sign(diff) * norms  # d|G_t - target_t| / dw_t
        if not (bool(torch.isfinite(grad).all()) and bool(torch.isfinite(target).all())):
            self._pending = (ctx.step, values, None)
            return {}
        self._pending = (ctx.step, values, grad)
        logs = {f"gradnorm/grad_norm/{t}": G[i].clone() for i, t in enumerate(self.tasks)}
        logs["gradnorm/loss"] = diff.abs().sum()
        return logs

    def update(self, ctx: WeightingContext) -> dict[str, Tensor]:
        """Record L_t(0) at the first update, then one Adam step of the weights and renormalisation to sum K;
        "gradnorm/applied" is 1 when the weights moved (0: no usable measurement this step)."""
        pending, self._pending = self._pending, None
        applied = torch.zeros(())
        if pending is None or pending[0] != ctx.step:
            return {"gradnorm/applied": applied}
        _, values, grad = pending
        if values is not None and self._initial is None:
            self._initial = values.detach().float().cpu().clone()
        if grad is None:
            return {"gradnorm/applied": applied}
        self._state_to_param_device()
        self.weights.grad = grad.to(self.weights)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.weights.clamp_(min=self.min_weight)
            self.weights.mul_(len(self.tasks) / self.weights.sum())
        return {"gradnorm/applied": torch.ones(())}

    def _state_to_param_device(self) -> None:
        # Adam's moments may have been restored (or created) before the module moved to another device.
        state = self._optimizer.state.get(self.weights, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].device != self.weights.device:
                state[key] = state[key].to(self.weights.device)

    def checkpoint_state(self) -> dict:
        """Weights, initial losses L_t(0) (or None) and the weights' Adam state (step, moments) as floats."""
        state = self._optimizer.state.get(self.weights, {})
        adam = None
        if "step" in state:
            adam = {
                "step": float(state["step"]),
                "exp_avg": _floats(state["exp_avg"]),
                "exp_avg_sq": _floats(state["exp_avg_sq"]),
            }
        return {
            **super().checkpoint_state(),
            "weights": _floats(self.weights),
            "initial": None if self._initial is None else _floats(self._initial),
            "adam": adam,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore weights, L_t(0) and the Adam state exactly."""
        super().load_checkpoint_state(state)
        device = self.weights.device
        with torch.no_grad():
            self.weights.copy_(torch.tensor(state["weights"], dtype=torch.float32))
        initial = state["initial"]
        self._initial = None if initial is None else torch.tensor(initial, dtype=torch.float32)
        saved = self._optimizer.state_dict()
        adam = state["adam"]
        saved["state"] = {}
        if adam is not None:
            saved["state"][0] = {
                "step": torch.tensor(float(adam["step"]), dtype=torch.float32),
                "exp_avg": torch.tensor(adam["exp_avg"], dtype=torch.float32, device=device),
                "exp_avg_sq": torch.tensor(adam["exp_avg_sq"], dtype=torch.float32, device=device),
            }
        self._optimizer.load_state_dict(saved)
        self._pending = None


WEIGHTINGS: dict[str, type[TaskWeighting]] = {
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWAWeighting,
    "gradnorm": GradNormWeighting,
}


def build_weighting(
    kind: str, tasks: Sequence[str], base: Mapping[str, float], **options: Any
) -> TaskWeighting:
    """The weighting `kind` (one of WEIGHTINGS) over `tasks` with base scales `base` and its options."""
    if kind not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {kind!r}; expected one of {', '.join(WEIGHTINGS)}")
    cls = WEIGHTINGS[kind]
    accepted = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "tasks", "base")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for loss weighting {kind!r}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(tasks, base, **options)


def weighted_tasks(objectives: Sequence, tasks: Sequence[str]) -> tuple[str, ...]:
    """The run's tasks (in order) some objective attributes loss terms to (`Objective.weighted_tasks`): a task
    learnt only through an objective's own total (e.g. photometric depth on the source) is not among them."""
    needs = [[n for o in objectives if (n := o.needs(d)) is not None] for d in (0, 1)]
    unlabelled = {d: frozenset().union(*(n.unlabelled for n in per)) for d, per in enumerate(needs)}
    named = frozenset().union(*(o.weighted_tasks(unlabelled) for o in objectives))
    return tuple(t for t in tasks if t in named)


def weighting_from_config(loss: LossConfig, tasks: Sequence[str], objectives: Sequence = ()) -> TaskWeighting:
    """The task weighting `loss.weighting` of a run, on the base weights `loss.weights` (default: the paper's
    preset for the task set). A learnt weighting balances the tasks the run's `objectives` attribute loss terms
    to (all tasks without objectives); a task learnt only through an objective's own total (photometric depth)
    has no term to weigh, and would leave GradNorm without a measurement at every step."""
    options = {
        "dwa": {"period": loss.dwa_period, "temperature": loss.dwa_temperature},
        "gradnorm": {"alpha": loss.gradnorm_alpha, "lr": loss.weighting_lr},
    }.get(loss.weighting, {})
    # Uncertainty's rate goes to the model optimiser, which accepts any number: a rate <= 0 would push the
    # log-variances away from their optimum (or freeze them) without a word.
    lr = loss.weighting_lr
    if loss.weighting in ("uncertainty", "gradnorm") and not (math.isfinite(lr) and lr > 0):
        raise ObjectiveError(
            f"loss.weighting_lr={lr}: loss.weighting={loss.weighting} learns its weights at this rate, which must "
            "be finite and > 0"
        )
    # A preset may weigh more tasks than the run trains (they are not used); a name that is no task at all is a
    # misspelling, which would leave the intended weight unused.
    unknown = sorted(set(loss.weights) - set(get_args(Task)))
    if unknown:
        raise ObjectiveError(
            f"loss.weights names {unknown}, which are not tasks (tasks: {', '.join(get_args(Task))}); "
            "fix their names"
        )
    base = loss.weights or default_task_weights(tasks)
    weighted = weighted_tasks(objectives, tasks) if objectives else tuple(tasks)
    if loss.weighting != "fixed" and weighted != tuple(tasks):
        others = [t for t in tasks if t not in weighted]
        if len(weighted) < (1 if loss.weighting == "uncertainty" else 2):
            raise ObjectiveError(
                f"loss.weighting={loss.weighting} balances the tasks with per-task loss terms, and this run has "
                f"{list(weighted) or 'none'}: {others} are learnt by objectives with their own weights (e.g. "
                "photometric.weight); set loss.weighting=fixed"
            )
        tasks = tuple(weighted)
    try:
        return build_weighting(loss.weighting, tasks, base, **options)
    except (KeyError, ValueError) as exc:
        raise ObjectiveError(
            f"loss.weighting={loss.weighting} with loss.weights={loss.weights}: {exc}"
        ) from None
