"""GPTQ rounding against round-to-nearest and against its own definition, on correlated inputs."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.weight_only.gptq import HessianAccumulator, gptq, hessian, upper_inverse_cholesky
from bitpass.passes.weight_only.grid import output_error, rtn


def correlated_layer(k: int = 128, n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A weight and the Hessian of inputs with correlated features of very different scales (as in LMs)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2000, k)) @ (0.3 * rng.standard_normal((k, k)) + np.eye(k)) * rng.lognormal(0, 1, k)
    return rng.standard_normal((k, n)).astype(np.float32), hessian(x)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_has_lower_layer_output_error_than_rtn_at_every_width(bits):
    w, h = correlated_layer()
    baseline = output_error(w, rtn(w, bits, 32).dequantize(), h)
    assert output_error(w, gptq(w, h, bits, 32).dequantize(), h) < 0.8 * baseline


def test_grids_fitted_as_rounding_proceeds_are_the_papers_variant_and_also_beat_rtn_at_four_bits():
    w, h = correlated_layer(seed=3)
    fitted = gptq(w, h, 4, 32, static_groups=False)
    assert output_error(w, fitted.dequantize(), h) < 0.8 * output_error(w, rtn(w, 4, 32).dequantize(), h)


def test_act_order_keeps_contiguous_groups_and_lowers_error_further():
    w, h = correlated_layer(seed=1)
    plain, ordered = gptq(w, h, 3, 32), gptq(w, h, 3, 32, act_order=True)
    assert ordered.scales.shape == plain.scales.shape == (4, 64)
    assert output_error(w, ordered.dequantize(), h) < output_error(w, plain.dequantize(), h)


def test_with_an_identity_hessian_gptq_is_round_to_nearest():
    w, _ = correlated_layer()
    exact, nearest = gptq(w, np.eye(w.shape[0]), 4, 32, damp=0.0), rtn(w, 4, 32)
    np.testing.assert_array_equal(exact.codes, nearest.codes)
    np.testing.assert_allclose(exact.scales, nearest.scales, rtol=1e-6)


def test_the_block_size_only_reorders_arithmetic():
    w, h = correlated_layer(seed=2)
    small, large = gptq(w, h, 4, 32, block=32), gptq(w, h, 4, 32, block=128)
    assert (small.codes == large.codes).mean() > 0.999


def test_codes_fit_their_width_and_dead_features_quantize_to_zero():
    w, h = correlated_layer()
    h[5, :] = h[:, 5] = 0.0  # an input feature that is always zero
    q = gptq(w, h, 2, 32)
    assert q.codes.max() <= 3
    assert np.all(q.dequantize()[5] == 0.0)


def test_hessian_accumulates_chunks_like_one_pass():
    x = np.random.default_rng(0).standard_normal((3, 50, 16))
    accumulator = HessianAccumulator(16)
    for chunk in x:
        accumulator.add(chunk)
    np.testing.assert_allclose(accumulator.value, hessian(x), rtol=1e-12)
    np.testing.assert_allclose(hessian(x), x.reshape(-1, 16).T @ x.reshape(-1, 16) / 150, rtol=1e-12)


def test_a_group_size_that_does_not_divide_k_is_refused():
    w, h = correlated_layer()
    with pytest.raises(ValueError, match="group size 48"):
        gptq(w, h, 4, 48)


def test_the_inverse_hessians_upper_cholesky_factor_is_the_textbook_one():
    _, h = correlated_layer(k=96)
    upper = upper_inverse_cholesky(h)
    assert np.all(np.tril(upper, -1) == 0) and np.all(np.diag(upper) > 0)
    np.testing.assert_allclose(upper.T @ upper @ h, np.eye(96), atol=1e-9)
    np.testing.assert_allclose(upper, np.linalg.cholesky(np.linalg.inv(h)).T, rtol=1e-5, atol=1e-12)


def optimal_brain_surgeon_rounding(w: np.ndarray, h: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """GPTQ by its definition, unblocked: round input feature i on the original weight's grid, then move the
    remaining features by the inverse Hessian's row i (``H^-1`` from ``np.linalg.inv``), one at a time."""
    work = w.astype(np.float64)
    grids = rtn(w, bits, group_size)
    scales = np.repeat(grids.scales, group_size, axis=0).astype(np.float64)
    zeros = np.repeat(grids.zeros, group_size, axis=0).astype(np.float64)
    h = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros(w.shape, np.uint8)
    for i in range(len(w)):
        q = np.clip(np.round(work[i] / scales[i] + zeros[i]), 0, 2 ** bits - 1)
        codes[i] = q
        error = (work[i] - (q - zeros[i]) * scales[i]) / upper[i, i]
        work[i + 1:] -= np.outer(upper[i, i + 1:], error)
    return codes


def test_blocked_gptq_makes_the_codes_of_its_unblocked_definition():
    w, h = correlated_layer(k=128, n=48, seed=4)
    reference = optimal_brain_surgeon_rounding(w, h, 4, 32)
    assert (gptq(w, h, 4, 32, block=64).codes == reference).mean() > 0.999
