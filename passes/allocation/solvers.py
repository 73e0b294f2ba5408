"""Solvers for the bit-allocation problem, chosen by name; same input, same output.

``solve(problem, budget, method)`` -> ``Allocation`` (the {layer_id: bits} plan,
its totals, ΣΩ, the solver's name and seconds; ``pareto`` adds the frontier).
Every solver first checks that the budget can be met at all
(``check_feasible``: a ``UsageError`` saying the smallest achievable value).

Which one to use:

* ``ilp`` (default): exact. Binary ``x[l,b]``, one width per layer, every
  budget a linear constraint, minimise ΣΩ; HiGHS via ``scipy.optimize.milp``.
  Use it whenever Ω is trusted and costs add up per layer, which is the case
  for every budget here; it handles combined budgets exactly and solves 200
  layers × 4 widths in well under a second.
* ``pareto``: HAWQ-V2/ZeroQ. The whole (cost, ΣΩ) frontier of one dimension
  by dynamic programming on a discretised cost, then the best frontier point
  within the budget. Use it to *see* the trade-off (``sweep``, the report's
  Pareto plot) or to pick a point by hand; exact up to the discretisation.
* ``baq``: closed-form equal-loss allocation (rate-distortion),
  ``b_l = b̄ + ½ log2(s_l σ_l² / G)``, rounded to the available widths and
  repaired to meet the budget. Use it when Ω is only a rough ranking (no
  per-layer quantization error, untrusted sensitivity scale) or as an
  explainable baseline: it depends only on ``s_l σ_l²``, not on the measured Ω.
* ``greedy``: start at the highest width, repeatedly drop the layer with the
  smallest ΔΩ/Δcost until within budget. Use it for very large problems, or to
  reproduce the common heuristic; it is not optimal (it can overshoot the
  budget by one big step).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitpass.frontend.errors import BitpassError, UsageError
from bitpass.passes.allocation.budget import Budget, check_feasible, parse_budget
from bitpass.passes.allocation.problem import AVG_BITS, DIMENSIONS, FLOAT_BITS, Plan, Problem


class FrontierPoint:
    """One Pareto-optimal plan: its total in the frontier's dimension, its ΣΩ, its totals in every known one.

    ``plan`` is built on first use (frontiers of large models hold thousands of points).
    """

    __slots__ = ("cost", "loss", "totals", "_ids", "_bits", "_plan")

    def __init__(self, cost: float, loss: float, ids: Sequence[str], bits: np.ndarray,
                 totals: Mapping[str, float]) -> None:
        self.cost, self.loss, self.totals = cost, loss, dict(totals)
        self._ids, self._bits, self._plan = ids, bits, None

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = dict(zip(self._ids, self._bits.tolist()))
        return dict(self._plan)

    def as_record(self) -> dict[str, Any]:
        return {"cost": self.cost, "loss": self.loss, "totals": dict(self.totals)}

    def __repr__(self) -> str:
        return f"FrontierPoint(cost={self.cost:.6g}, loss={self.loss:.6g})"


@dataclass
class Allocation:
    """A solver's answer: the plan and what it costs."""

    plan: Plan
    totals: dict[str, float]
    loss: float
    solver: str
    seconds: float = 0.0
    frontier: list[FrontierPoint] | None = None
    frontier_dimension: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- dispatch
def solve(problem: Problem, budget: Budget | str | None, method: str | Callable[..., Plan] = "ilp",
          **options: Any) -> Allocation:
    """Allocate bits with solver ``method`` (a name in ``SOLVERS`` or a callable ``(problem, budget) -> plan``)."""
    budget = parse_budget(budget)
    if callable(method):
        name, fn = getattr(method, "__name__", "custom"), method
    else:
        if method not in SOLVERS:
            raise UsageError(f"unknown allocation method {method!r}; methods: {', '.join(SOLVERS)}")
        name, fn = method, SOLVERS[method]
    start = time.perf_counter()
    check_feasible(problem, budget)
    out = fn(problem, budget, **options)
    allocation = out if isinstance(out, Allocation) else Allocation(dict(out), {}, 0.0, name)
    allocation.seconds = time.perf_counter() - start
    allocation.solver = name
    allocation.totals = problem.totals(allocation.plan)
    allocation.loss = allocation.totals["loss"]
    over = budget.violations(problem, allocation.plan, rtol=1e-6)
    if over:
        raise BitpassError(f"solver {name!r} returned a plan over budget ({over}); this is a bug")
    return allocation


# --------------------------------------------------------------------------- ILP
def _flat(problem: Problem) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(losses, offsets, bits) of the flattened variables x[l, k]."""
    losses, offsets, bits = [], [0], []
    for layer in problem.layers:
        losses.extend(c.loss for c in layer.candidates)
        bits.extend(c.bits for c in layer.candidates)
        offsets.append(offsets[-1] + len(layer.candidates))
    return np.asarray(losses, dtype=float), offsets, np.asarray(bits)


@contextlib.contextmanager
def _quiet_c_stdout() -> Iterator[None]:
    """Drop what C code prints on fd 1 meanwhile: HiGHS 1.12 prints a stray debug line
    (``HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();``,
    ERGO-Code/HiGHS#2783) even with output off, which would corrupt the driver's stdout."""
    fd = 1  # C's stdout, whatever Python's sys.stdout is
    try:
        saved = os.dup(fd)
    except OSError:  # fd 1 is closed: nothing to guard
        yield
        return
    libc = None
    try:
        import ctypes

        libc = ctypes.CDLL(None)
    except OSError:
        pass
    if sys.stdout is not None:
        sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        if libc is not None:
            libc.fflush(None)  # C stdio buffers go to /dev/null, not to the restored stdout
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _milp(problem: Problem, objective: np.ndarray, budget: Budget, time_limit: float | None = None) -> Plan | None:
    """Solve the one-width-per-layer MILP; None when infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, vstack

    _, offsets, _ = _flat(problem)
    n_vars, n_layers = offsets[-1], len(problem.layers)
    rows = np.repeat(np.arange(n_layers), np.diff(offsets))
    one_each = csr_matrix((np.ones(n_vars), (rows, np.arange(n_vars))), shape=(n_layers, n_vars))
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budget.limits:
        dims = list(budget.limits)
        matrix = np.vstack([np.concatenate(problem.cost_matrix(d)) for d in dims])
        room = np.array([budget.limits[d] - problem.base.get(d, 0.0) for d in dims])
        norm = np.where(np.abs(room) > 0, np.abs(room), 1.0)  # rows scaled to a limit of ±1
        constraints.append(LinearConstraint(vstack([csr_matrix(matrix / norm[:, None])]), -np.inf, room / norm))
    scale = float(np.max(np.abs(objective))) or 1.0
    options: dict[str, Any] = {"mip_rel_gap": 1e-9}
    if time_limit is not None:
        options["time_limit"] = time_limit
    with _quiet_c_stdout():
        result = milp(objective / scale, integrality=np.ones(n_vars), bounds=Bounds(0, 1), constraints=constraints,
                      options=options)
    if result.x is None:
        return None
    plan = {}
    for layer, start, stop in zip(problem.layers, offsets[:-1], offsets[1:]):
        k = int(np.argmax(result.x[start:stop]))
        plan[layer.id] = layer.candidates[k].bits
    return plan


def solve_ilp(problem: Problem, budget: Budget, *, time_limit: float | None = None) -> Plan:
    """Exact: minimise ΣΩ over one width per layer under every linear budget (HiGHS branch and bound)."""
    losses, _, bits = _flat(problem)
    # Among plans of equal loss prefer more bits (ties occur when Ω is 0, e.g. fp32 vs 16-bit).
    tie = -bits / bits.max() * (1e-9 * (float(np.max(np.abs(losses))) or 1.0)) / max(len(problem.layers), 1)
    plan = _milp(problem, losses + tie, budget, time_limit)
    if plan is None:
        raise UsageError(f"no plan meets the budget {budget.describe()}")
    return plan


def milp_min_cost(problem: Problem, dim: str, budget: Budget) -> float | None:
    """The smallest total in ``dim`` over plans that meet ``budget`` (None: none does)."""
    objective = np.concatenate(problem.cost_matrix(dim))
    plan = _milp(problem, objective, budget)
    return None if plan is None else problem.cost(plan, dim)


# --------------------------------------------------------------------------- Pareto (dynamic programming)
def pareto_frontier(problem: Problem, dim: str = AVG_BITS, resolution: int | None = None) -> list[FrontierPoint]:
    """The (cost in ``dim``, ΣΩ) Pareto frontier, cheapest first, by DP over layers.

    Each layer's cost above its cheapest width is rounded to a grid of
    ``span / resolution`` (span = the whole range of the total; default
    resolution ``max(2000, 100 × layers)``), the DP keeps the least ΣΩ for
    every grid total, and the frontier is read off with exact totals. Exact for
    costs on the grid; otherwise a point may be off by at most
    ``layers × span / (2 × resolution)`` in cost.
    """
    costs = problem.cost_matrix(dim)
    if any(np.isnan(c).any() for c in costs):
        raise UsageError(f"cannot build a {dim} frontier: no {dim} cost for layer(s) "
                         f"{', '.join(problem.unknown_layers(dim))}")
    n_layers = len(problem.layers)
    resolution = resolution or max(2000, 100 * n_layers)
    losses = problem.loss_matrix()
    rel = [c - c.min() for c in costs]
    span = float(sum(r.max() for r in rel))
    unit = span / resolution if span > 0 else 1.0
    steps = [np.rint(r / unit).astype(np.int64) for r in rel]
    width = int(sum(int(s.max()) for s in steps)) + 1
    best = np.full(width, np.inf)
    best[0] = 0.0
    choice = np.zeros((n_layers, width), dtype=np.int16)
    reach = 0
    for index, (step, loss) in enumerate(zip(steps, losses)):
        new = np.full(width, np.inf)
        pick = choice[index]
        for k in range(len(step)):
            shift = int(step[k])
            candidate = np.full(width, np.inf)
            candidate[shift:shift + reach + 1] = best[:reach + 1] + loss[k]
            better = candidate < new
            new[better] = candidate[better]
            pick[better] = k
        reach += int(step.max())
        best = new
    # grid totals where ΣΩ strictly improves on every cheaper one
    running = np.minimum.accumulate(best)
    improves = np.ones(width, dtype=bool)
    improves[1:] = best[1:] < running[:-1] - 1e-12 * np.maximum(1.0, np.abs(running[:-1]))
    improves &= np.isfinite(best)
    at = np.flatnonzero(improves)
    picks = np.zeros((n_layers, at.size), dtype=np.int64)
    for index in range(n_layers - 1, -1, -1):
        k = choice[index, at].astype(np.int64)
        picks[index] = k
        at = at - steps[index][k]
    # exact totals of every point in every known dimension, vectorised over points
    dims = [d for d in DIMENSIONS if problem.known(d)]
    exact = {d: problem.base.get(d, 0.0) + sum(m[k] for m, k in zip(problem.cost_matrix(d), picks)) for d in dims}
    exact_loss = sum(m[k] for m, k in zip(losses, picks))
    order = np.lexsort((exact_loss, exact[dim]))
    keep = []
    floor = np.inf
    for p in order:  # exact totals can reorder neighbours: keep the non-dominated points
        if exact_loss[p] < floor:
            keep.append(p)
            floor = exact_loss[p]
    keep_at = np.asarray(keep, dtype=np.int64)
    bits, _, _ = _padded(problem, ())
    plans = bits[np.arange(n_layers)[:, None], picks[:, keep_at]].T.copy()
    ids = problem.ids
    return [FrontierPoint(float(exact[dim][p]), float(exact_loss[p]), ids, plans[row],
                          {d: float(exact[d][p]) for d in dims}) for row, p in enumerate(keep)]


def solve_pareto(problem: Problem, budget: Budget, *, dimension: str | None = None,
                 resolution: int | None = None) -> Allocation:
    """HAWQ-V2/ZeroQ: the frontier of the budget's first dimension, then its best point within every budget."""
    dim = dimension or next(iter(budget.limits), AVG_BITS)
    frontier = pareto_frontier(problem, dim, resolution)
    fitting = [p for p in frontier
               if all(p.totals[d] <= limit * (1 + 1e-9) + 1e-12 for d, limit in budget.limits.items())]
    if not fitting:
        raise UsageError(f"no point of the {dim} Pareto frontier meets {budget.describe()} (the frontier follows "
                         f"{dim} only): use method=ilp for combined budgets")
    chosen = min(fitting, key=lambda p: (p.loss, p.cost))
    return Allocation(chosen.plan, {}, chosen.loss, "pareto", frontier=frontier, frontier_dimension=dim)


# --------------------------------------------------------------------------- BAQ (closed form)
def _distortion(problem: Problem) -> np.ndarray:
    """``s_l σ_l²`` per layer; where unknown, from Ω at the lowest width: Ω(b) ≈ D × 4^-b."""
    out = []
    for layer in problem.layers:
        if layer.distortion is not None and layer.distortion > 0:
            out.append(layer.distortion)
            continue
        value = 0.0
        for c in sorted(layer.candidates, key=lambda c: c.bits):
            if c.bits < FLOAT_BITS and c.loss > 0:
                value = c.loss * 4.0 ** c.bits
                break
        out.append(value)
    d = np.asarray(out, dtype=float)
    positive = d[d > 0]
    floor = positive.min() * 1e-6 if positive.size else 1.0
    return np.maximum(d, floor)


def baq_bits(problem: Problem, mean_bits: float) -> np.ndarray:
    """The real-valued closed form ``b_l = b̄ + ½ log2(s_l σ_l² / G)``, G the parameter-weighted geometric mean.

    With parameter weights the allocation's average is exactly ``b̄`` before rounding.
    """
    d = _distortion(problem)
    n = np.array([max(layer.params, 1) for layer in problem.layers], dtype=float)
    log_g = float(np.sum(n * np.log2(d)) / np.sum(n))
    return mean_bits + 0.5 * (np.log2(d) - log_g)


def _round(problem: Problem, target: np.ndarray) -> Plan:
    plan = {}
    for layer, t in zip(problem.layers, target):
        widths = sorted(layer.widths)
        plan[layer.id] = min(widths, key=lambda b: (abs(b - t), -b))
    return plan


def solve_baq(problem: Problem, budget: Budget) -> Plan:
    """Equal-loss closed form, rounded to the nearest available width, then repaired to the budget.

    ``b̄`` is the ``avg-bits`` budget when there is one; otherwise (and when
    rounding overshoots) the largest ``b̄`` whose rounded plan meets every budget
    is found by bisection. A plan no ``b̄`` makes feasible is repaired greedily;
    leftover budget is then spent greedily on the best ΔΩ/Δcost upgrades.
    """
    if not budget.limits:
        return problem.highest_plan()
    start = budget.limits.get(AVG_BITS)
    plan = _round(problem, baq_bits(problem, start)) if start is not None else None
    if plan is None or not budget.satisfied(problem, plan):
        lo, hi = -40.0, float(start if start is not None else FLOAT_BITS)
        plan = None
        if budget.satisfied(problem, candidate := _round(problem, baq_bits(problem, lo))):
            for _ in range(50):
                mid = (lo + hi) / 2
                if budget.satisfied(problem, _round(problem, baq_bits(problem, mid))):
                    lo = mid
                else:
                    hi = mid
            plan = _round(problem, baq_bits(problem, lo))
        if plan is None:
            plan = _greedy_down(problem, budget, candidate)
    return _greedy_up(problem, budget, plan)


# --------------------------------------------------------------------------- greedy
def _padded(problem: Problem, dims: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    width = max(len(layer.candidates) for layer in problem.layers)
    n = len(problem.layers)
    bits = np.full((n, width), -1)
    loss = np.full((n, width), np.inf)
    cost = {d: np.full((n, width), np.inf) for d in dims}
    for i, layer in enumerate(problem.layers):
        for k, c in enumerate(layer.candidates):
            bits[i, k] = c.bits
            loss[i, k] = c.loss
            for d in dims:
                cost[d][i, k] = c.cost[d]
    return bits, loss, cost


def _greedy_down(problem: Problem, budget: Budget, plan: Plan | None = None) -> Plan:
    """Lower one layer at a time, smallest ΔΩ per unit of (normalised) over-budget cost removed, until within."""
    plan = dict(plan or problem.highest_plan())
    dims = list(budget.limits)
    bits, loss, cost = _padded(problem, dims)
    rows = np.arange(len(problem.layers))
    index = np.array([list(layer.widths).index(plan[layer.id]) for layer in problem.layers])
    while over := budget.violations(problem, plan):
        gain = np.zeros_like(loss)
        for d in over:
            now = cost[d][rows, index][:, None]
            gain += np.maximum(0.0, now - cost[d]) / budget.limits[d]
        valid = (bits >= 0) & (bits < bits[rows, index][:, None]) & (gain > 0)
        if not valid.any():
            raise UsageError(f"greedy allocation is stuck over budget {budget.describe()}: use method=ilp")
        delta = loss - loss[rows, index][:, None]
        ratio = np.where(valid, delta / np.where(valid, gain, 1.0), np.inf)
        # smallest ΔΩ/Δcost; among equals the bigger saving
        flat = np.lexsort((-np.where(valid, gain, -np.inf).ravel(), ratio.ravel()))[0]
        i, k = divmod(int(flat), loss.shape[1])
        index[i] = k
        plan[problem.layers[i].id] = int(bits[i, k])
    return plan


def _greedy_up(problem: Problem, budget: Budget, plan: Plan) -> Plan:
    """Spend leftover budget: raise the layer with the largest ΔΩ drop per unit of cost while all budgets hold."""
    plan = dict(plan)
    dims = list(budget.limits)
    totals = {d: problem.cost(plan, d) for d in dims}
    while True:
        best: tuple[float, int, Any] | None = None
        for i, layer in enumerate(problem.layers):
            current = layer.candidate(plan[layer.id])
            for c in layer.candidates:
                if c.loss >= current.loss:
                    continue
                after = {d: totals[d] - current.cost[d] + c.cost[d] for d in dims}
                if any(after[d] > budget.limits[d] * (1 + 1e-9) + 1e-12 for d in dims):
                    continue
                spent = sum(max(0.0, c.cost[d] - current.cost[d]) / budget.limits[d] for d in dims)
                score = (current.loss - c.loss) / (spent + 1e-12)
                if best is None or score > best[0]:
                    best = (score, i, c)
        if best is None:
            return plan
        _, i, c = best
        layer = problem.layers[i]
        current = layer.candidate(plan[layer.id])
        for d in dims:
            totals[d] += c.cost[d] - current.cost[d]
        plan[layer.id] = c.bits


def solve_greedy(problem: Problem, budget: Budget) -> Plan:
    """Start every layer at its highest width; drop the smallest-ΔΩ/Δcost step until the budget holds."""
    return _greedy_down(problem, budget, problem.highest_plan())


#: solver name -> function(problem, budget, **options) -> plan or Allocation
SOLVERS: Mapping[str, Callable[..., Any]] = {
    "ilp": solve_ilp,
    "pareto": solve_pareto,
    "baq": solve_baq,
    "greedy": solve_greedy,
}
