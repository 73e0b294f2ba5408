"""Budget strings, feasibility messages and the accuracy-drop bisection."""

from __future__ import annotations

import pytest

from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.budget import Budget, bisect_accuracy_drop, check_feasible, parse_budget
from bitpass.passes.allocation.problem import Problem


def two_layer_problem() -> Problem:
    loss = {"a": {32: 0.0, 8: 1.0, 4: 4.0, 2: 16.0}, "b": {32: 0.0, 8: 2.0, 4: 8.0, 2: 32.0}}
    # 16 and 48 output channels of 64 weights: two 32-weight blocks per channel at 4 and 2 bits
    return Problem.from_tables({"a": 1024, "b": 3072}, loss, macs={"a": 10_000, "b": 30_000},
                               channels={"a": 16, "b": 48})


@pytest.mark.parametrize(("text", "dim", "value"), [
    ("avg-bits=4", "avg-bits", 4.0),
    ("avg_bits=4.5", "avg-bits", 4.5),
    ("size=40KB", "size", 40_000.0),
    ("size=40KiB", "size", 40 * 1024.0),
    ("size=1.5MB", "size", 1.5e6),
    ("size=2MiB", "size", 2 * 2**20),
    ("size=1234", "size", 1234.0),
    ("size=512B", "size", 512.0),
    ("bops=1.2G", "bops", 1.2e9),
    ("bops=300M", "bops", 3e8),
    ("bops=5e9", "bops", 5e9),
    ("latency=2ms", "latency", 2e-3),
    ("latency=150us", "latency", 150e-6),
    ("latency=0.5s", "latency", 0.5),
    ("latency=0.002", "latency", 0.002),
])
def test_parses_each_dimension_with_its_units(text, dim, value):
    budget = parse_budget(text)
    assert budget.limits == {dim: pytest.approx(value)}
    assert budget.accuracy_drop is None


def test_accuracy_drop_is_kept_apart_in_points():
    budget = parse_budget("accuracy-drop=0.5")
    assert budget.limits == {}
    assert budget.accuracy_drop == 0.5


def test_several_budgets_combine_and_all_hold():
    budget = parse_budget("avg-bits=4, size=40KB; latency=2ms")
    assert budget.limits == {"avg-bits": 4.0, "size": 40_000.0, "latency": pytest.approx(0.002)}
    assert parse_budget(["avg-bits=4", "bops=1G"]).limits == {"avg-bits": 4.0, "bops": 1e9}
    assert Budget.__name__ and parse_budget(budget) is budget


@pytest.mark.parametrize(("text", "message"), [
    ("avg-bits", "expected name=value"),
    ("speed=3", "unknown budget 'speed'"),
    ("size=40XB", "cannot read '40XB'"),
    ("latency=2 parsecs", "cannot read"),
    ("avg-bits=0.5", "between 1 and 32"),
    ("avg-bits=four", "cannot read 'four'"),
    ("size=0", "must be positive"),
    ("avg-bits=4,avg-bits=3", "given twice"),
    ("accuracy-drop=-1", "cannot read"),
])
def test_bad_budget_strings_are_one_line_usage_errors(text, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_an_impossible_budget_says_the_smallest_achievable_value():
    problem = two_layer_problem()  # every layer at 2 bits is the floor
    with pytest.raises(UsageError, match=r"avg-bits=1.5 cannot be met: the smallest achievable avg-bits is 2"):
        check_feasible(problem, parse_budget("avg-bits=1.5"))
    with pytest.raises(UsageError, match=r"the smallest achievable size is 1.536KB"):
        check_feasible(problem, parse_budget("size=1KB"))  # 4096 × 2/8 = 1024 B + 128 blocks × 4 B


def test_budgets_that_hold_alone_but_not_together_are_reported_together():
    problem = two_layer_problem()
    # latency ≤ 0.5 needs b at 8 bits (its only fast width); then avg-bits ≤ 6.4 would need a below 2 bits
    latency = {"a": {32: 1.0, 8: 0.1, 4: 0.1, 2: 0.1}, "b": {32: 1.0, 8: 0.1, 4: 0.9, 2: 0.9}}
    problem = Problem.from_tables({"a": 1000, "b": 3000}, {"a": {32: 0, 8: 1, 4: 4, 2: 16},
                                                           "b": {32: 0, 8: 2, 4: 8, 2: 32}}, latency=latency)
    check_feasible(problem, parse_budget("avg-bits=6.5"))
    check_feasible(problem, parse_budget("latency=0.5"))
    with pytest.raises(UsageError, match="cannot all hold"):
        check_feasible(problem, parse_budget("avg-bits=6.4,latency=0.5"))


def test_a_latency_budget_without_a_latency_table_is_an_error():
    with pytest.raises(UsageError, match="latency table has no entry"):
        check_feasible(two_layer_problem(), parse_budget("latency=1ms"))


def synthetic_accuracy(problem: Problem):
    """A monotone stand-in for a real evaluation: accuracy 0.99 minus 0.001 per unit of ΣΩ."""
    calls = []

    def evaluate(plan):
        calls.append(dict(plan))
        return 0.99 - 0.001 * problem.loss(plan)

    return evaluate, calls


def test_accuracy_drop_bisection_finds_the_lowest_average_within_tolerance():
    problem = two_layer_problem()
    evaluate, calls = synthetic_accuracy(problem)
    search = bisect_accuracy_drop(problem, evaluate, max_drop=1.0, solver="ilp")  # 1 point = 10 units of Ω
    assert search.baseline == pytest.approx(0.99)
    assert (search.baseline - search.accuracy) * 100 <= 1.0 + 1e-9
    assert problem.loss(search.plan) <= 10.0
    # the lowest average with ΣΩ ≤ 10 is a=8 (Ω 1) + b=4 (Ω 8): avg (8·1 + 4·3) / 4 = 5
    assert search.plan == {"a": 8, "b": 4}
    assert len(calls) == len({tuple(sorted(c.items())) for c in calls}), "each plan evaluated once"


def test_accuracy_drop_large_enough_returns_the_cheapest_plan_after_two_evaluations():
    problem = two_layer_problem()
    evaluate, calls = synthetic_accuracy(problem)
    search = bisect_accuracy_drop(problem, evaluate, max_drop=50.0)
    assert search.plan == {"a": 2, "b": 2}
    assert len(calls) == 2


def test_accuracy_drop_zero_keeps_the_lossless_plan():
    problem = two_layer_problem()
    evaluate, _ = synthetic_accuracy(problem)
    search = bisect_accuracy_drop(problem, evaluate, max_drop=0.0, solver="greedy")
    assert problem.loss(search.plan) == 0.0


def test_accuracy_search_respects_the_other_budgets():
    problem = two_layer_problem()
    evaluate, _ = synthetic_accuracy(problem)
    search = bisect_accuracy_drop(problem, evaluate, max_drop=0.0, budget=parse_budget("avg-bits=6"))
    assert problem.cost(search.plan, "avg-bits") <= 6
