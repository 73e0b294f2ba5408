"""Per-layer sparsity ratios with one overall (parameter-weighted) sparsity, and masks inside a layer.

Allocations:

* ``uniform``: every layer gets the target sparsity.
* ``global``: one threshold over all layers' scores, each layer's scores divided by their mean
  first (so that Wanda or gradient scores of different layers are comparable); a layer's ratio is
  the fraction of its normalised scores below the threshold.
* ``importance`` (used by ``ecoflap`` and ``sensitivity``): a layer importance ``I_l`` decides the
  layer's keep ratio, ``keep_l = clip(c * (I_l / mean I) ** power, 1 - max_sparsity, 1)``, with
  ``c`` found by bisection so the parameter-weighted keep ratio is ``1 - sparsity``.

Every allocation caps a layer at ``max_sparsity`` (no layer collapses) and meets the overall
target unless the cap makes it infeasible (then it is an error).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bitpass.frontend.errors import UsageError


def _solve(fn, target: float, lo: float, hi: float, *, iterations: int = 100) -> float:
    """Bisection for a non-decreasing ``fn``: the smallest x in [lo, hi] with fn(x) >= target."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if fn(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _check_feasible(sparsity: float, max_sparsity: float) -> None:
    if sparsity > max_sparsity + 1e-9:
        raise UsageError(f"sparsity {sparsity} is above max_layer_sparsity {max_sparsity}: no allocation can "
                         "reach it; raise max_layer_sparsity")


def global_ratios(scores: Mapping[str, np.ndarray], sparsity: float, max_sparsity: float) -> dict[str, float]:
    """Ratios from one threshold over mean-normalised scores."""
    _check_feasible(sparsity, max_sparsity)
    normed = {k: np.sort(np.ravel(v / max(float(np.mean(v)), 1e-30))) for k, v in scores.items()}
    params = {k: v.size for k, v in normed.items()}
    total = sum(params.values())

    def ratios_at(t: float) -> dict[str, float]:
        return {k: min(max_sparsity, np.searchsorted(v, t, side="left") / v.size) for k, v in normed.items()}

    def pruned(t: float) -> float:
        return sum(params[k] * r for k, r in ratios_at(t).items()) / total

    top = max(float(v[-1]) for v in normed.values()) * 2 + 1.0
    t = _solve(pruned, sparsity - 1e-12, 0.0, top)
    return ratios_at(t)


def importance_ratios(importance: Mapping[str, float], params: Mapping[str, int], sparsity: float,
                      max_sparsity: float, power: float = 1.0) -> dict[str, float]:
    """Ratios whose keep fraction grows with the layer importance (``keep ~ I ** power``)."""
    _check_feasible(sparsity, max_sparsity)
    values = np.array([max(float(importance[k]), 0.0) for k in params])
    if not np.all(np.isfinite(values)) or values.sum() <= 0:
        return {k: sparsity for k in params}
    rel = np.maximum(values / values.mean(), 1e-12) ** power
    sizes = np.array([params[k] for k in params], dtype=np.float64)
    floor = 1.0 - max_sparsity

    def kept(c: float) -> float:
        return float(np.sum(sizes * np.clip(c * rel, floor, 1.0)) / sizes.sum())

    c = _solve(kept, 1.0 - sparsity, 0.0, 1.0 / rel.min() + 1.0)
    keep = np.clip(c * rel, floor, 1.0)
    return {k: float(1.0 - kp) for k, kp in zip(params, keep)}


# --- masks inside one layer ------------------------------------------------
def lowest_mask(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Keep-mask (True = kept) pruning the ``round(ratio * n)`` lowest scores of the whole array."""
    flat = np.ravel(scores)
    count = int(round(ratio * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if count > 0:
        keep[np.argsort(flat, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def row_mask(rows: np.ndarray, ratio: float) -> np.ndarray:
    """Keep-mask pruning the ``round(ratio * cols)`` lowest scores of every row (Wanda's per-output group)."""
    count = int(round(ratio * rows.shape[1]))
    keep = np.ones(rows.shape, dtype=bool)
    if count > 0:
        order = np.argsort(rows, axis=1, kind="stable")[:, :count]
        np.put_along_axis(keep, order, False, axis=1)
    return keep


def n_m_mask(groups: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask of a (positions, features) matrix: in every run of ``m`` consecutive features keep the
    ``n`` highest scores. ``features`` must be a multiple of ``m``."""
    positions, features = groups.shape
    blocks = groups.reshape(positions, features // m, m)
    order = np.argsort(-blocks, axis=2, kind="stable")[:, :, :n]
    keep = np.zeros(blocks.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=2)
    return keep.reshape(positions, features)
