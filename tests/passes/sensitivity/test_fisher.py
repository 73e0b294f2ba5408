"""Empirical Fisher and the Taylor estimate against hand-computed answers on least squares."""

from __future__ import annotations

import numpy as np
import torch

from bitpass.passes.sensitivity.fisher import (
    empirical_fisher,
    fisher_scores,
    perturbation_table,
    taylor_delta_loss,
)
from bitpass.passes.sensitivity.hessian import HessianOperator, block_quadratic_forms
from bitpass.passes.sensitivity.quant import fake_quantize, quantization_error


def _per_sample(problem, block: int):
    x, t, w = problem.xs[block], problem.ts[block], problem.weights[block]
    outputs = t.shape[1]
    return [lambda n=n: torch.mean((x[n] @ w.T - t[n]) ** 2) for n in range(x.shape[0])], x, t, w, outputs


def test_empirical_fisher_is_the_mean_squared_per_sample_gradient(make_regression):
    problem = make_regression(n=200)
    closures, x, t, w, outputs = _per_sample(problem, 1)
    diag, used = empirical_fisher(closures, [w])
    r = (x @ w.T - t).detach().numpy()                       # (N, O) residuals
    grads = 2.0 / outputs * r[:, :, None] * x.numpy()[:, None, :]  # d l_n / d W, (N, O, D)
    np.testing.assert_allclose(diag[0].numpy(), np.mean(grads ** 2, axis=0), rtol=1e-10)
    assert used == 200
    np.testing.assert_allclose(fisher_scores(diag), [np.mean(grads ** 2)], rtol=1e-12)


def test_batch_closures_give_the_batch_gradient_fisher(make_regression):
    problem = make_regression(n=100)
    x, t, w = problem.xs[0], problem.ts[0], problem.weights[0]
    closures = [lambda lo=lo: torch.mean((x[lo:lo + 50] @ w.T - t[lo:lo + 50]) ** 2) for lo in (0, 50)]
    diag, _ = empirical_fisher(closures, [w])
    expected = np.mean([torch.autograd.grad(c(), w)[0].numpy() ** 2 for c in closures], axis=0)
    np.testing.assert_allclose(diag[0].numpy(), expected, rtol=1e-10)


def test_exact_taylor_equals_the_loss_change_of_quantizing_at_the_minimum(make_regression):
    problem = make_regression(at_minimum=True)
    op = HessianOperator(problem.loss, problem.weights)
    base = problem.loss_at(problem.weights)
    for bits in (4, 8):
        w = problem.weights[0].detach()
        delta = torch.from_numpy(fake_quantize(w.numpy(), bits, axis=0)) - w
        (form, _) = block_quadratic_forms(op, [delta, None])
        actual = problem.loss_at([w + delta, problem.weights[1].detach()]) - base
        np.testing.assert_allclose(0.5 * form, actual, rtol=1e-6)


def test_fisher_taylor_approximates_the_loss_change(make_regression):
    # one output, residual variance 1/2: the empirical Fisher equals the Hessian diagonal in expectation
    problem = make_regression(n=4000, dims=((10, 1),), scales=(1.0,), noise=np.sqrt(0.5), at_minimum=True)
    closures, x, t, w, _ = _per_sample(problem, 0)
    diag, _ = empirical_fisher(closures, [w])
    np.testing.assert_allclose(diag[0].numpy().ravel(), np.diag(problem.hessian(0)), rtol=0.1)
    base = problem.loss_at(problem.weights)
    for bits in (3, 4, 6):
        wq = fake_quantize(w.detach().numpy(), bits, axis=0)
        delta = wq - w.detach().numpy()
        estimate = taylor_delta_loss(diag[0], delta)
        actual = problem.loss_at([torch.from_numpy(wq)]) - base
        assert abs(estimate - actual) / actual < 0.15, (bits, estimate, actual)


def test_perturbation_table_is_half_score_times_quantization_error():
    w = np.random.default_rng(0).standard_normal((4, 9))
    table = perturbation_table(2.0, w, (2, 4, 8))
    assert list(table) == [2, 4, 8]
    for bits, value in table.items():
        np.testing.assert_allclose(value, quantization_error(w, bits))
    assert table[2] > table[4] > table[8] > 0
