"""Group-wise affine grids: codes, scales and zero points as MatMulNBits stores them."""

from __future__ import annotations

import numpy as np
import pytest

from bitpass.passes.weight_only import grid
from bitpass.passes.weight_only.grid import output_error, quadratic_form, rtn


def test_rtn_error_is_at_most_half_a_step_per_element():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    q = rtn(w, 4, 16)
    step = np.repeat(q.scales, 16, axis=0)
    assert np.all(np.abs(w - q.dequantize()) <= step / 2 + 1e-6)
    assert q.codes.max() <= 15 and q.scales.shape == (4, 8)


def test_zero_stays_exact_and_constant_groups_do_not_divide_by_zero():
    w = np.zeros((32, 4), np.float32)
    w[:16, 0] = 3.0
    np.testing.assert_array_equal(rtn(w, 2, 16).dequantize(), w)


def test_widths_may_differ_per_k_slice_and_bytes_follow_them():
    w = np.random.default_rng(1).standard_normal((96, 10)).astype(np.float32)
    q = rtn(w, np.array([2, 4, 8]), 32)
    errors = [np.abs(w - q.dequantize())[i * 32:(i + 1) * 32].max() for i in range(3)]
    assert errors[0] > errors[1] > errors[2]
    assert q.average_bits == 14 / 3
    # codes 32*10*(2+4+8)/8 bytes, one fp32 scale per group, per column one packed zero-point byte per width
    assert q.nbytes() == 560 + 30 * 4 + 3 * 10


def test_output_error_is_relative_and_zero_for_an_exact_copy():
    rng = np.random.default_rng(2)
    w, h = rng.standard_normal((8, 3)), np.eye(8)
    assert output_error(w, w, h) == 0.0
    assert output_error(w, np.zeros_like(w), h) == 1.0


def test_the_quadratic_form_is_the_trace_of_e_h_e_block_by_block_of_columns(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 24))
    h, e = x.T @ x / 200, rng.standard_normal((24, 11)).astype(np.float32)
    expected = float(np.trace(e.T.astype(np.float64) @ h @ e))
    monkeypatch.setattr(grid, "QUADRATIC_BLOCK", 4)  # 11 columns: blocks of 4, 4 and 3
    assert quadratic_form(e, h) == pytest.approx(expected, rel=1e-12)
    approx = e + 0.1 * rng.standard_normal(e.shape).astype(np.float32)
    assert output_error(e, approx, h) == pytest.approx(quadratic_form(e - approx.astype(np.float64), h) / expected,
                                                       rel=1e-12)
