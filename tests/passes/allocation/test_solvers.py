"""The four solvers on synthetic problems: budgets met, ILP optimal, frontier sound, BAQ and greedy sensible."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from bitpass.frontend.errors import UsageError
from bitpass.passes.allocation.budget import parse_budget
from bitpass.passes.allocation import problem as problem_module
from bitpass.passes.allocation.problem import Problem
from bitpass.passes.allocation.solvers import SOLVERS, pareto_frontier, solve

WIDTHS = (32, 8, 4, 2)


def random_problem(layers: int, seed: int = 0, *, latency: bool = False) -> Problem:
    return problem_module.random_problem(layers, seed, widths=WIDTHS, latency=latency)


def brute_force(problem: Problem, budget) -> tuple[float, dict[str, int]]:
    """The true optimum by trying every plan."""
    best = (np.inf, {})
    for combo in itertools.product(*(layer.widths for layer in problem.layers)):
        plan = dict(zip(problem.ids, combo))
        if budget.satisfied(problem, plan):
            loss = problem.loss(plan)
            if loss < best[0]:
                best = (loss, plan)
    return best


def between(problem: Problem, dim: str, fraction: float) -> float:
    """A budget a ``fraction`` of the way from the cheapest to the most expensive plan."""
    low, high = problem.cheapest(dim), problem.cost(problem.highest_plan(), dim)
    return low + fraction * (high - low)


BUDGETS = ["avg-bits", "size", "bops", "latency"]


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("dim", BUDGETS)
def test_every_solver_meets_every_kind_of_budget(method, dim):
    problem = random_problem(12, seed=1, latency=True)
    for fraction in (0.05, 0.3, 0.7):
        budget = parse_budget(f"{dim}={between(problem, dim, fraction)!r}")
        allocation = solve(problem, budget, method)
        assert budget.satisfied(problem, allocation.plan)
        assert allocation.solver == method
        assert set(allocation.plan) == set(problem.ids)
        assert allocation.totals[dim] == pytest.approx(problem.cost(allocation.plan, dim))
        assert allocation.loss == pytest.approx(problem.loss(allocation.plan))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dim", ["avg-bits", "size", "latency"])
def test_ilp_is_optimal_against_brute_force(seed, dim):
    problem = random_problem(6, seed=seed, latency=True)  # 4^6 = 4096 plans
    budget = parse_budget(f"{dim}={between(problem, dim, 0.25 + 0.1 * seed)!r}")
    best_loss, _ = brute_force(problem, budget)
    allocation = solve(problem, budget, "ilp")
    assert allocation.loss == pytest.approx(best_loss, rel=1e-9, abs=1e-12)


def test_ilp_is_optimal_under_combined_budgets():
    problem = random_problem(6, seed=11, latency=True)
    budget = parse_budget(f"avg-bits={between(problem, 'avg-bits', 0.5)!r},"
                          f"latency={between(problem, 'latency', 0.2)!r},bops={between(problem, 'bops', 0.4)!r}")
    best_loss, _ = brute_force(problem, budget)
    allocation = solve(problem, budget, "ilp")
    assert budget.satisfied(problem, allocation.plan)
    assert allocation.loss == pytest.approx(best_loss, rel=1e-9)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_combined_budgets_all_hold_for_every_solver(method):
    problem = random_problem(10, seed=5, latency=True)
    budget = parse_budget(f"avg-bits={between(problem, 'avg-bits', 0.6)!r},size={between(problem, 'size', 0.5)!r}")
    allocation = solve(problem, budget, method)
    assert budget.satisfied(problem, allocation.plan)


def test_ilp_on_200_layers_by_4_widths_is_fast():
    """The issue asks for under 1 s; measured ~0.1-0.2 s here. The bound is loose for a shared 2-core machine."""
    problem = random_problem(200, seed=3)
    budget = parse_budget("avg-bits=4")
    solve(problem, parse_budget("avg-bits=6"), "ilp")  # import scipy outside the timing
    start = time.perf_counter()
    allocation = solve(problem, budget, "ilp")
    assert time.perf_counter() - start < 10
    assert budget.satisfied(problem, allocation.plan)


def test_pareto_frontier_is_monotone_and_contains_the_ilp_optimum():
    problem = random_problem(6, seed=2)
    frontier = pareto_frontier(problem, "size")
    costs = [p.cost for p in frontier]
    losses = [p.loss for p in frontier]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert all(a > b for a, b in zip(losses, losses[1:])), "ΣΩ strictly falls as cost rises"
    assert frontier[0].cost == pytest.approx(problem.cheapest("size"))
    assert frontier[-1].loss == pytest.approx(0.0)  # all fp32
    for point in frontier:
        assert point.cost == pytest.approx(problem.cost(point.plan, "size"))
        assert point.loss == pytest.approx(problem.loss(point.plan))
    span = problem.cost(problem.highest_plan(), "size") - problem.cheapest("size")
    slack = len(problem.layers) * span / 2000  # the DP grid's worst-case rounding
    for fraction in (0.1, 0.3, 0.5, 0.8):
        budget = parse_budget(f"size={between(problem, 'size', fraction)!r}")
        optimum = solve(problem, budget, "ilp")
        assert any(p.cost <= optimum.totals["size"] + slack and p.loss <= optimum.loss * (1 + 1e-9)
                   for p in frontier)


def test_pareto_frontier_equals_brute_force_frontier_on_grid_costs():
    """avg-bits costs of equal-size layers lie on a grid: the DP frontier is then exact."""
    params = {f"l{i}": 1000 for i in range(5)}
    rng = np.random.default_rng(7)
    loss = {i: {b: 0.0 if b == 32 else rng.uniform(0.5, 2) * 4.0 ** -b for b in WIDTHS} for i in params}
    problem = Problem.from_tables(params, loss)
    points = {}
    for combo in itertools.product(*(layer.widths for layer in problem.layers)):
        plan = dict(zip(problem.ids, combo))
        cost = round(problem.cost(plan, "avg-bits"), 9)
        points[cost] = min(points.get(cost, np.inf), problem.loss(plan))
    expected, floor = [], np.inf
    for cost in sorted(points):
        if points[cost] < floor:
            expected.append((cost, points[cost]))
            floor = points[cost]
    frontier = pareto_frontier(problem, "avg-bits")
    assert [(pytest.approx(p.cost), pytest.approx(p.loss)) for p in frontier] == expected


def test_pareto_returns_the_frontier_and_its_best_point_within_budget():
    problem = random_problem(8, seed=4)
    budget = parse_budget("avg-bits=5")
    allocation = solve(problem, budget, "pareto")
    assert allocation.frontier and allocation.frontier_dimension == "avg-bits"
    within = [p for p in allocation.frontier if p.cost <= 5 + 1e-9]
    assert allocation.loss == pytest.approx(min(p.loss for p in within))


def test_baq_gives_more_bits_to_the_more_sensitive_of_two_equal_layers():
    params = {"calm": 4096, "touchy": 4096}
    loss = {"calm": {32: 0, 8: 1e-5, 4: 1e-3, 2: 1e-2}, "touchy": {32: 0, 8: 1e-3, 4: 1e-1, 2: 1.0}}
    problem = Problem.from_tables(params, loss, distortion={"calm": 1.0, "touchy": 100.0})
    plan = solve(problem, "avg-bits=6", "baq").plan
    assert plan["touchy"] > plan["calm"]
    assert plan == {"calm": 4, "touchy": 8}  # b̄ = 6 ± ½·log2(10): 4.3 → 4 and 7.7 → 8


def test_baq_closed_form_keeps_the_mean_before_rounding():
    from bitpass.passes.allocation.solvers import baq_bits

    problem = random_problem(10, seed=6)
    target = baq_bits(problem, 4.0)
    n = np.array([layer.params for layer in problem.layers], dtype=float)
    assert float(np.sum(n * target) / np.sum(n)) == pytest.approx(4.0)


def test_greedy_meets_the_budget_and_is_never_better_than_ilp():
    problem = random_problem(30, seed=8)
    for fraction in (0.1, 0.4, 0.8):
        budget = parse_budget(f"size={between(problem, 'size', fraction)!r}")
        greedy = solve(problem, budget, "greedy")
        exact = solve(problem, budget, "ilp")
        assert budget.satisfied(problem, greedy.plan)
        assert greedy.loss >= exact.loss * (1 - 1e-9)


def test_no_budget_keeps_every_layer_at_its_highest_width():
    problem = random_problem(5, seed=9)
    for method in SOLVERS:
        assert solve(problem, "", method).plan == problem.highest_plan()


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_an_infeasible_budget_is_a_usage_error_naming_the_floor(method):
    problem = random_problem(4, seed=10)
    with pytest.raises(UsageError, match=r"avg-bits=1.5 cannot be met: the smallest achievable avg-bits is 2\b"):
        solve(problem, "avg-bits=1.5", method)


def test_unknown_method_lists_the_methods():
    with pytest.raises(UsageError, match="methods: ilp, pareto, baq, greedy"):
        solve(random_problem(2), "avg-bits=4", "simulated-annealing")
