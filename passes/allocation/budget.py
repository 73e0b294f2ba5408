"""Budgets: what an allocation must respect, parsed from short strings.

``avg-bits=4``, ``size=40KB`` (B, KB/MB/GB = powers of 1000, KiB/MiB/GiB =
powers of 1024; a bare number is bytes), ``bops=1.2G`` (K/M/G/T), ``latency=2ms``
(s, ms, us/µs, ns; a bare number is seconds), ``accuracy-drop=0.5`` (percentage
points). Several combine with ``,`` or ``;`` (``"avg-bits=4,latency=2ms"``; in a
pipeline spec quote the value) and must all hold.

``accuracy-drop`` is not a linear cost: ``bisect_accuracy_drop`` turns it into
the lowest ``avg-bits`` budget whose plan an evaluation callback accepts.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.problem import AVG_BITS, BOPS, DIMENSIONS, LATENCY, SIZE, Plan, Problem

ACCURACY_DROP = "accuracy-drop"

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_TIME_UNITS = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ%]*)\s*")
_ALIASES = {"avg_bits": AVG_BITS, "avgbits": AVG_BITS, "bits": AVG_BITS, "bytes": SIZE,
            "accuracy_drop": ACCURACY_DROP, "bop": BOPS}


@dataclass(frozen=True)
class Budget:
    """Upper limits per dimension (``size`` bytes, ``avg-bits``, ``bops``, ``latency`` seconds), all must hold.

    ``accuracy_drop`` (percentage points) is kept apart: it needs an evaluation.
    """

    limits: Mapping[str, float] = field(default_factory=dict)
    accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        for dim, value in self.limits.items():
            if dim not in DIMENSIONS:
                raise UsageError(f"unknown budget {dim!r}; budgets are: {', '.join((*DIMENSIONS, ACCURACY_DROP))}")
            if not (value > 0 and math.isfinite(value)):
                raise UsageError(f"budget {dim}={value!r} must be a positive number")

    @property
    def empty(self) -> bool:
        return not self.limits and self.accuracy_drop is None

    def with_limit(self, dim: str, value: float) -> Budget:
        return Budget({**self.limits, dim: value}, self.accuracy_drop)

    def without_accuracy(self) -> Budget:
        return Budget(dict(self.limits))

    def violations(self, problem: Problem, plan: Mapping[str, int], rtol: float = 1e-9) -> dict[str, float]:
        """Dimension -> the plan's total, for each limit the plan exceeds."""
        out = {}
        for dim, limit in self.limits.items():
            value = problem.cost(plan, dim)
            if value > limit * (1 + rtol) + 1e-12:
                out[dim] = value
        return out

    def satisfied(self, problem: Problem, plan: Mapping[str, int]) -> bool:
        return not self.violations(problem, plan)

    def describe(self) -> str:
        parts = [f"{dim}={format_value(dim, v)}" for dim, v in self.limits.items()]
        if self.accuracy_drop is not None:
            parts.append(f"{ACCURACY_DROP}={self.accuracy_drop:g}")
        return ",".join(parts) or "none"


def format_value(dim: str, value: float) -> str:
    """A total in its dimension's natural unit: ``41.2KB``, ``3.75``, ``1.2G``, ``2.1ms``."""
    if dim == SIZE:
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if value >= scale:
                return f"{value / scale:.4g}{unit}"
        return f"{value:.0f}B"
    if dim == BOPS:
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= scale:
                return f"{value / scale:.4g}{unit}"
        return f"{value:.4g}"
    if dim == LATENCY:
        for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
            if value >= scale:
                return f"{value / scale:.4g}{unit}"
        return f"{value / 1e-9:.4g}ns"
    return f"{value:.4g}"


def _number(dim: str, text: str, units: Mapping[str, float], item: str) -> float:
    match = _NUMBER.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in units:
        known = ", ".join(u for u in units if u) or "none"
        raise UsageError(f"budget {item!r}: cannot read {text!r} as a {dim} value (units: {known})")
    return float(Decimal(match.group(1)) * Decimal(str(units[unit])))  # 0.3ms is 0.0003, not 0.00030000000000000003


def parse_budget(spec: str | Iterable[str] | Budget | None) -> Budget:
    """``"avg-bits=4,size=40KB"`` (or a list of such items) -> ``Budget``; one-line errors."""
    if spec is None:
        return Budget()
    if isinstance(spec, Budget):
        return spec
    items = [spec] if isinstance(spec, str) else list(spec)
    limits: dict[str, float] = {}
    drop: float | None = None
    for chunk in items:
        for item in re.split(r"[,;]", str(chunk)):
            if not item.strip():
                continue
            key, sep, text = item.partition("=")
            key = key.strip().lower()
            key = _ALIASES.get(key, key.replace("_", "-"))
            if not sep or not text.strip():
                raise UsageError(f"budget {item.strip()!r}: expected name=value, e.g. avg-bits=4 or size=40KB")
            if key == AVG_BITS:
                value = _number(key, text, {"": 1}, item.strip())
                if not 1 <= value <= 32:
                    raise UsageError(f"budget {item.strip()!r}: average bits must be between 1 and 32")
            elif key == SIZE:
                value = _number(key, text, _SIZE_UNITS, item.strip())
            elif key == BOPS:
                value = _number(key, text, _COUNT_UNITS, item.strip())
            elif key == LATENCY:
                value = _number(key, text, _TIME_UNITS, item.strip())
            elif key == ACCURACY_DROP:
                value = _number(key, text, {"": 1, "%": 1, "pt": 1, "points": 1}, item.strip())
                if value < 0:
                    raise UsageError(f"budget {item.strip()!r}: an accuracy drop cannot be negative")
                drop = value
                continue
            else:
                raise UsageError(f"budget {item.strip()!r}: unknown budget {key!r}; budgets are: "
                                 f"{', '.join((*DIMENSIONS, ACCURACY_DROP))}")
            if value <= 0:
                raise UsageError(f"budget {item.strip()!r}: must be positive")
            if key in limits:
                raise UsageError(f"budget {key!r} is given twice")
            limits[key] = value
    return Budget(limits, drop)


# --------------------------------------------------------------------------- feasibility
def check_feasible(problem: Problem, budget: Budget) -> None:
    """Raise a ``UsageError`` that says the smallest achievable value when ``budget`` cannot be met."""
    for dim, limit in budget.limits.items():
        unknown = problem.unknown_layers(dim)
        if unknown:
            why = {LATENCY: "the latency table has no entry for every width of",
                   BOPS: "BOPs need the output size of every layer; shape inference found none for"}.get(
                dim, "no cost is known for")
            raise UsageError(f"cannot budget {dim}: {why} layer(s) {', '.join(unknown[:8])}"
                             f"{' …' if len(unknown) > 8 else ''}")
        smallest = problem.cheapest(dim)
        if smallest > limit * (1 + 1e-9) + 1e-12:
            raise UsageError(f"budget {dim}={format_value(dim, limit)} cannot be met: the smallest achievable "
                             f"{dim} is {format_value(dim, smallest)} (every layer at its cheapest width)")
    if len(budget.limits) > 1:
        from bitpass.passes.allocation.solvers import milp_min_cost

        dims = list(budget.limits)
        for dim in dims:
            others = Budget({d: v for d, v in budget.limits.items() if d != dim})
            smallest = milp_min_cost(problem, dim, others)
            if smallest is None:
                continue  # the other budgets alone are infeasible: reported when it is their turn
            if smallest > budget.limits[dim] * (1 + 1e-9) + 1e-12:
                raise UsageError(
                    f"budgets {budget.describe()} cannot all hold: with {others.describe()}, the smallest "
                    f"achievable {dim} is {format_value(dim, smallest)}")


# --------------------------------------------------------------------------- accuracy drop
@dataclass
class AccuracySearch:
    """What ``bisect_accuracy_drop`` found: the plan, its avg-bits budget and every evaluation made."""

    plan: Plan
    avg_bits: float
    baseline: float
    accuracy: float
    evaluations: list[dict[str, Any]]
    result: Any = None  # the solver's Allocation for ``plan``


def bisect_accuracy_drop(
    problem: Problem,
    evaluate: Callable[[Plan], float],
    max_drop: float,
    solver: str | Callable[..., Any] = "ilp",
    *,
    budget: Budget | None = None,
    scale: float = 100.0,
    tolerance: float = 0.05,
    max_evaluations: int = 20,
) -> AccuracySearch:
    """The lowest average bits whose plan loses at most ``max_drop`` points of accuracy.

    Bisection on an ``avg-bits`` budget between the smallest achievable and the
    highest plan's: each step solves the allocation with ``solver`` under
    ``avg-bits ≤ mid`` (and the other limits of ``budget``) and calls
    ``evaluate(plan)``. Accuracy is assumed to grow with bits (monotone).
    ``scale`` converts ``evaluate``'s unit to points: 100 when it returns a
    fraction in [0, 1], 1 when it returns percent. Stops when the bracket is
    narrower than ``tolerance`` bits or after ``max_evaluations`` calls;
    identical plans are evaluated once.
    """
    from bitpass.passes.allocation.solvers import solve

    base_budget = (budget or Budget()).without_accuracy()
    cache: dict[tuple[tuple[str, int], ...], float] = {}
    evaluations: list[dict[str, Any]] = []

    def accuracy_of(plan: Plan, avg: float | None) -> float:
        key = tuple(sorted(plan.items()))
        if key not in cache:
            if len(cache) >= max_evaluations:
                raise _Exhausted
            cache[key] = float(evaluate(dict(plan)))
            evaluations.append({"avg_bits_budget": avg, "avg_bits": problem.cost(plan, AVG_BITS),
                                "accuracy": cache[key], "plan": dict(plan)})
        return cache[key]

    top = problem.highest_plan()
    if not base_budget.satisfied(problem, top):
        top = solve(problem, base_budget, solver).plan
    baseline = accuracy_of(top, None)

    def acceptable(acc: float) -> bool:
        return (baseline - acc) * scale <= max_drop + 1e-12

    lo = problem.cheapest(AVG_BITS)
    hi = problem.cost(top, AVG_BITS)
    best_plan, best_avg, best_acc, best_result = top, hi, baseline, None
    try:
        try:
            low_result = solve(problem, base_budget.with_limit(AVG_BITS, _limit(base_budget, lo)), solver)
        except UsageError:  # the other budgets rule out the lowest average: bisect from there
            low_result = None
        if low_result is not None and acceptable(acc := accuracy_of(low_result.plan, lo)):
            return AccuracySearch(low_result.plan, lo, baseline, acc, evaluations, low_result)
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            try:
                result = solve(problem, base_budget.with_limit(AVG_BITS, _limit(base_budget, mid)), solver)
            except UsageError:
                lo = mid
                continue
            acc = accuracy_of(result.plan, mid)
            if acceptable(acc):
                hi = min(mid, problem.cost(result.plan, AVG_BITS))
                best_plan, best_avg, best_acc, best_result = result.plan, mid, acc, result
            else:
                lo = mid
    except _Exhausted:
        pass
    return AccuracySearch(best_plan, best_avg, baseline, best_acc, evaluations, best_result)


def _limit(budget: Budget, avg: float) -> float:
    existing = budget.limits.get(AVG_BITS)
    return avg if existing is None else min(avg, existing)


class _Exhausted(Exception):
    pass
