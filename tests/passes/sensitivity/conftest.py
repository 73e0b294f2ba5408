"""Fixtures for the sensitivity tests: one torch thread (the test machine's cores are shared), and
small regression problems whose Hessians are known in closed form."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch



@dataclass
class Regression:
    """Independent least-squares problems, one per "layer": loss = sum_l mean((X_l W_l^T - T_l)^2).

    Each block Hessian is exactly ``H_l = 2/(N*O) * kron(I_O, X_l^T X_l)`` (weights W_l of shape (O, D)
    flattened row-major), independent of W: the loss is quadratic in every block.
    """

    xs: list[torch.Tensor]
    ts: list[torch.Tensor]
    weights: list[torch.Tensor]

    def loss(self) -> torch.Tensor:
        return sum(torch.mean((x @ w.T - t) ** 2) for x, t, w in zip(self.xs, self.ts, self.weights))

    def loss_at(self, weights: list[torch.Tensor]) -> float:
        with torch.no_grad():
            return float(sum(torch.mean((x @ w.T - t) ** 2) for x, t, w in zip(self.xs, self.ts, weights)))

    def hessian(self, index: int) -> np.ndarray:
        x = self.xs[index].double().numpy()
        n, outputs = x.shape[0], self.ts[index].shape[1]
        return 2.0 / (n * outputs) * np.kron(np.eye(outputs), x.T @ x)

    def batch_losses(self, batch: int) -> list:
        """Closures that sum to the same loss (each block's mean split over sample batches)."""
        n = self.xs[0].shape[0]

        def part(lo: int):
            def f() -> torch.Tensor:
                return sum(torch.sum((x[lo:lo + batch] @ w.T - t[lo:lo + batch]) ** 2) / t.numel()
                           for x, t, w in zip(self.xs, self.ts, self.weights))
            return f
        return [part(lo) for lo in range(0, n, batch)]


def make_regression(*, n: int = 4000, dims=((12, 2), (6, 3)), scales=(1.0, 3.0), noise: float = 0.1,
                    at_minimum: bool = False, seed: int = 0) -> Regression:
    rng = np.random.default_rng(seed)
    xs, ts, ws = [], [], []
    for (d, o), scale in zip(dims, scales):
        # distinct column scales give a clear eigengap for power iteration
        x = rng.standard_normal((n, d)) * scale * np.linspace(1.0, 2.0, d)
        w_true = rng.standard_normal((o, d))
        t = x @ w_true.T + noise * rng.standard_normal((n, o))
        w = np.linalg.lstsq(x, t, rcond=None)[0].T if at_minimum else w_true + 0.3 * rng.standard_normal((o, d))
        xs.append(torch.from_numpy(x))
        ts.append(torch.from_numpy(t))
        ws.append(torch.from_numpy(np.ascontiguousarray(w)).requires_grad_(True))
    return Regression(xs, ts, ws)


@pytest.fixture
def regression() -> Regression:
    return make_regression()


@pytest.fixture(name="make_regression")
def _make_regression_factory():
    """The ``make_regression`` factory, for tests that need a problem of their own."""
    return make_regression
