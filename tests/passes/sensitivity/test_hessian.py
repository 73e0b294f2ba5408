"""Hutchinson trace, power iteration and block quadratic forms against closed-form Hessians."""

from __future__ import annotations

import numpy as np
import torch

from bitpass.passes.sensitivity.hessian import (
    HessianOperator,
    block_quadratic_forms,
    hutchinson_trace,
    top_eigenvalues,
)


def _exact_traces(problem) -> list[float]:
    return [float(np.trace(problem.hessian(i))) for i in range(len(problem.weights))]


def test_hessian_vector_product_is_exact(regression):
    op = HessianOperator(regression.loss, regression.weights)
    v = [torch.randn(w.shape, dtype=w.dtype) for w in regression.weights]
    for i, (hv, bhv) in enumerate(zip(op.hvp(v), op.block_hvp(v))):
        expected = regression.hessian(i) @ v[i].numpy().ravel()  # blocks are independent: H is block-diagonal
        np.testing.assert_allclose(hv.numpy().ravel(), expected, rtol=1e-9)
        np.testing.assert_allclose(bhv.numpy().ravel(), expected, rtol=1e-9)


def test_batched_closures_sum_to_the_same_products(regression):
    v = [torch.randn(w.shape, dtype=w.dtype) for w in regression.weights]
    whole = HessianOperator(regression.loss, regression.weights).hvp(v)
    parts = HessianOperator(regression.batch_losses(1000), regression.weights).hvp(v)
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)


def test_hutchinson_matches_the_exact_trace(regression):
    exact = _exact_traces(regression)
    est = hutchinson_trace(regression.loss, regression.weights, tolerance=0.005, max_samples=300,
                           generator=torch.Generator().manual_seed(0))
    for got, want, n in zip(est.trace, exact, [w.numel() for w in regression.weights]):
        assert abs(got - want) / want < 0.03
    np.testing.assert_allclose(est.average, [t / w.numel() for t, w in zip(est.trace, regression.weights)])


def test_full_products_are_unbiased_too(regression):
    exact = _exact_traces(regression)
    est = hutchinson_trace(regression.loss, regression.weights, tolerance=0.005, max_samples=300,
                           block_diagonal=False, generator=torch.Generator().manual_seed(1))
    for got, want in zip(est.trace, exact):
        assert abs(got - want) / want < 0.05


def test_hutchinson_stops_once_the_ranking_is_resolved(regression):
    est = hutchinson_trace(regression.loss, regression.weights, tolerance=0.1, max_samples=200,
                           generator=torch.Generator().manual_seed(0))
    assert est.converged and est.samples < 50 and "resolved" in est.reason
    assert est.kendall_tau == 1.0
    order = np.argsort(est.average)
    assert list(order) == list(np.argsort([t / w.numel() for t, w in zip(_exact_traces(regression),
                                                                           regression.weights)]))



def test_hutchinson_runs_to_max_samples_on_an_unresolved_tie(make_regression):
    tie = make_regression(dims=((8, 2), (8, 2)), scales=(1.0, 1.0))  # two blocks with ~equal traces
    capped = hutchinson_trace(tie.loss, tie.weights, tolerance=1e-6, max_samples=12,
                              generator=torch.Generator().manual_seed(0))
    assert not capped.converged and capped.samples == 12 and "max_samples" in capped.reason


def test_hutchinson_is_deterministic_for_a_seed(regression):
    a = hutchinson_trace(regression.loss, regression.weights, max_samples=12,
                         generator=torch.Generator().manual_seed(7))
    b = hutchinson_trace(regression.loss, regression.weights, max_samples=12,
                         generator=torch.Generator().manual_seed(7))
    assert a.trace == b.trace and a.samples == b.samples


def test_power_iteration_finds_the_top_eigenvalue(regression):
    est = top_eigenvalues(regression.loss, regression.weights, tolerance=1e-8, max_iterations=500,
                          generator=torch.Generator().manual_seed(0))
    for i, got in enumerate(est.eigenvalue):
        want = float(np.linalg.eigvalsh(regression.hessian(i)).max())
        assert abs(got - want) / want < 1e-4
    assert all(est.converged) and est.products <= 500


def test_block_quadratic_form_is_exact(regression):
    op = HessianOperator(regression.loss, regression.weights)
    deltas = [torch.randn(w.shape, dtype=w.dtype) * 0.01 for w in regression.weights]
    forms = block_quadratic_forms(op, [deltas[0], None])
    d = deltas[0].numpy().ravel()
    assert forms[1] is None
    np.testing.assert_allclose(forms[0], d @ regression.hessian(0) @ d, rtol=1e-9)
