"""Task weightings (fixed, uncertainty, DWA, GradNorm) against independent computations and toy problems."""

import json
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda.objectives.weighting import (
    WEIGHTINGS,
    DWAWeighting,
    FixedWeighting,
    GradNormWeighting,
    UncertaintyWeighting,
    WeightingContext,
    build_weighting,
    dwa_weights,
)


def json_copy(state: dict) -> dict:
    return json.loads(json.dumps(state))


class FakeGroup:
    """All-reduce mean across `size` threads standing in for processes."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size)
        self.slots: list[torch.Tensor | None] = [None] * size

    def reduce_mean(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.detach().clone()
            self.barrier.wait()
            out = torch.stack(self.slots).mean(0)
            self.barrier.wait()
            return out

        return reduce


def run_ranks(fn, group: FakeGroup, size: int) -> list:
    results: list = [None] * size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # a thread would swallow it; re-raised below
            errors.append(exc)
            group.barrier.abort()  # release the other ranks instead of letting them wait forever

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# ---------------------------------------------------------------------------------------------- fixed


def test_fixed_is_the_left_to_right_preset_weighted_sum():
    base = {"semseg": 50.0, "depth": 1.0, "normals": 3.3}
    weighting = FixedWeighting(["semseg", "depth", "normals"], base)
    # Values where the float32 accumulation order matters: float32 numbers near 1e8 are 8 apart.
    leaves = {
        "depth": [torch.tensor(1e8, requires_grad=True), torch.tensor(0.5, requires_grad=True)],
        "semseg": [torch.tensor(0.25, requires_grad=True)],
        "normals": [torch.tensor(-1e8 / 3.3, requires_grad=True), torch.tensor(0.125, requires_grad=True)],
    }
    total, logs = weighting(leaves, WeightingContext(step=0))

    expected = base["semseg"] * leaves["semseg"][0]
    for task in ("depth", "normals"):
        for term in leaves[task]:
            expected = expected + base[task] * term
    assert torch.equal(total, expected)
    other_order = base["normals"] * leaves["normals"][0] + base["depth"] * leaves["depth"][0]
    for task, i in (("semseg", 0), ("depth", 1), ("normals", 1)):
        other_order = other_order + base[task] * leaves[task][i]
    assert not torch.equal(other_order, expected)  # the check above can tell orders apart

    hand = sum(base[t] * v.item() for t in leaves for v in leaves[t])
    assert total.item() == pytest.approx(hand, rel=1e-6, abs=64.0)  # float32 rounding at 1e8 is 8
    total.backward()
    for task, terms in leaves.items():
        for term in terms:
            assert term.grad.item() == pytest.approx(base[task])
    assert {k: v.item() for k, v in logs.items()} == {f"weight/{t}": 1.0 for t in base}


def test_fixed_skips_absent_tasks_and_rejects_unknown_ones():
    weighting = FixedWeighting(["semseg", "depth"], {"semseg": 50.0, "depth": 1.0})
    a, b = torch.tensor(0.5), torch.tensor(2.0)
    total, _ = weighting({"depth": [a, b]}, WeightingContext(step=0))
    assert torch.equal(total, 1.0 * a + 1.0 * b)
    a64, b64 = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    total, _ = weighting({"semseg": [a64], "depth": [b64]}, WeightingContext(step=0))
    assert total.dtype == torch.float64 and torch.equal(total, 50.0 * a64 + 1.0 * b64)  # no downcast
    with pytest.raises(ValueError, match="edges"):
        weighting({"edges": [a]}, WeightingContext(step=0))


# ---------------------------------------------------------------------------------------------- uncertainty


def test_uncertainty_learns_the_inverse_loss_scales():
    base = {"a": 50.0, "b": 1.0}
    scales = {"a": 0.02 + 0.03, "b": 10.0}  # task a as two terms summing to 0.05
    weighting = UncertaintyWeighting(["a", "b"], base)
    groups = weighting.param_groups(lr=0.05)
    assert len(groups) == 1 and groups[0]["lr"] == 0.05
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in weighting.parameters()}
    opt = torch.optim.Adam(groups)
    for step in range(400):
        terms = {
            "a": [torch.tensor(0.02, requires_grad=True), torch.tensor(0.03, requires_grad=True)],
            "b": [torch.tensor(10.0, requires_grad=True)],
        }
        total, logs = weighting(terms, WeightingContext(step=step))
        opt.zero_grad()
        total.backward()
        opt.step()
    for t in ("a", "b"):
        s = weighting.log_vars[t].detach()
        assert s.dtype == torch.float32
        assert math.exp(-s.item()) == pytest.approx(1.0 / (base[t] * scales[t]), rel=0.05)
    _, logs = weighting(terms, WeightingContext(step=400))
    for t in ("a", "b"):
        s = logs[f"uncertainty/log_var/{t}"].item()
        assert logs[f"weight/{t}"].item() == pytest.approx(0.5 * math.exp(-s), rel=1e-6)


def test_uncertainty_total_and_checkpoint_round_trip():
    weighting = UncertaintyWeighting(["a", "b"], {"a": 2.0, "b": 3.0})
    with torch.no_grad():
        weighting.log_vars["a"].fill_(0.3)
        weighting.log_vars["b"].fill_(-1.7)
    la, lb = 0.8, 4.0
    total, _ = weighting({"a": [torch.tensor(la)], "b": [torch.tensor(lb)]}, WeightingContext(step=0))
    s32 = [float(torch.tensor(v)) for v in (0.3, -1.7)]
    hand = 0.5 * (math.exp(-s32[0]) * 2.0 * la + s32[0]) + 0.5 * (math.exp(-s32[1]) * 3.0 * lb + s32[1])
    assert total.item() == pytest.approx(hand, rel=1e-6)

    copy = UncertaintyWeighting(["a", "b"], {"a": 2.0, "b": 3.0})
    copy.load_checkpoint_state(json_copy(weighting.checkpoint_state()))
    for t in ("a", "b"):
        assert torch.equal(copy.log_vars[t], weighting.log_vars[t])
    with pytest.raises(ValueError, match="tasks"):
        UncertaintyWeighting(["a", "c"], {"a": 1.0, "c": 1.0}).load_checkpoint_state(
            weighting.checkpoint_state()
        )


def test_uncertainty_processes_hold_identical_log_variances():
    group = FakeGroup(2)

    def train(rank: int | None, steps: int = 30) -> dict[str, torch.Tensor]:
        weighting = UncertaintyWeighting(["a", "b"], {"a": 1.0, "b": 2.0})
        opt = torch.optim.Adam(weighting.param_groups(lr=0.1))
        for step in range(steps):
            # Rank 1's losses are 3x rank 0's; a single process with the mean losses (2x) is the reference.
            factor = 2.0 if rank is None else 1.0 + 2.0 * rank
            reduce = (lambda t: t) if rank is None else group.reduce_mean(rank)
            terms = {"a": [torch.tensor(0.1 * factor)], "b": [torch.tensor(4.0 * factor)]}
            total, _ = weighting(terms, WeightingContext(step=step, reduce_mean=reduce))
            opt.zero_grad()
            total.backward()
            opt.step()
        return {t: p.detach().clone() for t, p in weighting.log_vars.items()}

    rank0, rank1 = run_ranks(train, group, 2)
    reference = train(None)
    for t in ("a", "b"):
        assert torch.equal(rank0[t], rank1[t])
        assert rank0[t].item() == pytest.approx(reference[t].item(), rel=1e-6)
        assert abs(rank0[t].item()) > 0.5  # they did move


# ---------------------------------------------------------------------------------------------- DWA


def test_dwa_weights_follow_the_formula():
    previous, before, temperature = [0.9, 2.0, 0.5], [1.0, 2.5, 0.25], 2.0
    ratios = [p / b for p, b in zip(previous, before)]
    exps = [math.exp(r / temperature) for r in ratios]
    expected = [3 * e / sum(exps) for e in exps]
    got = dwa_weights(previous, before, temperature)
    assert got == pytest.approx(expected, rel=1e-12)
    assert sum(got) == pytest.approx(3.0, rel=1e-12)
    assert DWAWeighting.dwa_weights(previous, before, 0.5) == pytest.approx(
        [3 * math.exp(r / 0.5) / sum(math.exp(q / 0.5) for q in ratios) for r in ratios], rel=1e-12
    )
    # Equal rates give equal weights whatever the temperature.
    assert dwa_weights([1.0, 4.0], [2.0, 8.0], 0.1) == pytest.approx([1.0, 1.0])


def scripted_losses(step: int) -> dict[str, float]:
    # Dyadic values (exact in float32): task a falls, task b rises then falls.
    return {"a": 8.0 - 0.5 * step, "b": 2.0 + 0.25 * (step % 4) + (1.0 if 6 <= step < 9 else 0.0)}


def dwa_run(weighting: DWAWeighting, steps, skipped=()) -> list[dict[str, float]]:
    out = []
    for step in steps:
        values = scripted_losses(step)
        terms = {t: [torch.tensor(v, requires_grad=True)] for t, v in values.items()}
        ctx = WeightingContext(step=step)
        total, logs = weighting(terms, ctx)
        w = {t: logs[f"weight/{t}"].item() for t in values}
        expected_total = sum(w[t] * weighting.base[t] * values[t] for t in values)
        assert total.dtype == torch.float32
        assert total.item() == pytest.approx(expected_total, rel=1e-6)
        if step not in skipped:
            weighting.update(ctx)
        out.append(w)
    return out


def test_dwa_module_uses_period_means_of_the_finite_steps():
    period, temperature, base = 3, 2.0, {"a": 2.0, "b": 0.5}
    skipped = {4, 9}  # forward ran but the step was not finite: no update(), the loss must not count
    weighting = DWAWeighting(["a", "b"], base, period=period, temperature=temperature)
    got = dwa_run(weighting, range(15), skipped)

    means: dict[int, dict[str, float]] = {}
    for p in range(5):
        steps = [s for s in range(p * period, (p + 1) * period) if s not in skipped]
        means[p] = {t: sum(base[t] * scripted_losses(s)[t] for s in steps) / len(steps) for t in base}
    for step, w in enumerate(got):
        p = step // period
        if p < 2:
            assert w == {"a": 1.0, "b": 1.0}
            continue
        r = {t: means[p - 1][t] / means[p - 2][t] for t in base}
        norm = sum(math.exp(r[t] / temperature) for t in base)
        expected = {t: 2 * math.exp(r[t] / temperature) / norm for t in base}
        assert w == pytest.approx(expected, rel=1e-6), step  # logs are float32
        assert sum(w.values()) == pytest.approx(2.0, rel=1e-6)
    assert got[6]["a"] != pytest.approx(1.0)  # the script really moves the weights


def test_dwa_period_means_skip_steps_without_the_task():
    weighting = DWAWeighting(["a", "b"], {"a": 1.0, "b": 1.0}, period=2, temperature=1.0)
    history = [  # per step the losses present: b is missing at steps 1 and 4
        {"a": 4.0, "b": 2.0},
        {"a": 4.0},
        {"a": 2.0, "b": 3.0},
        {"a": 2.0, "b": 5.0},
        {"a": 1.0},
        {"a": 1.0, "b": 4.0},
        {"a": 1.0, "b": 1.0},
    ]
    weights = []
    for step, values in enumerate(history):
        ctx = WeightingContext(step=step)
        _, logs = weighting({t: [torch.tensor(v)] for t, v in values.items()}, ctx)
        weighting.update(ctx)
        weights.append({t: logs[f"weight/{t}"].item() for t in ("a", "b")})
    # Period means over the steps holding the task: a 4, 2, 1; b 2 (step 0), 4 (steps 2, 3), 4 (step 5).
    for step, r in ((4, {"a": 2 / 4, "b": 4 / 2}), (6, {"a": 1 / 2, "b": 4 / 4})):
        norm = math.exp(r["a"]) + math.exp(r["b"])
        assert weights[step] == pytest.approx({t: 2 * math.exp(r[t]) / norm for t in r}, rel=1e-6), step


def test_dwa_checkpoint_round_trip_mid_period():
    weighting = DWAWeighting(["a", "b"], {"a": 1.0, "b": 3.0}, period=4)
    dwa_run(weighting, range(10))  # stops in the middle of period 2
    state = weighting.checkpoint_state()
    copy = DWAWeighting(["a", "b"], {"a": 1.0, "b": 3.0}, period=4)
    copy.load_checkpoint_state(json_copy(state))
    assert copy.checkpoint_state() == state
    assert dwa_run(copy, range(10, 20)) == dwa_run(weighting, range(10, 20))  # exact float equality
    assert copy.checkpoint_state() == weighting.checkpoint_state()
    with pytest.raises(ValueError, match="period"):
        DWAWeighting(["a", "b"], {"a": 1.0, "b": 3.0}, period=5).load_checkpoint_state(state)


def test_dwa_processes_agree_on_the_mean_losses():
    group, base = FakeGroup(2), {"a": 1.0, "b": 1.0}

    def rank_run(rank: int) -> list[dict[str, float]]:
        weighting = DWAWeighting(["a", "b"], base, period=2)
        out = []
        for step in range(8):
            # Rank 1's losses are rank 0's plus 2 (DWA is scale-free, an offset changes the rates).
            values = {t: v + 2.0 * rank for t, v in scripted_losses(step).items()}
            ctx = WeightingContext(step=step, reduce_mean=group.reduce_mean(rank))
            _, logs = weighting({t: [torch.tensor(v)] for t, v in values.items()}, ctx)
            weighting.update(ctx)
            out.append({t: logs[f"weight/{t}"].item() for t in values})
        return out

    rank0, rank1 = run_ranks(rank_run, group, 2)
    assert rank0 == rank1
    single = DWAWeighting(["a", "b"], base, period=2)
    expected = []
    for step in range(8):
        values = {t: v + 1.0 for t, v in scripted_losses(step).items()}
        ctx = WeightingContext(step=step)
        _, logs = single({t: [torch.tensor(v)] for t, v in values.items()}, ctx)
        single.update(ctx)
        expected.append({t: logs[f"weight/{t}"].item() for t in values})
    assert rank0 == expected
    alone = DWAWeighting(["a", "b"], base, period=2)
    assert dwa_run(alone, range(8)) != rank0  # the offset matters: rank 0 alone would weight otherwise


# ---------------------------------------------------------------------------------------------- GradNorm


def test_gradnorm_equalises_gradient_norms_at_the_shared_layer():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    shared = nn.Linear(8, 16)  # the "last shared layer" W
    heads = nn.ModuleDict({"a": nn.Linear(16, 1), "b": nn.Linear(16, 1)})
    true = {"a": torch.randn(8, generator=g), "b": 10 * torch.randn(8, generator=g)}  # loss b ~100x loss a

    def sample(n: int):
        x = torch.randn(n, 8, generator=g)
        return x, {t: x @ v for t, v in true.items()}

    def task_losses(x, y) -> dict[str, torch.Tensor]:
        h = shared(x)
        return {t: F.mse_loss(heads[t](h).squeeze(1), y[t]) for t in ("a", "b")}

    def norms_at_w(weights, data) -> list[float]:
        losses = task_losses(*data)
        return [
            torch.autograd.grad(weights[i] * losses[t], shared.weight, retain_graph=True)[0].norm().item()
            for i, t in enumerate(("a", "b"))
        ]

    before = norms_at_w([1.0, 1.0], sample(4096))
    assert max(before) / min(before) > 5
    # alpha = 0 makes the target the mean norm itself (equal training rates would do the same).
    weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 1.0}, alpha=0.0)
    model_params = [*shared.parameters(), *heads.parameters()]
    opt = torch.optim.SGD(model_params, lr=2e-4)
    train = sample(4096)
    start = {t: v.item() for t, v in task_losses(*train).items()}
    for step in range(120):
        losses = task_losses(*train)
        ctx = WeightingContext(step=step, shared=lambda task: [shared.weight])
        total, logs = weighting({t: [v] for t, v in losses.items()}, ctx)
        opt.zero_grad()
        total.backward()
        assert weighting.weights.grad is None  # the model loss never reaches the weights
        opt.step()
        weighting.update(ctx)
        w = weighting.weights.detach()
        assert bool((w > 0).all()) and w.sum().item() == pytest.approx(2.0, rel=1e-6)
    assert logs["gradnorm/loss"].item() >= 0
    assert all(losses[t].item() < start[t] for t in start)  # the model did train

    after = norms_at_w(weighting.weights.detach().tolist(), sample(4096))  # a fresh batch
    assert max(after) / min(after) < 1.10, (before, after, weighting.weights)


def scalar_problem(c: dict[str, float], d: dict[str, float]):
    """Losses c_t W + d_t at W = 0: the value is d_t and dL_t/dW = c_t exactly."""
    w = torch.zeros(1, requires_grad=True)
    terms = {t: [(c[t] * w).sum() + d[t]] for t in c}
    return w, terms


def test_gradnorm_follows_the_paper_objective():
    base, lr, alpha = {"a": 2.0, "b": 0.5}, 0.025, 1.5
    c = {"a": 1.0, "b": 12.0}  # g = |base c| = (2, 6)
    weighting = GradNormWeighting(["a", "b"], base, alpha=alpha, lr=lr)
    assert weighting.param_groups(lr=1.0) == []

    # First update: L(0) is recorded, every rate is 1 and the target is mean(G) = 4: a is below it, b above.
    w_param, terms = scalar_problem(c, {"a": 3.0, "b": 5.0})
    ctx = WeightingContext(step=0, shared=lambda t: [w_param])
    total, logs = weighting(terms, ctx)
    assert logs["gradnorm/grad_norm/a"].item() == pytest.approx(2.0)
    assert logs["gradnorm/grad_norm/b"].item() == pytest.approx(6.0)
    assert logs["gradnorm/loss"].item() == pytest.approx(4.0)
    total.backward()
    assert weighting.weights.grad is None
    assert w_param.grad.item() == pytest.approx(2.0 * 1.0 + 0.5 * 12.0)  # sum_t w_t base_t c_t with w = 1
    assert weighting.update(ctx)["gradnorm/applied"].item() == 1.0
    # dL_grad/dw_t = sign(G_t - target_t) g_t = (-2, 6): Adam's first moments are 0.1 and 0.001 of it.
    adam = weighting.checkpoint_state()["adam"]
    assert adam["exp_avg"] == pytest.approx([-0.2, 0.6], rel=1e-6)
    assert adam["exp_avg_sq"] == pytest.approx([0.004, 0.036], rel=1e-6)
    # Adam's first step moves each weight by lr against the sign of its gradient; the sum stays 2.
    assert weighting.weights.tolist() == pytest.approx([1 + lr, 1 - lr], abs=1e-6)

    # Second step: rates relative to the recorded L(0) = base d(0).
    d0, d1 = {"a": 3.0, "b": 5.0}, {"a": 1.5, "b": 4.5}
    w = dict(zip(("a", "b"), weighting.weights.tolist()))
    rel = {t: d1[t] / d0[t] for t in base}
    rate = {t: rel[t] / (sum(rel.values()) / 2) for t in base}
    G = {t: w[t] * abs(base[t] * c[t]) for t in base}
    target = {t: (sum(G.values()) / 2) * rate[t] ** alpha for t in base}
    w_param, terms = scalar_problem(c, d1)
    ctx = WeightingContext(step=1, shared=lambda t: [w_param])
    total, logs = weighting(terms, ctx)
    assert total.item() == pytest.approx(sum(w[t] * base[t] * d1[t] for t in base), rel=1e-6)
    assert logs["gradnorm/loss"].item() == pytest.approx(sum(abs(G[t] - target[t]) for t in base), rel=1e-5)
    weighting.update(ctx)
    grad = {t: math.copysign(abs(base[t] * c[t]), G[t] - target[t]) for t in base}
    exp_avg = weighting.checkpoint_state()["adam"]["exp_avg"]
    assert exp_avg == pytest.approx(
        [0.9 * m + 0.1 * grad[t] for m, t in zip(adam["exp_avg"], base)], rel=1e-5
    )
    new = dict(zip(("a", "b"), weighting.weights.tolist()))
    for t in base:
        # Each weight moves against sign(G_t - target_t) (2 tasks: renormalising keeps the directions).
        assert (new[t] - w[t]) * (G[t] - target[t]) < 0, t
    assert sum(new.values()) == pytest.approx(2.0, rel=1e-6)


def test_gradnorm_loss_scale_and_non_finite_norms():
    c, d = {"a": 1.0, "b": 3.0}, {"a": 0.7, "b": 0.2}
    logs_by_scale = {}
    for scale in (1.0, 1024.0):
        weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 1.0})
        w_param, terms = scalar_problem(c, d)
        _, logs_by_scale[scale] = weighting(
            terms, WeightingContext(0, lambda t, w_param=w_param: [w_param], loss_scale=scale)
        )
    for key, value in logs_by_scale[1.0].items():
        assert torch.equal(value, logs_by_scale[1024.0][key]), key  # power-of-two scaling is exact

    weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 1.0})
    w_param, terms = scalar_problem(c, d)
    ctx = WeightingContext(0, lambda t: [w_param], loss_scale=math.inf)  # an overflowing fp16 step
    weighting(terms, ctx)
    assert weighting.update(ctx)["gradnorm/applied"].item() == 0.0
    assert weighting.weights.tolist() == [1.0, 1.0]


def gradnorm_steps(weighting: GradNormWeighting, steps) -> list[torch.Tensor]:
    out = []
    for step in steps:
        c = {"a": 1.0 + 0.1 * step, "b": 4.0 - 0.2 * step}
        d = {"a": 2.0 / (1 + step), "b": 3.0 - 0.1 * step}
        w_param, terms = scalar_problem(c, d)
        ctx = WeightingContext(step=step, shared=lambda t, w_param=w_param: [w_param])
        weighting(terms, ctx)
        weighting.update(ctx)
        out.append(weighting.weights.detach().clone())
    return out


def test_gradnorm_checkpoint_round_trip_is_exact():
    weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 2.0}, alpha=1.0)
    gradnorm_steps(weighting, range(4))
    state = weighting.checkpoint_state()
    assert state["adam"] is not None and state["initial"] is not None
    copy = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 2.0}, alpha=1.0)
    copy.load_checkpoint_state(json_copy(state))
    assert copy.checkpoint_state() == state
    continued, resumed = gradnorm_steps(weighting, range(4, 9)), gradnorm_steps(copy, range(4, 9))
    for a, b in zip(continued, resumed):
        assert torch.equal(a, b)
    assert copy.checkpoint_state() == weighting.checkpoint_state()


def test_gradnorm_processes_hold_identical_weights():
    group = FakeGroup(2)

    def rank_run(rank: int) -> torch.Tensor:
        weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 1.0})
        for step in range(5):
            c = {"a": 1.0 + rank + step, "b": 5.0 - rank}
            w_param, terms = scalar_problem(c, {"a": 1.0 + rank, "b": 2.0 / (1 + step)})
            ctx = WeightingContext(step, lambda t, w_param=w_param: [w_param], group.reduce_mean(rank))
            weighting(terms, ctx)
            weighting.update(ctx)
        return weighting.weights.detach()

    rank0, rank1 = run_ranks(rank_run, group, 2)
    assert torch.equal(rank0, rank1)
    assert not torch.equal(rank0, torch.ones(2))


def test_gradnorm_measures_the_norm_of_the_process_averaged_gradient():
    # DDP steps with the mean of the processes' gradients: GradNorm must measure that gradient's norm, as one
    # process holding the whole batch would, not the mean of the per-process norms (here 1.0 instead of 0.5).
    c = [{"a": [1.0, 0.0], "b": [0.0, 3.0]}, {"a": [0.0, 1.0], "b": [0.0, 1.0]}]  # dL_t/dW per process
    d = [{"a": 2.0, "b": 1.0}, {"a": 4.0, "b": 3.0}]

    def measure(rank: int | None, group: FakeGroup | None = None) -> dict[str, float]:
        weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 1.0})
        w = torch.zeros(2, requires_grad=True)
        if rank is None:  # one process: the mean of the two losses
            terms = {
                t: [sum((torch.tensor(c[r][t]) * w).sum() + d[r][t] for r in range(2)) / 2]
                for t in ("a", "b")
            }
            reduce = lambda t: t  # noqa: E731
        else:
            terms = {t: [(torch.tensor(c[rank][t]) * w).sum() + d[rank][t]] for t in ("a", "b")}
            reduce = group.reduce_mean(rank)
        _, logs = weighting(terms, WeightingContext(0, lambda t: [w], reduce))
        return {t: logs[f"gradnorm/grad_norm/{t}"].item() for t in ("a", "b")}

    group = FakeGroup(2)
    rank0, rank1 = run_ranks(lambda r: measure(r, group), group, 2)
    one = measure(None)
    assert one == pytest.approx({"a": math.sqrt(0.5), "b": 2.0})
    assert rank0 == rank1 == pytest.approx(one, rel=1e-6)


def test_gradnorm_under_activation_checkpointing_equals_the_plain_step():
    # GradNorm differentiates each task's loss with the graph kept, then the model loss is differentiated:
    # a checkpointed block is recomputed once per pass (model.checkpointing=true).
    from uda.models.checkpointing import checkpoint_forward

    def step(checkpointed: bool):
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        heads = nn.ModuleDict({"a": nn.Linear(8, 1), "b": nn.Linear(8, 1)})
        if checkpointed:
            checkpoint_forward(encoder)
        x = torch.randn(16, 4)
        h = encoder(x)
        terms = {t: [(head(h) - 1.0).pow(2).mean()] for t, head in heads.items()}
        weighting = GradNormWeighting(["a", "b"], {"a": 1.0, "b": 3.0})
        ctx = WeightingContext(step=0, shared=lambda t: [encoder[3].weight])
        total, logs = weighting(terms, ctx)
        total.backward()
        assert weighting.update(ctx)["gradnorm/applied"].item() == 1.0
        bn = encoder[1]
        return logs, [p.grad for p in encoder.parameters()], [bn.running_mean, bn.num_batches_tracked]

    plain_logs, plain_grads, plain_stats = step(False)
    logs, grads, stats = step(True)
    assert plain_logs["gradnorm/grad_norm/a"].item() > 0
    for key, value in plain_logs.items():
        assert torch.equal(logs[key], value), key
    for a, b in zip(grads, plain_grads):
        assert torch.equal(a, b)
    for a, b in zip(stats, plain_stats):  # the statistics moved once, as in the plain step
        assert torch.equal(a, b)
    assert stats[1].item() == 1


# ---------------------------------------------------------------------------------------------- all


@pytest.mark.parametrize("kind", sorted(WEIGHTINGS))
def test_bf16_autocast_gives_a_float32_total_with_working_backward(kind):
    torch.manual_seed(0)
    shared = nn.Linear(4, 8)
    heads = nn.ModuleDict({"semseg": nn.Linear(8, 1), "depth": nn.Linear(8, 1)})
    weighting = build_weighting(kind, ["semseg", "depth"], {"semseg": 50.0, "depth": 1.0})
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    ctx = WeightingContext(step=0, shared=lambda t: [shared.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = shared(x)
        terms = {
            t: [(head(h) - y.bfloat16()).pow(2).mean(), (head(h) - y.bfloat16()).abs().mean()]
            for t, head in heads.items()
        }
        assert terms["depth"][0].dtype == torch.bfloat16
        total, logs = weighting(terms, ctx)
    assert total.dtype == torch.float32 and bool(torch.isfinite(total))
    assert all(bool(torch.isfinite(v).all()) for v in logs.values())
    total.backward()
    assert bool(torch.isfinite(shared.weight.grad).all())
    for p in weighting.parameters():
        assert p.dtype == torch.float32
        assert (p.grad is not None) == (kind == "uncertainty")
    weighting.update(ctx)
    json.dumps(weighting.checkpoint_state())


def test_build_weighting_names_the_valid_kinds():
    for kind, cls in WEIGHTINGS.items():
        assert type(build_weighting(kind, ["depth"], {"depth": 1.0})) is cls
    assert build_weighting("dwa", ["depth"], {"depth": 1.0}, period=7).period == 7
    with pytest.raises(ValueError) as info:
        build_weighting("softmax", ["depth"], {"depth": 1.0})
    for kind in ("fixed", "uncertainty", "dwa", "gradnorm"):
        assert kind in str(info.value)
    with pytest.raises(ValueError, match="period"):
        build_weighting("fixed", ["depth"], {"depth": 1.0}, period=3)
    with pytest.raises(KeyError, match="depth"):
        build_weighting("fixed", ["depth"], {"semseg": 1.0})


def test_loss_weights_naming_no_task_are_refused():
    from uda.config import LossConfig
    from uda.objectives.base import ObjectiveError
    from uda.objectives.weighting import weighting_from_config

    tasks = ("semseg", "depth")
    fine = weighting_from_config(LossConfig(weights={"semseg": 50.0, "depth": 1.0, "normals": 5.0}), tasks)
    assert fine.base == {"semseg": 50.0, "depth": 1.0}  # a preset may weigh tasks the run does not train
    with pytest.raises(ObjectiveError, match=r"loss.weights names \['normal'\], which are not tasks"):
        weighting_from_config(LossConfig(weights={"semseg": 50.0, "depth": 1.0, "normal": 5.0}), tasks)


@pytest.mark.parametrize("weighting", ["uncertainty", "gradnorm"])
@pytest.mark.parametrize("lr", [-0.025, 0.0, math.nan, math.inf])
def test_a_learnt_weighting_refuses_a_rate_that_cannot_learn(weighting, lr):
    from uda.config import LossConfig
    from uda.objectives.base import ObjectiveError
    from uda.objectives.weighting import weighting_from_config

    tasks = ("semseg", "depth")
    with pytest.raises(ObjectiveError, match=rf"^loss.weighting_lr={lr}: loss.weighting={weighting} learns"):
        weighting_from_config(LossConfig(weighting=weighting, weighting_lr=lr), tasks)
    assert weighting_from_config(LossConfig(weighting=weighting, weighting_lr=0.01), tasks).kind == weighting
    # The fixed weighting and DWA learn nothing: the rate is not read.
    assert weighting_from_config(LossConfig(weighting="dwa", weighting_lr=lr), tasks).kind == "dwa"


# ------------------------------------------------------------------------ which tasks a run's weighting balances


def run_objectives(**sections):
    """The objectives of the tiny adaptation config with `sections` replaced (no data read)."""
    from dataclasses import replace
    from pathlib import Path

    from tests.conftest import tiny_config
    from uda.models.multitask import intermediate_scales
    from uda.objectives import RunContext, build_objectives
    from uda.tasks import output_space, task_channels

    cfg = tiny_config(Path("/no/data"), Path("/no/run"), adapt=True)
    model = replace(cfg.model, depth_output="disparity", output_scales=(0, 1, 2, 3))  # as photometric needs
    cfg = replace(cfg, adapt=None, model=model, **sections)
    channels = task_channels(cfg.tasks, 16)
    run = RunContext(cfg, cfg.tasks, channels, output_space(cfg, 16), intermediate_scales(cfg.model))
    return cfg, build_objectives(run)


def test_a_learnt_weighting_balances_the_tasks_with_per_task_terms():
    from dataclasses import replace

    from uda.config import PhotometricConfig, SelfTrainingConfig
    from uda.objectives import ObjectiveError
    from uda.objectives.weighting import weighted_tasks, weighting_from_config

    # Supervised source depth, photometric target depth: both tasks have supervised terms.
    cfg, objectives = run_objectives(photometric=PhotometricConfig(domain="target"))
    assert weighted_tasks(objectives, cfg.tasks) == ("semseg", "depth")
    # Photometric source depth (the SDE recipe): depth's loss is the photometric objective's own total.
    cfg, objectives = run_objectives(photometric=PhotometricConfig(domain="source"))
    assert weighted_tasks(objectives, cfg.tasks) == ("semseg",)
    for kind in ("gradnorm", "dwa"):
        loss = replace(cfg.loss, weighting=kind)
        with pytest.raises(
            ObjectiveError, match=rf"loss.weighting={kind} balances .*\['semseg'\].*\['depth'\]"
        ):
            weighting_from_config(loss, cfg.tasks, objectives)
    learnt = weighting_from_config(replace(cfg.loss, weighting="uncertainty"), cfg.tasks, objectives)
    assert learnt.tasks == ("semseg",) and set(learnt.log_vars) == {"semseg"}
    fixed = weighting_from_config(cfg.loss, cfg.tasks, objectives)
    assert fixed.tasks == ("semseg", "depth")  # fixed weights: nothing learnt, unchanged
    # Self-training pseudo-labels target depth: depth has per-task terms again.
    cfg, objectives = run_objectives(
        photometric=PhotometricConfig(domain="source"),
        self_training=SelfTrainingConfig(tasks=("semseg", "depth")),
    )
    assert weighted_tasks(objectives, cfg.tasks) == ("semseg", "depth")
    assert weighting_from_config(replace(cfg.loss, weighting="gradnorm"), cfg.tasks, objectives).tasks == (
        "semseg",
        "depth",
    )
